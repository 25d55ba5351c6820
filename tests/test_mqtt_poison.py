"""Poisoned updates against a running cloud through a real mosquitto (issue 19, defect 2): one
device of three uploads well-formed, finite weights multiplied by 1e30. By default its influence
is bounded (its deviation clipped to 3x the median of the round's); with a robust rule the
aggregate ignores it; with neither, the global model is ruined (what the tests would catch)."""

from __future__ import annotations

import threading

import pytest
import torch
from mqtt_broker import Broker
from test_mqtt_hostile import Impostor, cloud_state

from cloud.config import RunConfig
from cloud.fleet import Fleet, FleetDevice
from cloud.runlog import read_metrics
from cloud.server import CloudOptions, FleetCloud
from common import protocol as p
from common.mqtt_link import broker_settings

DEVICES = ("dev-a", "dev-b", "dev-c")
NOISE = 0.01  # the honest devices' deviation from the global model (RMS per tensor)


def _honest(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + NOISE * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
            for k, v in state.items()}


def _scaled(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v * 1e30 if v.is_floating_point() else v for k, v in state.items()}


def _play(bad: Impostor, rounds: int) -> None:
    """Every round: dev-a and dev-b train honestly (global + noise), dev-c scales by 1e30."""
    for r in range(1, rounds + 1):
        of_round = lambda m: p.parse_control(m, "task")["round"] == r  # noqa: B023,E731
        tasks = {d: p.parse_control(bad.wait(p.device_topic(d, "task"), of_round), "task")
                 for d in DEVICES}
        for i, (device, task) in enumerate(tasks.items()):
            bad.send(device, "request", p.make_control(
                "fetch", run=task["run"], round=task["round"], device=device,
                sha256=task["weights"].sha256, missing=None))
            weights = p.Reassembly(task["weights"])
            while not weights.complete:
                weights.add(p.parse_chunk(bad.wait(p.device_topic(device, "weights"))))
            state, _ = p.decode_state(weights.blob(), _spec(task))
            trained = _scaled(state) if device == "dev-c" else _honest(state, 10 * i
                                                                         + task["round"])
            blob = p.encode_state(trained, meta={"run": task["run"], "round": task["round"],
                                                 "device": device})
            ref = p.blob_ref(blob)
            bad.send(device, "request", p.make_control(
                "offer", run=task["run"], round=task["round"], device=device, blob=ref,
                samples=10, loss=1.0, local_acc=None))
            reply = p.parse_control(bad.wait(p.device_topic(device, "reply")), "reply")
            assert reply["status"] == "send", reply
            for k in range(ref.chunks):
                bad.send(device, "update", p.chunk_frame(blob, ref, k, task["run"],
                                                         task["round"]))
            reply = p.parse_control(bad.wait(p.device_topic(device, "reply")), "reply")
            assert reply["status"] == "accepted", reply


def _spec(task: dict) -> p.TensorSpec:
    from common.models import build_model, tier_state

    return p.spec_of(tier_state(build_model("mnist", depth=task["depth"]).state_dict(),
                                task["depth"]))


@pytest.mark.parametrize("setting", [
    {},  # the default: bounded influence, weighted mean
    {"aggregation": "median", "clip_factor": 0.0},
    {"aggregation": "trimmed-mean", "trim": 0.34, "clip_factor": 0.0},
    {"clip_factor": 0.0},  # no defence: the check below must see the damage
], ids=["default-clip", "median", "trimmed-mean", "undefended"])
def test_one_poisoned_device_moves_the_model_by_a_bounded_amount(tmp_path, setting):
    broker = Broker(tmp_path).start()
    undefended = setting.get("clip_factor") == 0.0 and "aggregation" not in setting
    cfg = RunConfig(model="mnist", strategy="depthwise", clients=3, participants=3,
                    tier_mix=(1.0, 0.0, 0.0), rounds=1 if undefended else 2, seed=1, **setting)
    fleet = Fleet([FleetDevice(d, 1) for d in DEVICES])
    lines: list[str] = []
    opts = CloudOptions(min_updates=3, round_timeout=120, wait_devices=0)
    cloud = FleetCloud(cfg, fleet, tmp_path / "run", broker_settings(broker.url), opts,
                       log=lines.append)
    thread = threading.Thread(target=cloud.run, daemon=True)
    bad = Impostor(broker.url)
    from cloud.simulation import initial_state

    start = initial_state(cfg)
    try:
        thread.start()
        _play(bad, cfg.rounds)
        thread.join(60)
        assert not thread.is_alive(), "\n".join(lines)
    finally:
        bad.link.stop()
        broker.stop()
    final = cloud_state(tmp_path / "run")
    moved = max(float((final[k].double() - start[k].double()).square().mean().sqrt())
                for k in final if final[k].is_floating_point())
    rows = read_metrics(tmp_path / "run")
    if undefended:  # one round is enough: the 1e30 update is in the global model
        assert moved > 1e20
        return
    # two honest rounds move a tensor by about NOISE each; the attacker adds at most
    # 3 x NOISE / 3 devices per round when clipped, nothing under a robust rule
    assert moved < 2 * (NOISE + NOISE), moved
    if "aggregation" not in setting:
        assert [r["clipped"]["updates"] for r in rows] == [1, 1]
        assert all(r["clipped"]["max_ratio"] > 1e25 for r in rows)
