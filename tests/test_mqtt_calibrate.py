"""Static BatchNorm in a real fleet: devices recompute the new global model's BatchNorm
statistics on their own data and upload only statistics, which the cloud combines
(cloud/calibration.py). Against a real mosquitto: the fleet ends with ``hmf simulate
--static-bn``'s weights and statistics, and hostile statistics are refused."""

from __future__ import annotations

import threading

import pytest
import torch
from test_mqtt_fleet import FleetRun, config, max_diff, simulate
from test_mqtt_hostile import Impostor, cloud_state, cloud_tasks

from cloud.aggregation import static_bn_statistics
from cloud.calibration import combine_bn_statistics
from cloud.checkpoint import load_checkpoint
from cloud.config import RunConfig
from cloud.fleet import Fleet, FleetDevice
from cloud.runlog import read_metrics
from cloud.server import CloudOptions, FleetCloud
from cloud.simulation import initial_state
from common import protocol as p
from common.calibration import batches, bn_statistics, bn_statistics_of
from common.models import tier_state
from common.mqtt_link import broker_settings


def test_combine_weights_each_device_by_its_batch_count():
    """Two devices, 2 and 1 batches: by hand, mean = (2 * m_a + m_b) / 3, likewise the
    variance; the count is 3; other tensors are untouched."""
    state = {"bn.weight": torch.tensor([1.0, 1.0]), "bn.running_mean": torch.zeros(2),
             "bn.running_var": torch.ones(2), "bn.num_batches_tracked": torch.tensor(7)}
    a = {"bn.running_mean": torch.tensor([1.0, 2.0]), "bn.running_var": torch.tensor([1.0, 1.0]),
         "bn.num_batches_tracked": torch.tensor(2)}
    b = {"bn.running_mean": torch.tensor([4.0, 5.0]), "bn.running_var": torch.tensor([4.0, 1.0]),
         "bn.num_batches_tracked": torch.tensor(1)}
    out = combine_bn_statistics(state, [a, b])
    assert torch.equal(out["bn.running_mean"], torch.tensor([2.0, 3.0]))
    assert torch.equal(out["bn.running_var"], torch.tensor([2.0, 1.0]))
    assert out["bn.num_batches_tracked"].item() == 3
    assert out["bn.num_batches_tracked"].dtype == torch.int64
    assert out["bn.weight"] is state["bn.weight"]
    assert combine_bn_statistics(state, []) == state  # nobody answered: unchanged


def test_devices_statistics_combine_to_the_simulators_over_all_batches():
    """Devices with 300 and 520 samples (2 and 3 batches of up to 256) give, combined, what the
    simulator's one pass over both devices' batches in order gives."""
    torch.manual_seed(0)
    state = initial_state(RunConfig(model="hapt", seed=1))
    xa, xb = torch.randn(300, 3, 151), torch.randn(520, 3, 151) * 2 + 1
    reference = static_bn_statistics("hapt", state, [*batches(xa), *batches(xb)])
    combined = combine_bn_statistics(state, [bn_statistics("hapt", state, batches(xa)),
                                             bn_statistics("hapt", state, batches(xb))])
    assert max_diff(combined, reference) <= 1e-5
    assert combined["stem.bn1.num_batches_tracked"].item() == 5


@pytest.fixture(scope="module")
def static_bn_reference(tiny_hapt, tmp_path_factory):
    """By strategy, hmf simulate --static-bn with 3 clients (tiers 1, 2, 3), all taking part,
    2 rounds: (config, final state), simulated once per module."""
    made: dict[str, tuple[RunConfig, dict[str, torch.Tensor]]] = {}

    def get(strategy: str) -> tuple[RunConfig, dict[str, torch.Tensor]]:
        if strategy not in made:
            cfg = config(tiny_hapt, clients=3, participants=3, rounds=2, static_bn=True,
                         strategy=strategy)
            made[strategy] = cfg, simulate(cfg, tmp_path_factory.mktemp(f"sim-{strategy}"))
        return made[strategy]

    return get


def assert_same_state(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]
                      ) -> None:
    assert state.keys() == reference.keys()
    for k, v in state.items():  # variances reach ~2600: float32 rounding is relative
        torch.testing.assert_close(v, reference[k], rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.parametrize("strategy", ["hypemefed", "heterofl"])
def test_static_bn_fleet_equals_hmf_simulate_static_bn(static_bn_reference, tmp_path, strategy):
    """2 rounds of 3 devices (tiers 1-3) with --static-bn: after each round's aggregate every
    device recomputes the statistics on its data; the final global weights and BatchNorm
    statistics are the simulator's, which recomputes them from all participants' data.
    heterofl (width-scaled tasks, static BN by default) runs over MQTT too."""
    cfg, reference = static_bn_reference(strategy)
    run = FleetRun(tmp_path, cfg)
    try:
        cloud = run.start_cloud("--min-updates", "3", "--round-timeout", "120", "--static-bn")
        devices = [run.start_device(d.id) for d in run.fleet.devices]
        assert cloud.wait(240) == 0, cloud.text()
        for d in devices:
            assert d.wait(20) == 0, d.text()
            assert d.text().count("BatchNorm statistics accepted") == 2, d.text()
    finally:
        run.close()
    state = load_checkpoint(run.out)[1]
    assert_same_state(state, reference)
    assert max_diff(bn_statistics_of(state), bn_statistics_of(initial_state(cfg))) > 1e-2
    assert state["stem.bn1.num_batches_tracked"] == reference["stem.bn1.num_batches_tracked"]
    rows = read_metrics(run.out)
    assert [r["calibration"]["answered"] for r in rows] == [3, 3]
    stats_bytes = len(p.encode_state(bn_statistics_of(state)))
    assert all(r["bytes_up"] > 3 * stats_bytes for r in rows)


def test_cloud_killed_while_devices_calibrate_redoes_the_round(static_bn_reference, tmp_path):
    """A cloud killed once round 2's calibration has begun resumes from round 1's checkpoint
    and redoes round 2: devices offer their kept updates again (no retraining), calibrate
    again, and the run ends with the simulator's weights and statistics."""
    cfg, reference = static_bn_reference("hypemefed")
    run = FleetRun(tmp_path, cfg)
    try:
        cloud = run.start_cloud("--min-updates", "3", "--round-timeout", "120", "--static-bn")
        devices = [run.start_device(d.id) for d in run.fleet.devices]
        cloud.wait_for("round 2: 3 devices recompute BatchNorm statistics", timeout=120)
        cloud.kill()
        resumed = run.start_cloud("--min-updates", "3", "--round-timeout", "120",
                                  "--static-bn", "--resume", tag="cloud-resumed")
        assert resumed.wait(120) == 0, resumed.text()
        assert "after round 1" in resumed.text()
        for d in devices:
            assert d.wait(20) == 0, d.text()
            assert "round 2: update already computed, offering it" in d.text()
    finally:
        run.close()
    assert [r["round"] for r in read_metrics(run.out)] == [1, 2]
    assert_same_state(load_checkpoint(run.out)[1], reference)


def _upload(bad: Impostor, device: str, blob: bytes, run: str, rnd: int) -> str:
    """Offer ``blob``, send its chunks once granted; the cloud's verdict as 'status: reason'."""
    ref = p.blob_ref(blob)
    bad.send(device, "request", p.make_control("offer", run=run, round=rnd, device=device,
                                               blob=ref, samples=10, loss=None, local_acc=None))
    about = lambda m: p.parse_control(m, "reply")["sha256"] == ref.sha256  # noqa: E731
    reply = p.parse_control(bad.wait(f"hmf/v1/devices/{device}/reply", about), "reply")
    if reply["status"] == "send":
        for i in range(ref.chunks):
            bad.send(device, "update", p.chunk_frame(blob, ref, i, run, rnd))
        reply = p.parse_control(bad.wait(f"hmf/v1/devices/{device}/reply", about), "reply")
    return f"{reply['status']}: {reply['reason']}"


class OneDeviceCloud:
    """A static-BN cloud (in a thread) with one tier-1 task a round, whose device is played by
    a raw client: it has uploaded a valid update and been asked to calibrate."""

    def __init__(self, tmp_path, round_timeout: float) -> None:
        from mqtt_broker import Broker

        self.broker = Broker(tmp_path).start()
        self.out = tmp_path / "run"
        cfg = RunConfig(model="mnist", strategy="depthwise", clients=2, participants=1,
                        tier_mix=(1.0, 0.0, 0.0), rounds=1, seed=1, static_bn=True)
        fleet = Fleet([FleetDevice("dev-a", 1), FleetDevice("dev-b", 1)])
        self.lines: list[str] = []
        cloud = FleetCloud(cfg, fleet, self.out, broker_settings(self.broker.url),
                           CloudOptions(min_updates=1, round_timeout=round_timeout,
                                        wait_devices=0), log=self.lines.append)
        self.thread = threading.Thread(target=cloud.run, daemon=True)
        self.bad = Impostor(self.broker.url)
        self.me = cloud_tasks(cfg, fleet)
        self.thread.start()
        task = p.parse_control(self._wait_for("task"), "task")
        self.run, self.rnd = task["run"], task["round"]
        self.update = {k: v + 0.5 if v.is_floating_point() else v
                       for k, v in tier_state(initial_state(cfg), 1).items()}
        assert self.upload(self.update) == "accepted: "
        job = p.parse_control(self._wait_for("calibrate"), "calibrate")
        assert (job["run"], job["round"], job["model"]) == (self.run, self.rnd, "mnist")
        self.stats = bn_statistics_of(initial_state(cfg))  # the right names and shapes

    def _wait_for(self, kind: str) -> bytes:
        return self.bad.wait(f"hmf/v1/devices/{self.me}/task",
                             lambda m: p.parse_control(m)["type"] == kind)

    def upload(self, state: dict[str, torch.Tensor]) -> str:
        meta = {"run": self.run, "round": self.rnd, "device": self.me}
        return _upload(self.bad, self.me, p.encode_state(state, meta=meta), self.run, self.rnd)

    def finish(self) -> dict[str, torch.Tensor]:
        """Wait for the run's end; the final global state."""
        self.thread.join(60)
        assert not self.thread.is_alive(), "\n".join(self.lines)
        return cloud_state(self.out)

    def close(self) -> None:
        self.bad.link.stop()
        self.broker.stop()


def test_hostile_statistics_are_refused_and_the_run_finishes(tmp_path):
    """Statistics with a wrong shape, NaN, an unknown tensor name, a negative variance and
    uneven batch counts are each refused with their reason; the one valid upload becomes the
    global statistics."""
    fleet = OneDeviceCloud(tmp_path, round_timeout=120)
    try:
        good = {k: (v + 0.25 if v.is_floating_point() else torch.full_like(v, 2))
                for k, v in fleet.stats.items()}
        mean, var = "blocks.0.bn1.running_mean", "blocks.0.bn1.running_var"
        hostile = {
            "tensor shape": {**good, mean: good[mean][:3]},
            "non-finite values": {**good, mean: good[mean].clone().fill_(float("nan"))},
            "tensor names": {**good, "blocks.0.bn9.running_mean": good[mean]},
            "bad statistics (variance)": {**good, var: -good[var]},
            "bad statistics (counts)": {**good, "stem.bn1.num_batches_tracked": torch.tensor(5)},
        }
        for reason, stats in hostile.items():
            verdict = fleet.upload(stats)
            assert verdict.startswith(f"rejected: {reason.split(' (')[0]}"), (reason, verdict)
        assert fleet.upload(good) == "accepted: "
        final = fleet.finish()
    finally:
        fleet.close()
    (row,) = read_metrics(fleet.out)
    assert {"tensor shape", "non-finite values", "tensor names", "bad statistics"} <= set(
        row["rejected"])
    assert row["calibration"]["answered"] == 1
    for k, v in good.items():
        assert torch.equal(final[k], v), k  # exactly the valid statistics
    assert torch.equal(final["blocks.0.conv1.weight"], fleet.update["blocks.0.conv1.weight"])


def test_without_statistics_by_the_deadline_the_aggregates_stay(tmp_path):
    """A device that never sends statistics is left out at the deadline (logged); with nobody
    answering, the aggregate's statistics (here the update's) stay."""
    fleet = OneDeviceCloud(tmp_path, round_timeout=4)
    try:
        final = fleet.finish()
    finally:
        fleet.close()
    logged = "\n".join(fleet.lines)
    assert f"no statistics from {fleet.me} by the deadline" in logged
    assert "no device sent statistics: the aggregate's BatchNorm statistics stay" in logged
    (row,) = read_metrics(fleet.out)
    assert row["calibration"] == {"asked": 1, "answered": 0, "s": row["calibration"]["s"]}
    for k, v in bn_statistics_of(fleet.update).items():
        assert torch.equal(final[k], v), k
