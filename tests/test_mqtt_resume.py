"""An honest device must not look hostile (issue 19, defect 5): a real ``DeviceAgent`` against a
real mosquitto, with the cloud's side played by a raw client so that every repeat is counted.
Repeated ``send`` replies (a reconnect burst) do not make it upload its update again, a
``send`` naming the missing chunks gets only those, and a broker restart costs one offer."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from mqtt_broker import Broker, RawClient

from cloud.config import RunConfig
from cloud.simulation import initial_state
from common import protocol as p
from common.models import tier_state
from common.mqtt_link import broker_settings
from device.agent import DeviceAgent

DEVICE, RUN = "dev-x", "run1"


class FakeCloud(RawClient):
    """The cloud's retained state and replies, published by hand."""

    def __init__(self, url: str) -> None:
        super().__init__(url, "hmf-cloud", [p.device_topic("+", name) for name in p.DEVICE_UP])
        state = tier_state(initial_state(RunConfig(model="hapt")), 1)
        self.blob = p.encode_state(state)
        self.ref = p.blob_ref(self.blob)
        self.deadline = time.time() + 600  # republished unchanged, as the cloud does

    def announce(self) -> None:
        for topic, payload in self.retained():
            self.link.publish(topic, payload, retain=True).wait_for_publish(5)

    def retained(self) -> list[tuple[str, bytes]]:
        train = {"epochs": 1, "batch_size": 8, "lr": 0.001}
        return [
            (p.cloud_topic("status"), p.make_control("status", state="online")),
            (p.cloud_topic("round"), p.make_control("round", run=RUN, round=1, rounds=1,
                                                    state="open", deadline=self.deadline)),
            (p.device_topic(DEVICE, "task"), p.make_control(
                "task", run=RUN, round=1, device=DEVICE, model="hapt", depth=1, width=1.0,
                seed=7, train=train, weights=self.ref, dtype="float32",
                deadline=self.deadline)),
        ]

    def reply(self, sha: str, status: str, missing: list[int] | None = None) -> None:
        self.publish(p.device_topic(DEVICE, "reply"), p.make_control(
            "reply", run=RUN, round=1, device=DEVICE, sha256=sha, status=status, reason="",
            missing=missing))

    def count(self, name: str, quiet: float) -> list[bytes]:
        """Messages on the device's ``name`` topic until none came for ``quiet`` seconds."""
        got = []
        while True:
            try:
                got.append(self.wait(p.device_topic(DEVICE, name), timeout=quiet))
            except AssertionError:
                return got


@pytest.fixture
def fleet_of_one(tmp_path):
    broker = Broker(tmp_path).start()
    cloud = FakeCloud(broker.url)
    cloud.announce()
    rng = np.random.default_rng(0)
    data = {"x": rng.normal(size=(16, 3, 151)).astype(np.float32),
            "y": rng.integers(0, 6, 16).astype(np.int64)}
    lines: list[str] = []
    agent = DeviceAgent(DEVICE, broker_settings(broker.url), data, tmp_path / "work",
                        retry_s=8, log=lines.append)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    yield broker, cloud, agent, lines
    agent.stopping = True
    thread.join(10)
    cloud.link.stop()
    broker.stop()


def test_repeated_sends_and_a_broker_restart_cost_no_duplicate_upload(fleet_of_one):
    broker, cloud, agent, lines = fleet_of_one
    fetch = p.parse_control(cloud.wait(p.device_topic(DEVICE, "request")), "fetch")
    assert fetch["sha256"] == cloud.ref.sha256
    for i in range(cloud.ref.chunks):
        cloud.publish(p.device_topic(DEVICE, "weights"),
                      p.chunk_frame(cloud.blob, cloud.ref, i, RUN, 1))
    offer = p.parse_control(cloud.wait(p.device_topic(DEVICE, "request"), timeout=60), "offer")
    ref = offer["blob"]
    assert ref.chunks >= 2
    for _ in range(3):  # the burst a reconnect used to cause: each "send" resent everything
        cloud.reply(ref.sha256, "send")
    assert len(cloud.count("update", quiet=2.0)) == ref.chunks
    cloud.reply(ref.sha256, "send", missing=[1])  # a resumed upload: only what is missing
    (frame,) = cloud.count("update", quiet=2.0)
    assert p.parse_chunk(frame).index == 1
    broker.stop()  # the device reconnects, sees the same cloud, and offers once
    broker.start()
    assert cloud.link.connected.wait(20)
    cloud.announce()
    # The device offers at once when it reconnects; if the cloud was not yet subscribed then,
    # that offer is lost and the device offers again after retry_s (8 s). Either way: one offer,
    # then none within a quiet spell.
    first = cloud.wait(p.device_topic(DEVICE, "request"), timeout=30)
    offers = [m for m in [first, *cloud.count("request", quiet=4.0)]
              if p.parse_control(m)["type"] == "offer"]
    assert len(offers) == 1, "\n".join(lines)
    cloud.reply(ref.sha256, "accepted")
    deadline = time.monotonic() + 10
    while not any("update accepted" in line for line in lines):
        assert time.monotonic() < deadline, "\n".join(lines)
        time.sleep(0.05)
    assert agent.phase == "idle"
