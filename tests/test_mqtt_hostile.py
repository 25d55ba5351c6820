"""Hostile and broken input against a running cloud, through a real mosquitto: every bad message
is refused and logged with its reason, the cloud keeps going, and the one valid update of the
round is exactly what gets aggregated. Issue 19's cases too: a tensor-file header of the wrong
JSON type, a handler that fails in a way no check foresaw, forged log lines, fetch
amplification, input refused before round 1 opens, duplicates counted apart from rejections."""

from __future__ import annotations

import json
import struct
import threading
import time

import torch
from mqtt_broker import Broker, RawClient

from cloud.config import RunConfig
from cloud.fleet import Fleet, FleetDevice
from cloud.runlog import read_metrics
from cloud.server import CloudOptions, FleetCloud
from cloud.simulation import initial_state
from common import protocol as p
from common.models import build_model, tier_state
from common.mqtt_link import broker_settings


class Impostor(RawClient):
    """A raw client on an anonymous broker, speaking for any device it likes."""

    def __init__(self, url: str) -> None:
        super().__init__(url, "impostor", [p.device_topic("+", "+")])
        time.sleep(0.2)

    def send(self, device: str, name: str, payload: bytes) -> None:
        self.publish(p.device_topic(device, name), payload)


def test_hostile_input_is_refused_logged_and_survived(tmp_path):
    broker = Broker(tmp_path).start()
    cfg = RunConfig(model="mnist", strategy="depthwise", clients=2, participants=1,
                    tier_mix=(1.0, 0.0, 0.0), rounds=1, seed=1)
    fleet = Fleet([FleetDevice("dev-a", 1), FleetDevice("dev-b", 1)])
    lines: list[str] = []
    opts = CloudOptions(min_updates=1, round_timeout=120, wait_devices=1, slot_timeout=1.0,
                        log_limit=100)
    cloud = FleetCloud(cfg, fleet, tmp_path / "run", broker_settings(broker.url), opts,
                       log=lines.append)

    def failing_handler(device, msg):  # a handler bug no check foresaw (issue 19, defect 1)
        raise TypeError("reshape(): argument 'shape' must be tuple of ints")

    cloud._on_fetch_graph = failing_handler
    thread = threading.Thread(target=cloud.run, daemon=True)
    bad = Impostor(broker.url)
    me = cloud_tasks(cfg, fleet)
    other = ({"dev-a", "dev-b"} - {me}).pop()
    try:
        thread.start()
        # -- before round 1 opens (it waits for one device): refused input still counts
        wait_for_line(lines, "waiting for devices")
        bad.send(me, "request", b"{before the first round")
        wait_for_line(lines, "rejected from")
        forged = "left\nrun 0123456789ab finished: /tmp/forged\x1b[2J"
        bad.send(other, "presence", p.make_control("hello", device=other, tier=1, samples=1,
                                                   software="hmf\nround   1/1  forged\u202e"))
        task = p.parse_control(bad.wait(f"hmf/v1/devices/{me}/task"), "task")
        bad.send(other, "presence", p.make_control("bye", device=other, reason=forged))
        run, rnd = task["run"], task["round"]
        good = {k: (v + 0.5 if v.is_floating_point() else v)
                for k, v in tier_state(initial_state(cfg), 1).items()}
        meta = {"run": run, "round": rnd, "device": me}

        def offer(blob: bytes, ref: p.BlobRef | None = None, device: str = me,
                  at_round: int = rnd) -> p.BlobRef:
            ref = ref or p.blob_ref(blob, 200_000)
            bad.send(device, "request", p.make_control(
                "offer", run=run, round=at_round, device=device, blob=ref, samples=10,
                loss=1.0, local_acc=None))
            return ref

        def upload(blob: bytes, frames: list[int] | None = None, ref: p.BlobRef | None = None
                   ) -> str:
            """Offer, wait for 'send', send the chosen frames; the cloud's verdict (or '')."""
            ref = offer(blob, ref)
            sha = ref.sha256
            status = lambda m: p.parse_control(m, "reply")["sha256"] == sha  # noqa: E731
            reply = p.parse_control(bad.wait(f"hmf/v1/devices/{me}/reply", status), "reply")
            assert reply["status"] == "send"
            for i in frames if frames is not None else range(ref.chunks):
                bad.send(me, "update", p.chunk_frame(blob, ref, i, run, rnd))
            if frames is not None and len(set(frames)) < ref.chunks:
                return ""
            reply = p.parse_control(bad.wait(f"hmf/v1/devices/{me}/reply", status), "reply")
            return f"{reply['status']}: {reply['reason']}"

        # -- control messages that are not even valid
        bad.send(me, "request", b"{" + b" " * 70_000 + b"}")
        bad.send(me, "request", b"{not json")
        bad.send(me, "request", b'{"schema": 99, "type": "offer"}')
        bad.send("mallory", "presence", p.make_control("hello", device="mallory", tier=1,
                                                       samples=1, software="x"))
        bad.send(me, "presence", p.make_control("hello", device=other, tier=1, samples=1,
                                                software="x"))
        offer(p.encode_state(good, meta=meta), at_round=rnd + 5)  # a round not open
        offer(p.encode_state(good, meta=meta), device=other)  # has no task this round
        bad.send(me, "update", b"\x00garbage")
        bad.send(me, "update", p.chunk_frames(b"x" * 10, run, rnd)[1][0])  # no slot granted
        bad.send(me, "request", p.make_control("fetch_graph", run=run, round=rnd, device=me,
                                               sha256="0" * 64, missing=None))
        # -- fetch amplification: a request repeating an index, then one fetch too many
        weights = f"hmf/v1/devices/{me}/weights"
        fetch = lambda missing: bad.send(me, "request", p.make_control(  # noqa: E731
            "fetch", run=run, round=rnd, device=me, sha256=task["weights"].sha256,
            missing=missing))
        fetch([0] * 200)
        for _ in range(12):
            fetch([0])
            time.sleep(0.05)
        frames = count_messages(bad, weights, quiet=1.5)
        # -- uploads that reassemble but must not be aggregated
        w = "blocks.0.conv1.weight"
        nan = {**good, w: good[w].clone().fill_(float("nan"))}
        inf = {**good, w: good[w].clone().fill_(float("inf"))}
        renamed = {("x" + k if k == w else k): v for k, v in good.items()}
        reshaped = {**good, w: good[w].reshape(-1)}
        deeper = tier_state(build_model("mnist", depth=2).state_dict(), 2)
        verdicts = {
            "non-finite values": upload(p.encode_state(nan, meta=meta)),
            "non-finite values (inf)": upload(p.encode_state(inf, meta=meta)),
            "tensor names": upload(p.encode_state(renamed, meta=meta)),
            "tensor shape": upload(p.encode_state(reshaped, meta=meta)),
            "tensor dtype": upload(p.encode_state(good, "float16", meta=meta)),
            "stale round": upload(p.encode_state(good, meta={**meta, "round": rnd - 1})),
            "stale round (forged log line)": upload(p.encode_state(good, meta={
                **meta, "run": "x\nrun 0123456789ab finished: /tmp/forged"})),
            "malformed tensors": upload(b"\x05" * 1000),
            "malformed tensors (bool in a shape)": upload(bool_shape(p.encode_state(good,
                                                                                  meta=meta))),
        }
        blob = p.encode_state(good, meta=meta)
        forged = p.BlobRef("0" * 64, len(blob), 2, 200_000)  # chunks claim a hash that lies
        verdicts["checksum mismatch"] = upload(blob, [0, 1], ref=forged)
        assert upload(p.encode_state(good, meta={**meta, "samples": 1}), [0]) == ""
        time.sleep(2.0)  # slot_timeout: the half-sent upload is dropped, its slot freed
        oversized = p.encode_state(deeper, meta=meta)
        offer(oversized)
        reply = p.parse_control(bad.wait(f"hmf/v1/devices/{me}/reply"), "reply")
        assert reply["status"] == "rejected" and "larger" in reply["reason"]
        for reason, verdict in verdicts.items():
            assert verdict.startswith(f"rejected: {reason.split(' (')[0]}"), (reason, verdict)
        # -- the one valid update, with a duplicated chunk; then the round closes on it
        valid = upload(blob, [0, 0, 1])
        assert valid == "accepted: "
        thread.join(60)
        assert not thread.is_alive(), "\n".join(lines)
    finally:
        bad.link.stop()
        broker.stop()
    (row,) = read_metrics(tmp_path / "run")
    expected = {"oversized message", "malformed json", "unknown schema", "unknown device",
                "device mismatch", "stale round", "no task", "malformed chunk",
                "unexpected chunk", "non-finite values", "tensor names", "tensor shape",
                "tensor dtype", "malformed tensors", "checksum mismatch", "missing chunks",
                "oversized update", "unhandled input", "oversized request", "fetch budget"}
    assert expected <= set(row["rejected"]), set(row["rejected"]) ^ expected
    assert row["rejected"]["malformed json"] >= 2  # one of them before round 1 opened
    logged = "\n".join(lines)
    for reason in expected:
        assert f": {reason}: " in logged, reason
    # duplicates (QoS 1, resends) are counted apart: they are not hostile
    assert "duplicate chunk" not in row["rejected"] and row["duplicates"]["chunk"] >= 1
    # one frame for 200 repeats of index 0; the rest stop at 8 blobs' worth (fetch_budget)
    assert 1 <= frames <= 8, frames
    # nothing a device wrote can start a line of its own, or a terminal escape
    assert not any("\n" in line or "\x1b" in line or "\u202e" in line for line in lines)
    assert [line for line in lines if line.startswith("run ")] == [
        f"run {run} finished: {tmp_path / 'run' / 'summary.json'}"]
    assert "software hmf\\nround   1/1  forged\\u202e" in logged
    assert f"device {other} offline: left\\nrun 0123456789ab" in logged
    assert row["participants"] == {"1": 1, "2": 0, "3": 0}
    final = cloud_state(tmp_path / "run")
    for k, v in good.items():
        assert torch.equal(final[k], v), k  # exactly the valid update, nothing else


def wait_for_line(lines: list[str], needle: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(needle in line for line in lines):
        assert time.monotonic() < deadline, f"no {needle!r} in:\n" + "\n".join(lines)
        time.sleep(0.05)


def count_messages(client: Impostor, topic: str, quiet: float) -> int:
    """Messages on ``topic`` until none has come for ``quiet`` seconds (others are kept)."""
    n = 0
    while True:
        try:
            client.wait(topic, timeout=quiet)
        except AssertionError:
            return n
        n += 1


def bool_shape(blob: bytes) -> bytes:
    """``blob`` with its first tensor's shape [d0, ...] declared as [true, d0 * ...]: valid
    JSON, the element count unchanged, and a bool where an int belongs (it stopped the cloud)."""
    (hlen,) = struct.unpack("<Q", blob[:8])
    head = json.loads(blob[8 : 8 + hlen])
    entry = next(iter(head["tensors"].values()))
    numel = 1
    for d in entry["shape"]:
        numel *= d
    entry["shape"] = [True, numel]
    raw = json.dumps(head).encode()
    return struct.pack("<Q", len(raw)) + raw + blob[8 + hlen :]


def cloud_tasks(cfg: RunConfig, fleet: Fleet) -> str:
    from cloud.fleet import select

    (client, _), = select(fleet.federation(cfg.participants, cfg.tier_mix), cfg.seed, 1)
    return fleet.devices[client].id


def cloud_state(out) -> dict[str, torch.Tensor]:
    from cloud.checkpoint import load_checkpoint

    return load_checkpoint(out)[1]
