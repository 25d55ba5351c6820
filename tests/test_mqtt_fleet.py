"""Real fleets against a real mosquitto: the cloud and every device run as their console scripts
(``hmf-cloud start``, ``hmf-device join``) in their own processes, on tiny real HAPT data.

Each test compares the fleet's final global weights with ``hmf simulate``'s for the same
settings (to 1e-6), so a lost, repeated or wrongly aggregated round would show as a number."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from mqtt_broker import Broker, Proc, retained_presence

from cloud.checkpoint import load_checkpoint
from cloud.config import RunConfig
from cloud.fleet import Fleet, write_partition
from cloud.runlog import read_metrics
from cloud.simulation import Simulation
from common import protocol as p

SETTINGS = dict(model="hapt", partition="iid", local_epochs=1, batch_size=32, lr=5e-3,
                hypernet_epochs=2, rank=16, hidden=32, seed=3, strategy="hypemefed")


def config(data_dir: Path, **kw) -> RunConfig:
    return RunConfig(data_dir=str(data_dir), **{**SETTINGS, **kw})


def simulate(cfg: RunConfig, out: Path) -> dict[str, torch.Tensor]:
    """The reference, single-threaded like the fleet's processes (same float reductions)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Simulation(cfg, out, lambda _: None).run()
    finally:
        torch.set_num_threads(threads)
    return load_checkpoint(out)[1]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def method_args(cfg: RunConfig) -> list[str]:
    """The method's recipe settings of ``cfg`` as flags: the cloud's default recipe (hmf) is not
    RunConfig's (paper), and a fleet must run exactly the reference's settings."""
    args = ["--recipe", "paper", "--untrained", cfg.untrained,
            "--hypernet-gate" if cfg.hypernet_gate else "--no-hypernet-gate"]
    if cfg.static_bn is not None:
        args.append("--static-bn" if cfg.static_bn else "--no-static-bn")
    return args


class FleetRun:
    """Broker, partitioned data, a cloud and devices, all cleaned up at the end."""

    def __init__(self, tmp: Path, cfg: RunConfig) -> None:
        self.tmp, self.cfg = tmp, cfg
        self.broker = Broker(tmp).start()
        self.part = tmp / "part"
        self.fleet: Fleet = write_partition(cfg, self.part)
        self.out = tmp / "run"
        self.procs: list[Proc] = []
        self.cloud: Proc | None = None

    def start_cloud(self, *extra: str, tag: str = "cloud") -> Proc:
        c = self.cfg
        args = ["hmf-cloud", "start", "--broker", self.broker.url,
                "--fleet", str(self.part / "fleet.json"), "--model", c.model,
                "--strategy", c.strategy, "--rounds", str(c.rounds),
                "--participants", str(c.participants), "--local-epochs", str(c.local_epochs),
                "--batch-size", str(c.batch_size), "--lr", str(c.lr),
                "--hypernet-epochs", str(c.hypernet_epochs), "--rank", str(c.rank),
                "--hidden", str(c.hidden), "--seed", str(c.seed), *method_args(c),
                "--eval-data", str(self.part / "eval.npz"), "--threads", "1",
                "--out", str(self.out), *extra]
        self.cloud = self._spawn(tag, args)
        return self.cloud

    def start_device(self, device: str, tag: str | None = None) -> Proc:
        return self._spawn(tag or device, [
            "hmf-device", "join", "--broker", self.broker.url, "--device-id", device,
            "--data", str(self.part / f"{device}.npz"), "--work-dir", str(self.tmp / device),
            "--threads", "1", "--retry-s", "2"])

    def _spawn(self, tag: str, args: list[str]) -> Proc:
        proc = Proc(tag, args, self.tmp / f"{tag}.log")
        self.procs.append(proc)
        return proc

    def all_devices_to_the_end(self, cloud: Proc) -> None:
        """Every fleet device joins; the cloud finishes the run and every device leaves."""
        devices = [self.start_device(d.id) for d in self.fleet.devices]
        assert cloud.wait(150) == 0, cloud.text()
        for d in devices:
            assert d.wait(20) == 0

    def close(self) -> None:
        for proc in self.procs:
            proc.stop()
        self.broker.stop()


@pytest.fixture
def fleet_run(request, tmp_path):
    runs: list[FleetRun] = []

    def make(cfg: RunConfig) -> FleetRun:
        runs.append(FleetRun(tmp_path, cfg))
        return runs[-1]

    yield make
    for r in runs:
        r.close()


@pytest.fixture(scope="module")
def three_device_reference(tiny_hapt, tmp_path_factory):
    """hmf simulate with 3 clients (tiers 1, 2, 3), all taking part, 2 rounds."""
    cfg = config(tiny_hapt, clients=3, participants=3, rounds=2)
    return cfg, simulate(cfg, tmp_path_factory.mktemp("sim3"))


def test_one_round_equals_hmf_simulate(tiny_hapt, tmp_path, fleet_run):
    """6 clients, 3 drawn a round: the cloud draws the simulator's participants (devices by
    fleet-file index), sends its seeds, and aggregates to the simulator's weights."""
    cfg = config(tiny_hapt, clients=6, participants=3, rounds=1)
    reference = simulate(cfg, tmp_path / "sim")
    run = fleet_run(cfg)
    chosen = run.fleet.federation(cfg.participants, cfg.tier_mix).participants(cfg.seed, 1)
    assert sorted(t for _, t in chosen) == [1, 2, 3]
    cloud = run.start_cloud("--min-updates", "3", "--round-timeout", "120")
    devices = [run.start_device(run.fleet.devices[c].id) for c, _ in chosen]
    assert cloud.wait(150) == 0, cloud.text()
    for d in devices:
        assert d.wait(20) == 0  # the run's end tells devices to leave
        assert "update accepted" in d.text()
    _, state, _ = load_checkpoint(run.out)
    assert max_diff(state, reference) <= 1e-6
    (row,) = read_metrics(run.out)
    sim_row = read_metrics(tmp_path / "sim")[0]
    assert row["participants"] == sim_row["participants"] == {"1": 1, "2": 1, "3": 1}
    assert row["generated_tensors"] == sim_row["generated_tensors"] == 6
    assert row["hypernet_pairs"] == sim_row["hypernet_pairs"]
    assert abs(row["train_loss"] - sim_row["train_loss"]) < 1e-6
    assert json.loads((run.out / "summary.json").read_text())["rounds"] == 1
    assert "round   1/1" in cloud.text() and "updates t1:1/1 t2:1/1 t3:1/1" in cloud.text()


def test_depthfl_devices_train_the_simulators_distillation_loss(tiny_hapt, tmp_path, fleet_run):
    """The task's ``train`` carries the strategy's loss (DepthFL's mutual self-distillation):
    devices train exactly what the simulator trains, so weights and loss match it. With a
    server learning rate, which the cloud applies to the streamed aggregate as the simulator
    does to its own."""
    cfg = config(tiny_hapt, clients=3, participants=3, rounds=1, strategy="depthfl",
                 server_lr=0.5)
    reference = simulate(cfg, tmp_path / "sim")
    run = fleet_run(cfg)
    run.all_devices_to_the_end(
        run.start_cloud("--min-updates", "3", "--round-timeout", "120", "--server-lr", "0.5"))
    _, state, _ = load_checkpoint(run.out)
    assert max_diff(state, reference) <= 1e-6
    (row,), (sim_row,) = read_metrics(run.out), read_metrics(tmp_path / "sim")
    assert abs(row["train_loss"] - sim_row["train_loss"]) < 1e-6


def test_killed_device_round_closes_at_deadline_and_device_rejoins(tiny_hapt, fleet_run):
    cfg = config(tiny_hapt, clients=3, participants=3, rounds=2)
    run = fleet_run(cfg)
    deep = next(d.id for d in run.fleet.devices if d.tier == 3)
    cloud = run.start_cloud("--min-updates", "2", "--round-timeout", "15",
                            "--wait-devices", "3")
    devices = {d.id: run.start_device(d.id) for d in run.fleet.devices}
    devices[deep].wait_for("round 1: task depth 3; downloading", timeout=90)
    devices[deep].kill()  # mid-round: it has not trained yet
    cloud.wait_for(f"device {deep} offline", timeout=30)
    cloud.wait_for("round   1/2", timeout=60)
    again = run.start_device(deep, tag=f"{deep}-again")
    assert cloud.wait(120) == 0, cloud.text()
    rows = read_metrics(run.out)
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[0]["participants"] == {"1": 1, "2": 1, "3": 0}
    assert rows[0]["elapsed_s"] >= 15 - 1  # closed by the deadline, with 2 >= min-updates
    assert rows[1]["participants"] == {"1": 1, "2": 1, "3": 1}
    assert "round 2: update accepted" in again.text()


def test_cloud_killed_between_rounds_resumes_without_losing_a_round(
        three_device_reference, fleet_run):
    cfg, reference = three_device_reference
    run = fleet_run(cfg)
    cloud = run.start_cloud("--min-updates", "3", "--round-timeout", "120")
    devices = [run.start_device(d.id) for d in run.fleet.devices]
    cloud.wait_for("round   1/2", timeout=120)
    cloud.kill()
    assert [r["round"] for r in read_metrics(run.out)] == [1]
    resumed = run.start_cloud("--min-updates", "3", "--round-timeout", "120", "--resume",
                              tag="cloud-resumed")
    assert resumed.wait(120) == 0, resumed.text()
    assert "resuming run" in resumed.text()
    for d in devices:
        assert d.wait(20) == 0, d.text()  # reconnected to the new cloud by themselves
    rows = read_metrics(run.out)
    assert [r["round"] for r in rows] == [1, 2]
    assert max_diff(load_checkpoint(run.out)[1], reference) <= 1e-6


def test_broker_restart_mid_run(three_device_reference, fleet_run):
    cfg, reference = three_device_reference
    run = fleet_run(cfg)
    cloud = run.start_cloud("--min-updates", "3", "--round-timeout", "120")
    devices = [run.start_device(d.id) for d in run.fleet.devices]
    cloud.wait_for("round 2: 3 tasks", timeout=120)
    run.broker.stop()
    cloud.wait_for("lost the broker", timeout=20)
    run.broker.start()
    assert cloud.wait(120) == 0, cloud.text()
    for d in devices:
        assert d.wait(20) == 0, d.text()
        assert "reconnecting with backoff" in d.text()
    assert cloud.text().count("connected to the broker") >= 2
    rows = read_metrics(run.out)
    assert [r["round"] for r in rows] == [1, 2]
    assert max_diff(load_checkpoint(run.out)[1], reference) <= 1e-6


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_device_leaves_cleanly_on_a_signal(tiny_hapt, tmp_path, sig):
    """A device between rounds (here: no cloud yet) exits 0 on SIGTERM/SIGINT and leaves a
    retained 'bye' (reason 'left', not the last will's 'connection lost')."""
    broker = Broker(tmp_path).start()
    try:
        np.savez(tmp_path / "d.npz", x=np.zeros((4, 3, 151), np.float32), y=np.zeros(4))
        device = Proc("dev", ["hmf-device", "join", "--broker", broker.url, "--device-id", "d1",
                              "--data", str(tmp_path / "d.npz"), "--work-dir",
                              str(tmp_path / "w")], tmp_path / "dev.log")
        device.wait_for("connected; hello sent", timeout=60)
        device.proc.send_signal(sig)
        assert device.wait(20) == 0, device.text()
        msg = p.parse_control(retained_presence(broker.url, "d1"), "bye")
        assert msg == {"type": "bye", "device": "d1", "reason": "left"}
    finally:
        broker.stop()
