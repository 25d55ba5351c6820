"""Serving the latest model: ``hmf-cloud start --export-onnx`` exports each round's global model
as ONNX graphs and devices fetch the graphs of their own tier (docs/PROTOCOL.md, "Serving the
latest model").

One real run is shared by most tests (module fixture): mosquitto, the cloud and two devices
(tiers 1 and 3) as their console scripts on tiny real HAPT data, 2 rounds; a third fleet device
(tier 2, never drawn) joins in this process after the last round, through the real
``ModelFetcher``, so the test decides what reaches it first (a forged chunk). Hostile messages
go through the same broker."""

from __future__ import annotations

import hashlib
import json
import queue
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mqtt_broker import Broker, Proc, RawClient

from cloud.checkpoint import CHECKPOINT, load_checkpoint
from cloud.config import RunConfig
from cloud.fleet import Fleet, write_partition
from cloud.runlog import read_metrics
from cloud.server import CloudOptions, FleetCloud, load_release
from common import protocol as p
from common import tensorfile
from common.mqtt_link import broker_settings
from device.cli import hmf_device
from device.runtime import DeviceModel, Manifest
from device.serving import CURRENT, ModelFetcher

SETTINGS = dict(model="hapt", partition="iid", local_epochs=1, batch_size=32, lr=1e-3,
                hypernet_epochs=2, rank=16, hidden=32, seed=3, strategy="hypemefed",
                clients=3, participants=2, rounds=2)  # a round draws tiers 1 and 3, never 2
SERVE_S = 8


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def graph_names(tier: int) -> set[str]:
    return {f"{kind}_{k}.onnx" for kind in ("exit", "segment") for k in range(1, tier + 1)}


def late_device_fetches(url: str, device: str, root: Path, tier: int) -> SimpleNamespace:
    """A fleet device that joins after the last round: it reads the retained model message,
    sends two hostile requests, receives a forged chunk (right header, wrong bytes) through the
    broker before it asks the cloud, then fetches its tier's graphs from the cloud."""
    graphs = p.device_topic(device, "graphs")
    me = RawClient(url, device, [p.cloud_topic("model"), graphs])
    lines: list[str] = []
    fetcher = ModelFetcher(root, device, tier, retry_s=2.0, log=lines.append)
    try:
        msg = p.parse_control(me.wait(p.cloud_topic("model")), "model")
        run, rnd = msg["run"], msg["round"]
        request = fetcher.on_model(msg)
        assert request is not None
        ask = lambda **kw: p.make_control("fetch_graph", **{  # noqa: E731
            "run": run, "round": rnd, "device": device, "missing": None, **kw})
        me.publish(p.device_topic(device, "request"), ask(sha256="0" * 64))  # unknown blob
        me.publish(p.device_topic(device, "request"), ask(round=rnd - 1,  # stale round
                                                     sha256=msg["manifest"].sha256))
        ref = msg["manifest"]
        forged = p.chunk_frame(b"\x00" * ref.size, ref, 0, run, rnd)
        me.publish(graphs, forged)
        request = fetcher.on_chunk(p.parse_chunk(me.wait(graphs)))  # refused, refetched
        assert request is not None and fetcher.held is None
        deadline = time.monotonic() + 30
        while fetcher.held != (run, rnd) and time.monotonic() < deadline:
            if request is not None:
                me.publish(p.device_topic(device, "request"), request)
            try:
                ev = me.link.events.get(timeout=0.2)
            except queue.Empty:
                request = fetcher.retry()
                continue
            request = (fetcher.on_chunk(p.parse_chunk(ev[2]))
                       if ev[0] == "message" and ev[1] == graphs else fetcher.retry())
    finally:
        me.link.stop()
    return SimpleNamespace(fetcher=fetcher, lines=lines, message=msg)


@pytest.fixture(scope="module")
def served(tiny_hapt, tmp_path_factory):
    """The shared run; yields what the tests look at, then stops every process."""
    tmp = tmp_path_factory.mktemp("serving")
    cfg = RunConfig(data_dir=str(tiny_hapt), **SETTINGS)
    broker = Broker(tmp).start()
    procs: list[Proc] = []
    try:
        fleet = write_partition(cfg, tmp / "part")
        by_tier = {d.tier: d.id for d in fleet.devices}
        out = tmp / "run"
        procs.append(Proc("cloud", [
            "hmf-cloud", "start", "--broker", broker.url, "--fleet",
            str(tmp / "part" / "fleet.json"), *settings_args(cfg), "--threads", "1",
            "--min-updates", "2", "--wait-devices", "2", "--round-timeout", "120",
            "--export-onnx", "--serve-graphs-s", str(SERVE_S), "--out", str(out)],
            tmp / "cloud.log"))
        cloud = procs[0]
        devices = {}
        for tier in (1, 3):
            device = by_tier[tier]
            devices[tier] = Proc(device, [
                "hmf-device", "join", "--broker", broker.url, "--device-id", device,
                "--data", str(tmp / "part" / f"{device}.npz"), "--work-dir", str(tmp / device),
                "--tier", str(tier), "--threads", "1", "--retry-s", "2"], tmp / f"{device}.log")
            procs.append(devices[tier])
        for d in devices.values():
            d.wait_for("round 2's model: fetching", timeout=150)
        hostile_models(broker.url, out)
        cloud.wait_for("serving round 2's graphs for", timeout=60)
        late = late_device_fetches(broker.url, by_tier[2], tmp / by_tier[2] / "model", 2)
        assert cloud.wait(SERVE_S + 30) == 0, cloud.text()
        for d in devices.values():
            assert d.wait(30) == 0, d.text()
        yield SimpleNamespace(tmp=tmp, cfg=cfg, out=out, fleet=fleet, by_tier=by_tier,
                              cloud=cloud, devices=devices, late=late, broker=broker,
                              run=json.loads((out / "fleet_run.json").read_text())["run"])
    finally:
        for proc in procs:
            proc.stop()
        broker.stop()


def settings_args(cfg: RunConfig) -> list[str]:
    return ["--model", cfg.model, "--strategy", cfg.strategy, "--rounds", str(cfg.rounds),
            "--participants", str(cfg.participants), "--local-epochs", str(cfg.local_epochs),
            "--batch-size", str(cfg.batch_size), "--lr", str(cfg.lr),
            "--hypernet-epochs", str(cfg.hypernet_epochs), "--rank", str(cfg.rank),
            "--hidden", str(cfg.hidden), "--seed", str(cfg.seed)]


def hostile_models(url: str, out: Path) -> None:
    """Not retained (the cloud's retained message stays): a model message naming a path, and
    round 1's real message again while the devices fetch round 2."""
    run = json.loads((out / "fleet_run.json").read_text())["run"]
    rogue = RawClient(url, "rogue-cloud", [])
    try:
        msg = json.loads(load_release(out / "onnx" / "round_2", run, 2).message)
        msg["files"][0]["file"] = "../x.onnx"
        rogue.publish(p.cloud_topic("model"), json.dumps(msg).encode())
        old_release = load_release(out / "onnx" / "round_1", run, 1)
        rogue.publish(p.cloud_topic("model"), old_release.message)
    finally:
        rogue.link.stop()


def held_dir(root: Path) -> Path:
    link = root / CURRENT
    assert link.is_symlink()
    return link.resolve()


# ---------------------------------------------------------------------- the run
def test_each_device_ends_with_the_final_round_of_its_own_tier(served):
    cloud_manifest = json.loads((served.out / "onnx" / "round_2" / "manifest.json").read_text())
    cloud_sha = {e["file"]: e["sha256"] for e in cloud_manifest["files"]}
    for tier in (1, 2, 3):
        root = served.tmp / served.by_tier[tier] / "model"
        current = held_dir(root)
        assert current.name == f"{served.run}-round_2"
        names = {f.name for f in current.iterdir()}
        assert names == graph_names(tier) | {"manifest.json"}
        for name in graph_names(tier):
            assert sha256(current / name) == cloud_sha[name], (tier, name)
        manifest = Manifest.load(current)  # re-verifies every sha256
        assert manifest.data["tiers"] == list(range(1, tier + 1))
        assert manifest.data["served"]["round"] == 2 and manifest.data["served"]["tier"] == tier
        rounds = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.is_symlink())
        assert rounds[-1] == current.name and len(rounds) <= 2  # older rounds pruned
        assert not list(root.glob("*.partial"))


def test_fetched_graphs_predict_what_the_cloud_exported(served):
    x = np.load(served.tmp / "part" / "eval.npz")["x"][:40]
    cloud = DeviceModel(served.out / "onnx" / "round_2", threads=1)
    for tier in (1, 2, 3):
        device = DeviceModel(served.tmp / served.by_tier[tier] / "model" / CURRENT, threads=1)
        assert device.exits == list(range(1, tier + 1))
        for k in device.exits:
            assert np.array_equal(device.logits(x, k), cloud.logits(x, k)), (tier, k)
        a, b = device.cascade(x, 0.8), cloud.cascade(x, 0.8, max_exit=tier)
        assert np.array_equal(a.labels, b.labels) and np.array_equal(a.exits, b.exits)
    np.savez(served.tmp / "x.npz", x=x)
    deep = served.tmp / served.by_tier[3] / "model" / CURRENT
    result = CliRunner().invoke(hmf_device, ["predict", "--model-dir", str(deep), "--input",
                                             str(served.tmp / "x.npz"), "--json", "--threads",
                                             "1"])
    assert result.exit_code == 0, result.output
    labels = [r["label"] for r in json.loads(result.output)["predictions"]]
    assert labels == cloud.logits(x, 3).argmax(1).tolist()


def test_every_round_exported_and_checked(served):
    for r in (1, 2):
        manifest = json.loads((served.out / "onnx" / f"round_{r}" / "manifest.json").read_text())
        assert manifest["check"]["passed"] is True and manifest["tiers"] == [1, 2, 3]
        assert manifest["source"] == {"round": r, "run": served.run, "strategy": "hypemefed"}
    rows = read_metrics(served.out)
    assert [(r["round"], r["export"]["ok"], r["export"]["serving"]) for r in rows] == [
        (1, True, 1), (2, True, 2)]
    assert rows[1]["bytes_graphs"] > 0  # round 1's graphs went out while round 2 ran


def test_hostile_input_is_refused_and_the_run_finishes(served):
    cloud = served.cloud.text()
    late = served.by_tier[2]
    assert f"rejected from {late}: unknown blob: 0000000000000000" in cloud
    assert f"rejected from {late}: stale round: graphs of round 1, serving round 2" in cloud
    assert f"run {served.run} finished" in cloud
    for d in served.devices.values():
        text = d.text()
        assert "ignored a message on hmf/v1/cloud/model: bad field: files[0].file=" in text
        assert "ignored a message on hmf/v1/cloud/model: stale round" in text
        assert f"run {served.run} finished after 2 rounds" in text
    assert any("checksum mismatch" in line and "fetching it again" in line
               for line in served.late.lines), served.late.lines


def test_a_device_joining_after_the_last_round_gets_the_retained_model(served):
    assert served.late.message["round"] == 2  # read from the retained message on connect
    assert served.late.fetcher.held == (served.run, 2)
    assert held_dir(served.tmp / served.by_tier[2] / "model").name == f"{served.run}-round_2"


def resume_and_watch_model(served, out: Path, tag: str) -> tuple[dict, list[str]]:
    """Resumes the run in ``out`` with --export-onnx in this process (as the CLI resolved its
    config) and returns the first retained ``model`` message and the cloud's log lines."""
    lines: list[str] = []
    opts = CloudOptions(export_onnx=True, serve_graphs_s=1.0, wait_devices=0)
    cfg = RunConfig(**load_checkpoint(out)[2]["config"])
    cloud = FleetCloud(cfg, Fleet.load(served.tmp / "part" / "fleet.json"), out,
                       broker_settings(served.broker.url), opts, log=lines.append,
                       client_id=f"hmf-cloud-{tag}")
    thread = threading.Thread(target=cloud.run, kwargs={"resume": True}, daemon=True)
    thread.start()
    watcher = RawClient(served.broker.url, f"watcher-{tag}", [p.cloud_topic("model")])
    try:
        msg = p.parse_control(watcher.wait(p.cloud_topic("model")), "model")
    finally:
        watcher.link.stop()
    thread.join(60)
    assert not thread.is_alive(), "\n".join(lines)
    return msg, lines


def test_resume_reexports_and_republishes(served, tmp_path):
    """A cloud resumed after the last round exports round 2 again when its graphs are gone,
    publishes the model message and serves it before finishing. The export leaves torch's RNG
    where the checkpoint put it: a round after it would compute what it computes without
    --export-onnx (tests/test_mqtt_fleet.py: fleet == hmf simulate)."""
    out = tmp_path / "run"
    shutil.copytree(served.out, out)
    shutil.rmtree(out / "onnx" / "round_2")
    msg, lines = resume_and_watch_model(served, out, "resumed")
    assert torch.equal(torch.get_rng_state(), tensorfile.load(out / CHECKPOINT)[0]["rng.torch"])
    assert (msg["run"], msg["round"]) == (served.run, 2)
    again = Manifest.load(out / "onnx" / "round_2")
    first = Manifest.load(served.out / "onnx" / "round_2")
    assert [f["sha256"] for f in again.data["files"]] == [f["sha256"] for f in first.data["files"]]
    assert any("round 2: exported 6 ONNX graphs" in line for line in lines), lines


def test_a_failed_export_keeps_the_previous_round_current(served, tmp_path):
    """Round 2's export cannot be written (a file where its directory goes): the resumed cloud
    logs it and serves round 1's graphs, and the run still finishes."""
    out = tmp_path / "run"
    shutil.copytree(served.out, out)
    shutil.rmtree(out / "onnx" / "round_2")
    (out / "onnx" / "round_2").write_text("in the way")
    msg, lines = resume_and_watch_model(served, out, "failing")
    assert (msg["run"], msg["round"]) == (served.run, 1)
    assert any(line.startswith("round 2: ONNX export failed") and
               line.endswith("round 1's graphs stay current") for line in lines), lines
    assert f"run {served.run} finished: {out / 'summary.json'}" in lines


# ---------------------------------------------------------------------- the device, alone
def frames_for(release, request: bytes) -> list[bytes]:
    """What the cloud sends for a fetch_graph (its own chunking of its own release)."""
    msg = p.parse_control(request, "fetch_graph")
    blob, ref = release.blobs[msg["sha256"]]
    wanted = msg["missing"] if msg["missing"] is not None else range(ref.chunks)
    return [p.chunk_frame(blob, ref, i, msg["run"], msg["round"]) for i in wanted]


def fetch_all(fetcher: ModelFetcher, release, request: bytes | None) -> None:
    while request is not None:
        frames = frames_for(release, request)
        request = None
        for frame in frames:
            request = fetcher.on_chunk(p.parse_chunk(frame)) or request


def test_fetcher_refuses_what_does_not_fit_and_keeps_the_current_model(served, tmp_path):
    r1 = load_release(served.out / "onnx" / "round_1", served.run, 1)
    r2 = load_release(served.out / "onnx" / "round_2", served.run, 2)
    model = lambda rel: p.parse_control(rel.message, "model")  # noqa: E731
    root = tmp_path / "model"
    fetcher = ModelFetcher(root, "d1", tier=1, log=lambda _: None)
    fetch_all(fetcher, r1, fetcher.on_model(model(r1)))
    assert fetcher.held == (served.run, 1)
    # a model too big for this device
    small = ModelFetcher(tmp_path / "small", "d1", tier=3, log=lambda _: None, max_bytes=10_000)
    with pytest.raises(p.ProtocolError, match="oversized model"):
        small.on_model(model(r2))
    # a message whose files are not what its manifest lists: nothing installed
    lying = json.loads(r2.message)
    lying["files"][0]["precision"] = "int8"
    request = fetcher.on_model(p.parse_control(json.dumps(lying).encode(), "model"))
    with pytest.raises(p.ProtocolError, match="bad manifest"):
        fetch_all(fetcher, r2, request)
    assert fetcher.download is None and fetcher.held == (served.run, 1)
    # a chunk of a blob nobody asked for, then the real round 2
    request = fetcher.on_model(model(r2))
    stray = p.chunk_frame(b"zz", p.blob_ref(b"zz"), 0, served.run, 2)
    with pytest.raises(p.ProtocolError, match="unexpected blob"):
        fetcher.on_chunk(p.parse_chunk(stray))
    fetch_all(fetcher, r2, request)
    assert fetcher.held == (served.run, 2)
    with pytest.raises(p.ProtocolError, match="stale round"):
        fetcher.on_model(model(r1))
    assert fetcher.on_model(model(r2)) is None  # the retained message again: nothing to do
    # a restart: knows what it holds, drops a half-finished download
    (root / f"{served.run}-round_3.partial").mkdir()
    restarted = ModelFetcher(root, "d1", tier=1, log=lambda _: None)
    assert restarted.held == (served.run, 2)
    assert not list(root.glob("*.partial"))
    assert {f.name for f in held_dir(root).iterdir()} == graph_names(1) | {"manifest.json"}


def test_model_messages_name_bare_files_only():
    ref = p.blob_ref(b"graph")
    fields = dict(run="r1", round=2, model="hapt", format="hmf-onnx/1", manifest=ref)
    entry = lambda name, **kw: p.GraphFile(name, kw.get("kind", "exit"),  # noqa: E731
                                           kw.get("index", 1), "fp32", kw.get("blob", ref))
    ok = p.parse_control(p.make_control("model", files=[entry("exit_1.int8.onnx")], **fields))
    assert ok["files"][0].file == "exit_1.int8.onnx" and ok["files"][0].blob == ref
    for name in ("../x.onnx", "a/b.onnx", ".x.onnx", "/etc/x.onnx", "x.onnx.sh", "x" * 70 +
                 ".onnx", "manifest.json", "c:\\x.onnx", ""):
        with pytest.raises(p.ProtocolError, match="bad field"):
            p.make_control("model", files=[entry(name)], **fields)
    with pytest.raises(p.ProtocolError, match="bad field"):  # one name twice
        p.make_control("model", files=[entry("a.onnx"), entry("a.onnx", index=2)], **fields)
    huge = p.BlobRef("ab" * 32, p.MAX_GRAPH_BYTES + 1, 135, p.CHUNK_BYTES)
    with pytest.raises(p.ProtocolError, match="oversized graph"):
        p.make_control("model", files=[entry("a.onnx", blob=huge)], **fields)
    with pytest.raises(p.ProtocolError, match="bad field"):
        p.make_control("model", files=[entry(f"f{i}.onnx", index=1 + i % 3) for i in range(65)],
                       **fields)
    with pytest.raises(p.ProtocolError, match="bad field"):
        p.make_control("model", files=[], **fields)


_REF = p.blob_ref(b"graph")
_VALID = [
    p.make_control("model", run="r1", round=2, model="hapt", format="hmf-onnx/1", manifest=_REF,
                   files=[p.GraphFile("exit_1.onnx", "exit", 1, "fp32", _REF),
                          p.GraphFile("segment_1.int8.onnx", "segment", 1, "int8", _REF)]),
    p.make_control("fetch_graph", run="r1", round=2, device="d1", sha256=_REF.sha256,
                   missing=[0, 3]),
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(_VALID), st.lists(st.tuples(st.integers(0, 2), st.integers(0, 10**6),
                                                   st.integers(0, 255)), min_size=1, max_size=6))
def test_mutated_model_messages_are_refused_or_still_valid(valid, edits):
    """Flipped, dropped or inserted bytes: a ProtocolError, or a message whose every file name
    is still a bare .onnx name."""
    buf = bytearray(valid)
    for kind, pos, value in edits:
        i = pos % max(len(buf), 1)
        if kind == 0 and buf:
            buf[i] ^= value or 1
        elif kind == 1 and buf:
            del buf[i]
        else:
            buf.insert(i, value)
    try:
        msg = p.parse_control(bytes(buf))
    except p.ProtocolError:
        return
    for f in msg.get("files", []):
        assert p.GRAPH_FILE.fullmatch(f.file) and "/" not in f.file and not f.file.startswith(".")
