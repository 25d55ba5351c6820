"""What a new operator runs into (issue 19, friction and defect 7), each against a real
mosquitto: broker-config as the README shows it, started as root without --run-as; a cloud
without a broker or with a wrong password; defaults from a small fleet file; devices that are
not there under the default --select all; --weighting samples against a device's own claim."""

from __future__ import annotations

import getpass
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from mqtt_broker import BIN, Broker, free_port
from test_mqtt_hostile import Impostor, cloud_state, wait_for_line

from cloud.broker_config import write_broker_config
from cloud.config import RunConfig
from cloud.fleet import Fleet, FleetDevice
from cloud.fleet_cli import fleet_config
from cloud.runlog import read_metrics
from cloud.server import CloudOptions, FleetCloud
from cloud.simulation import initial_state
from common import protocol as p
from common.models import tier_state
from common.mqtt_link import Link, broker_settings


def _run(args: list[str], timeout: float = 60.0, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True,
                          timeout=timeout, **kw)


@pytest.fixture
def searchable_dir():
    """A directory the broker's own user can enter (pytest's tmp_path is private to us)."""
    d = Path(tempfile.mkdtemp(prefix="hmf-broker-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_broker_config_as_documented_runs_mosquitto_on_loopback(searchable_dir, tmp_path):
    """``--devices ID...`` as README and PROTOCOL show it; no --run-as: as root, mosquitto
    switches to its own user, which must read passwd and acl (it exited 13 before)."""
    port, out = free_port(), searchable_dir / "broker"
    done = _run(["hmf-cloud", "broker-config", "--out", str(out), "--devices", "dev-a",
                 "dev-b", "dev-c", "--port", str(port)])
    assert done.returncode == 0, done.stderr
    conf = (out / "mosquitto.conf").read_text()
    assert f"listener {port} 127.0.0.1" in conf  # loopback unless --bind says otherwise
    assert all(f"user dev-{x}" in (out / "acl").read_text() for x in "abc")
    assert not (out / "passwd").stat().st_mode & 0o007  # never world-readable
    assert done.stderr == ""  # nothing left for the operator to fix
    broker = Broker(tmp_path, out / "mosquitto.conf", port).start()
    try:
        link = Link("dev-b", broker_settings(broker.url, "dev-b",
                                             str(out / "secrets" / "dev-b.txt")), [])
        link.start()
        assert link.connected.wait(10), broker.log()  # the password file was read
        link.stop()
    finally:
        broker.stop()
    if os.geteuid() == 0:  # started as root, it ran as its own user (and still read passwd)
        assert (out / "passwd").stat().st_gid == pwd.getpwnam("mosquitto").pw_gid


def test_cloud_without_a_broker_says_so_and_exits_nonzero(tmp_path):
    fleet = tmp_path / "fleet.json"
    Fleet([FleetDevice("dev-a", 1)]).save(fleet)
    start = time.monotonic()
    done = _run(["hmf-cloud", "start", "--broker", f"mqtt://127.0.0.1:{free_port()}",
                 "--fleet", str(fleet), "--model", "mnist", "--out", str(tmp_path / "run"),
                 "--connect-timeout", "3"], timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    assert time.monotonic() - start < 40
    assert "cannot reach the broker" in done.stdout and "retrying in" in done.stdout
    assert "could not reach the broker at 127.0.0.1" in done.stderr
    assert "--connect-timeout 0" in done.stderr


def test_cloud_with_a_wrong_password_says_what_to_check(tmp_path):
    port = free_port()
    paths = write_broker_config(tmp_path / "broker", ["dev-a"], port=port,
                                run_as=getpass.getuser())
    broker = Broker(tmp_path, paths["conf"], port).start()
    try:
        wrong = tmp_path / "wrong.txt"
        wrong.write_text("not-the-password\n")
        fleet = tmp_path / "fleet.json"
        Fleet([FleetDevice("dev-a", 1)]).save(fleet)
        done = _run(["hmf-cloud", "start", "--broker", broker.url, "--fleet", str(fleet),
                     "--model", "mnist", "--out", str(tmp_path / "run"), "--password-file",
                     str(wrong), "--connect-timeout", "3"], timeout=60)
    finally:
        broker.stop()
    assert done.returncode == 1, done.stdout + done.stderr
    assert "refused the connection (Not authorized)" in done.stdout
    assert "--password-file" in done.stderr and "refused the cloud" in done.stderr


def test_small_fleet_gets_participants_and_tier_mix_from_its_file():
    three = Fleet([FleetDevice(f"d{i}", t) for i, t in enumerate((1, 2, 3))])
    cfg = fleet_config(three, None, None, {})
    assert (cfg.clients, cfg.participants) == (3, 3)
    assert cfg.tier_mix == RunConfig().tier_mix  # thirds fit 1/1/1: left as the simulator's
    ones = Fleet([FleetDevice(f"d{i}", 1) for i in range(3)])
    cfg = fleet_config(ones, None, None, {})
    assert cfg.participants == 3 and cfg.tier_mix == (1.0, 0.0, 0.0)
    ones.federation(cfg.participants, cfg.tier_mix)  # no "exceeds" / "tier-2" error
    assert fleet_config(ones, None, None, {"participants": 2}).participants == 2
    with pytest.raises(ValueError, match="tier-2"):  # an explicit mix is not second-guessed
        fleet_config(ones, None, None, {"tier_mix": "0.3,0.4,0.3"})


# ---- in-process cloud, devices played by a raw client ----------------------------------------

def _upload(bad: Impostor, device: str, task: dict, state: dict, samples: int) -> str:
    blob = p.encode_state(state, meta={"run": task["run"], "round": task["round"],
                                       "device": device})
    ref = p.blob_ref(blob)
    bad.send(device, "request", p.make_control(
        "offer", run=task["run"], round=task["round"], device=device, blob=ref,
        samples=samples, loss=1.0, local_acc=None))
    reply = p.parse_control(bad.wait(p.device_topic(device, "reply")), "reply")
    assert reply["status"] == "send", reply
    for k in range(ref.chunks):
        bad.send(device, "update", p.chunk_frame(blob, ref, k, task["run"], task["round"]))
    return p.parse_control(bad.wait(p.device_topic(device, "reply")), "reply")["status"]


def _cloud(tmp_path, cfg, fleet, opts, lines) -> tuple[Broker, FleetCloud, threading.Thread]:
    broker = Broker(tmp_path).start()
    cloud = FleetCloud(cfg, fleet, tmp_path / "run", broker_settings(broker.url), opts,
                       log=lines.append)
    return broker, cloud, threading.Thread(target=cloud.run, daemon=True)


def test_absent_device_does_not_hold_the_default_round_to_its_deadline(tmp_path):
    """--select all draws dev-b, which never comes: the round closes after --absent-grace
    once the device that is there has answered, not after --round-timeout."""
    cfg = RunConfig(model="mnist", strategy="depthwise", clients=2, participants=2,
                    tier_mix=(1.0, 0.0, 0.0), rounds=1, seed=1)
    fleet = Fleet([FleetDevice("dev-a", 1), FleetDevice("dev-b", 1)])
    lines: list[str] = []
    opts = CloudOptions(min_updates=1, round_timeout=300, wait_devices=1, absent_grace=2.0)
    broker, cloud, thread = _cloud(tmp_path, cfg, fleet, opts, lines)
    bad = Impostor(broker.url)
    try:
        thread.start()
        wait_for_line(lines, "waiting for devices")
        bad.send("dev-a", "presence", p.make_control("hello", device="dev-a", tier=1,
                                                     samples=5, software="test"))
        task = p.parse_control(bad.wait(p.device_topic("dev-a", "task")), "task")
        state = tier_state(initial_state(cfg), 1)
        assert _upload(bad, "dev-a", task, state, 5) == "accepted"
        thread.join(30)  # far below the 300 s deadline
        assert not thread.is_alive(), "\n".join(lines)
    finally:
        bad.link.stop()
        broker.stop()
    (row,) = read_metrics(tmp_path / "run")
    assert row["absent"] == ["dev-b"] and row["participants"]["1"] == 1
    assert row["elapsed_s"] < 30


def test_weighting_samples_trusts_the_fleet_file_not_the_claim(tmp_path):
    cfg = RunConfig(model="mnist", strategy="depthwise", clients=2, participants=2,
                    tier_mix=(1.0, 0.0, 0.0), rounds=1, seed=1, weighting="samples",
                    clip_factor=0.0)
    with pytest.raises(ValueError, match="samples"):  # nothing to bound a claim by
        FleetCloud(cfg, Fleet([FleetDevice("dev-a", 1), FleetDevice("dev-b", 1)]), tmp_path,
                   broker_settings("mqtt://127.0.0.1:1"), CloudOptions())
    fleet = Fleet([FleetDevice("dev-a", 1, 100), FleetDevice("dev-b", 1, 100)])
    lines: list[str] = []
    opts = CloudOptions(min_updates=2, round_timeout=120, wait_devices=0)
    broker, cloud, thread = _cloud(tmp_path, cfg, fleet, opts, lines)
    bad = Impostor(broker.url)
    start = tier_state(initial_state(cfg), 1)
    states = {"dev-a": {k: v + 1.0 if v.is_floating_point() else v for k, v in start.items()},
              "dev-b": {k: v - 1.0 if v.is_floating_point() else v for k, v in start.items()}}
    try:
        thread.start()
        for device, claim in (("dev-a", 10**9), ("dev-b", 100)):
            task = p.parse_control(bad.wait(p.device_topic(device, "task")), "task")
            assert _upload(bad, device, task, states[device], claim) == "accepted"
        thread.join(60)
        assert not thread.is_alive(), "\n".join(lines)
    finally:
        bad.link.stop()
        broker.stop()
    final = cloud_state(tmp_path / "run")
    w = "blocks.0.conv1.weight"
    assert torch.allclose(final[w], start[w], atol=1e-6)  # equal weights: +1 and -1 cancel
