"""fp16 transfer end to end (cloud and a device agent in threads, real mosquitto): half the bytes
on the wire each way, weights close to the fp32 run's, accuracy reported in both."""

from __future__ import annotations

import threading

import numpy as np
import torch
from mqtt_broker import Broker

from cloud.checkpoint import load_checkpoint
from cloud.config import RunConfig
from cloud.fleet import Fleet, FleetDevice
from cloud.runlog import read_metrics
from cloud.server import CloudOptions, FleetCloud
from cloud.simulation import initial_state
from common.mqtt_link import broker_settings
from device.agent import DeviceAgent


def run_fleet(tmp, dtype: str) -> tuple[dict, dict[str, torch.Tensor]]:
    broker = Broker(tmp).start()
    try:
        rng = np.random.default_rng(0)
        x, y = rng.normal(size=(40, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, 40)
        np.savez(tmp / "eval.npz", x=x, y=y)
        # one device: devices in threads of one process would share torch's global RNG
        fleet = Fleet([FleetDevice("d3", 3)])
        cfg = RunConfig(model="mnist", strategy="depthwise", clients=1, participants=1,
                        tier_mix=(0.0, 0.0, 1.0), rounds=1, local_epochs=1, batch_size=8,
                        seed=2)
        opts = CloudOptions(min_updates=1, round_timeout=60, transfer_dtype=dtype,
                            wait_devices=1, eval_data=str(tmp / "eval.npz"))
        settings = broker_settings(broker.url)
        cloud = FleetCloud(cfg, fleet, tmp / "run", settings, opts, log=lambda _: None)
        agents = [DeviceAgent(d.id, settings, {"x": x, "y": y.astype(np.int64)},
                              tmp / d.id, retry_s=2, log=lambda _: None) for d in fleet.devices]
        threads = [threading.Thread(target=a.run, daemon=True) for a in agents]
        threads.append(threading.Thread(target=cloud.run, daemon=True))
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert not any(t.is_alive() for t in threads)
    finally:
        broker.stop()
    (row,) = read_metrics(tmp / "run")
    return row, load_checkpoint(tmp / "run")[1]


def test_fp16_transfer_halves_the_bytes(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    row32, state32 = run_fleet(tmp_path / "a", "float32")
    row16, state16 = run_fleet(tmp_path / "b", "float16")
    assert row16["transfer_dtype"] == "float16"
    assert row16["participants"] == row32["participants"] == {"1": 0, "2": 0, "3": 1}
    for key in ("bytes_up", "bytes_down"):
        assert 0.49 < row16[key] / row32[key] < 0.52, (key, row16[key], row32[key])
    # Adam moves these small weights by 30-120 % in one round; fp16's rounding of what was
    # sent must change the outcome by much less than training itself moved it
    start = initial_state(RunConfig(model="mnist", clients=1, participants=1, seed=2))
    for k, w32 in state32.items():
        if k.endswith("weight"):
            moved = (w32.double() - start[k].double()).norm()
            assert 0 < (state16[k].double() - w32.double()).norm() < 0.5 * moved, k
    assert all(v is not None for v in row16["acc"]["global"].values())
