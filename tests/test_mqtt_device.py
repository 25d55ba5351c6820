"""The device agent's decisions, fed messages directly (no broker): which run's end makes it
leave, when it refuses a task, and that a trained update survives a restart of the process."""

from __future__ import annotations

import numpy as np
import pytest

from common import protocol as p
from common.mqtt_link import BrokerSettings
from device.agent import DeviceAgent, load_device_data

SHA = "ab" * 32


def agent(tmp_path, tier=None) -> DeviceAgent:
    data = {"x": np.zeros((4, 3, 151), np.float32), "y": np.zeros(4, np.int64)}
    a = DeviceAgent("dev-1", BrokerSettings("127.0.0.1", 1), data, tmp_path, tier=tier,
                    log=lambda _: None)
    a.sent = []
    a._send = lambda name, payload: a.sent.append((name, p.parse_control(payload)))
    return a


def round_msg(run: str, state: str, n: int = 1) -> bytes:
    return p.make_control("round", run=run, round=n, rounds=3, state=state, deadline=2e9)


def task_msg(run: str, n: int = 1, depth: int = 1) -> bytes:
    ref = p.BlobRef(SHA, 10, 1)
    return p.make_control("task", run=run, round=n, device="dev-1", model="hapt", depth=depth,
                          width=1.0, seed=7, train={"epochs": 1, "batch_size": 2, "lr": 0.1},
                          weights=ref, dtype="float32", deadline=2e9)


def test_only_the_end_of_a_run_it_saw_makes_a_device_leave(tmp_path):
    a = agent(tmp_path)
    a._on_message(p.cloud_topic("round"), round_msg("old", "finished"))  # retained, stale
    assert not a.stopping
    a._on_message(p.cloud_topic("round"), round_msg("new", "open"))
    a._on_message(p.cloud_topic("round"), round_msg("new", "finished"))
    assert a.stopping


def test_task_of_the_open_round_is_fetched_once_and_deeper_tasks_refused(tmp_path):
    a = agent(tmp_path)
    a._on_message(p.device_topic("dev-1", "task"), task_msg("r"))
    assert a.sent == []  # no round open yet
    a._on_message(p.cloud_topic("round"), round_msg("r", "open"))
    a._on_message(p.device_topic("dev-1", "task"), task_msg("r"))  # retained again: ignored
    assert [(n, m["type"], m["sha256"], m["missing"]) for n, m in a.sent] == [
        ("request", "fetch", SHA, None)]
    b = agent(tmp_path / "b", tier=1)
    b._on_message(p.cloud_topic("round"), round_msg("r", "open"))
    b._on_message(p.device_topic("dev-1", "task"), task_msg("r", depth=3))
    assert b.sent == [] and ("r", 1, "task") in b.done


def test_a_trained_update_is_offered_again_after_a_restart_not_retrained(tmp_path):
    a = agent(tmp_path)
    a._on_message(p.cloud_topic("round"), round_msg("r", "open"))
    task = p.parse_control(task_msg("r"), "task")
    a.result = {"key": ["r", 1, SHA, 7], "blob": b"trained", "samples": 4, "loss": 0.5,
                "local_acc": None}
    a._save_result()
    b = agent(tmp_path)  # a new process, same work dir
    assert b.result["blob"] == b"trained"
    b._on_message(p.cloud_topic("round"), round_msg("r", "open"))
    b._on_message(p.device_topic("dev-1", "task"), task_msg("r"))
    (name, offer), = b.sent
    assert offer["type"] == "offer" and offer["blob"] == p.blob_ref(b"trained")
    assert task["seed"] == 7


def test_device_data_must_have_x_and_y(tmp_path):
    np.savez(tmp_path / "bad.npz", x=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="x and y"):
        load_device_data(tmp_path / "bad.npz")
    np.savez(tmp_path / "ok.npz", x=np.zeros((2, 3)), y=np.array([0, 1]),
             test_x=np.zeros((1, 3)), test_y=np.array([1]))
    d = load_device_data(tmp_path / "ok.npz")
    assert d["x"].dtype == np.float32 and d["y"].dtype == np.int64 and len(d["test_y"]) == 1


def test_corrupt_weights_are_fetched_again_then_trained(tmp_path):
    import torch

    from common.models import build_model

    a = agent(tmp_path)
    a.data = {"x": np.zeros((4, 1, 28, 28), np.float32), "y": np.array([0, 1, 2, 3])}
    initial = build_model("mnist", depth=1).state_dict()
    weights = p.encode_state(initial)
    ref, frames = p.chunk_frames(weights, "r", 1, chunk_bytes=100_000)
    task = p.make_control("task", run="r", round=1, device="dev-1", model="mnist", depth=1,
                          width=1.0, seed=7, train={"epochs": 1, "batch_size": 2, "lr": 0.1},
                          weights=ref, dtype="float32", deadline=2e9)
    a._on_message(p.cloud_topic("round"), round_msg("r", "open"))
    a._on_message(p.device_topic("dev-1", "task"), task)
    topic = p.device_topic("dev-1", "weights")
    forged = p.chunk_frame(b"\x00" * len(weights), ref, 0, "r", 1)  # right header, wrong bytes
    a._on_message(topic, forged)
    for f in frames[1:-1]:
        a._on_message(topic, f)
    with pytest.raises(p.ProtocolError, match="checksum mismatch"):
        a._on_message(topic, frames[-1])
    assert a.phase == "fetching" and a.download.missing() == list(range(ref.chunks))
    for f in frames:
        a._on_message(topic, f)
    kinds = [m["type"] for _, m in a.sent]
    assert kinds == ["fetch", "offer"] and a.result["samples"] == 4
    trained = p.decode_state(a.result["blob"], p.spec_of(initial))[0]
    assert not torch.equal(trained["stem.conv1.weight"], initial["stem.conv1.weight"])
