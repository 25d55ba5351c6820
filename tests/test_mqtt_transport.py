"""The transport against a real mosquitto: chunked blobs arrive intact through the broker, and
the generated broker configuration refuses anonymous clients and keeps devices to their own
topics."""

from __future__ import annotations

import base64
import getpass
import queue
import time

import paho.mqtt.client as mqtt
import pytest
from mqtt_broker import Broker, free_port
from paho.mqtt.enums import CallbackAPIVersion

from cloud.broker_config import CLOUD_USER, password_hash, write_broker_config
from common import protocol as p
from common.mqtt_link import Link, broker_settings


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path).start()
    yield b
    b.stop()


@pytest.fixture
def secure_broker(tmp_path):
    port = free_port()
    paths = write_broker_config(tmp_path / "broker", ["dev-a", "dev-b"], port=port,
                                bind="127.0.0.1", run_as=getpass.getuser())
    b = Broker(tmp_path, paths["conf"], port).start()
    b.secrets = paths["secrets"]
    yield b
    b.stop()


def messages(link: Link, want: int, timeout: float = 10.0) -> list[tuple[str, bytes]]:
    got, deadline = [], time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        try:
            ev = link.events.get(timeout=0.1)
        except queue.Empty:
            continue
        if ev[0] == "message":
            got.append((ev[1], ev[2]))
    return got


def wait_connected(*links: Link, timeout: float = 10.0) -> None:
    for link in links:
        assert link.connected.wait(timeout), "no connection to the broker"
    time.sleep(0.2)  # SUBACKs


def test_password_hash_matches_mosquitto_format():
    # a line mosquitto_passwd 2.0.11 wrote for alice / secret
    line = ("$7$101$DycOg449cffO6XHG$An8MaOf5KrY9KCcZbTm3tuLu8TL9AgOagFehvSZw3f0A04/kGLEYbEc9W2V"
            "QnZNhEZtnFTSUZqZvJ1UD2PRXLw==")
    assert password_hash("secret", salt=base64.b64decode("DycOg449cffO6XHG")) == line


def test_a_chunked_blob_crosses_the_broker_intact(broker):
    blob = bytes(range(256)) * 10_000  # 2.56 MB: 3 chunks
    ref, frames = p.chunk_frames(blob, "run", 1)
    settings = broker_settings(broker.url)
    rx = Link("rx", settings, [p.device_topic("+", "update")])
    tx = Link("tx", settings, [])
    rx.start()
    tx.start()
    try:
        wait_connected(rx, tx)
        for f in frames + frames[:1]:  # a duplicate, as QoS 1 may deliver
            tx.publish(p.device_topic("d1", "update"), f)
        got = messages(rx, len(frames) + 1)
        r = p.Reassembly(ref)
        added = [r.add(p.parse_chunk(payload)) for topic, payload in got]
        assert {t for t, _ in got} == {"hmf/v1/devices/d1/update"}
        assert added.count(True) == 3 and added.count(False) == 1
        assert r.blob() == blob
    finally:
        rx.stop()
        tx.stop()


def _raw_connect(broker: Broker, user: str | None, password: str | None):
    refused: queue.Queue = queue.Queue()
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=user or "anon")
    if user:
        c.username_pw_set(user, password)
    c.on_connect = lambda cl, ud, fl, rc, pr: refused.put(rc.is_failure)
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    try:
        return refused.get(timeout=5)
    finally:
        c.disconnect()
        c.loop_stop()


def test_generated_config_refuses_anonymous_and_wrong_passwords(secure_broker):
    secret = (secure_broker.secrets / "dev-a.txt").read_text().strip()
    assert _raw_connect(secure_broker, None, None) is True
    assert _raw_connect(secure_broker, "dev-a", "wrong") is True
    assert _raw_connect(secure_broker, "dev-a", secret) is False


def test_a_device_cannot_publish_to_another_devices_topics(secure_broker, tmp_path):
    def link(user: str, subs: list[str]) -> Link:
        settings = broker_settings(secure_broker.url, username=user,
                                   password_file=str(secure_broker.secrets / f"{user}.txt"))
        return Link(user, settings, subs)

    cloud = link(CLOUD_USER, [p.device_topic("+", "+")])
    dev_a = link("dev-a", [p.device_topic("dev-b", "task"), p.device_topic("dev-a", "task")])
    links = (cloud, dev_a)
    for x in links:
        x.start()
    try:
        wait_connected(*links)
        dev_a.publish(p.device_topic("dev-b", "update"), b"A: forged")  # denied
        dev_a.publish(p.device_topic("dev-b", "presence"), b"A: forged")  # denied
        dev_a.publish(p.device_topic("dev-a", "task"), b"A: own task")  # denied
        dev_a.publish(p.device_topic("dev-a", "update"), b"A: own update")  # allowed
        cloud.publish(p.device_topic("dev-b", "task"), b"b's task")  # a may not read it
        cloud.publish(p.device_topic("dev-a", "task"), b"a's task")
        got_cloud = messages(cloud, 10, timeout=3)
        got_a = messages(dev_a, 10, timeout=1)
        from_a = [(t, m) for t, m in got_cloud if m.startswith(b"A:")]
        assert from_a == [("hmf/v1/devices/dev-a/update", b"A: own update")]
        assert got_a == [("hmf/v1/devices/dev-a/task", b"a's task")]
    finally:
        for x in links:
            x.stop()
