"""How the MQTT cloud scales with the number of devices, against the bare broker.

For each device count N: a real mosquitto on loopback, the cloud (``FleetCloud``, in its own
process so its peak memory is its own), and N lightweight simulated devices spread over a few
processes (one thread each, many MQTT connections per thread). Every device speaks the real
protocol (hello, task, fetch, chunks, offer, upload, receipt) and returns a tier-1 update
without training. Reported per N: round completion time, messages per second through the
broker, the cloud's peak RSS; and, in the same run and on the same broker, the time a plain
publisher and plain subscribers take to move the same bytes (each subscriber echoing its blob
back, as a device returns its update). Target: a round within twice the bare transfer, with
flat cloud memory.

    .venv/bin/python bench/mqtt_scale.py --devices 50,100,250,500 \
        --json bench/results/mqtt_scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import selectors
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import protocol as p  # noqa: E402
from common import tensorfile  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
from mqtt_broker import Broker  # noqa: E402


# ---------------------------------------------------------------- many clients on one thread
class Loop:
    """Drives many paho clients from one thread with a selector (paho's external loop API)."""

    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.clients: list[mqtt.Client] = []

    def add(self, client: mqtt.Client, host: str, port: int) -> None:
        client.connect(host, port, keepalive=120)
        self.sel.register(client.socket(), selectors.EVENT_READ, client)
        self.clients.append(client)

    def step(self, timeout: float = 0.05) -> None:
        for c in self.clients:
            sock = c.socket()
            if sock is None:
                continue
            want = selectors.EVENT_READ | (selectors.EVENT_WRITE if c.want_write() else 0)
            if self.sel.get_key(sock).events != want:
                self.sel.modify(sock, want, c)
        for key, mask in self.sel.select(timeout):
            c = key.data
            if mask & selectors.EVENT_READ:
                c.loop_read()
            if mask & selectors.EVENT_WRITE and c.socket() is not None:
                c.loop_write()
        for c in self.clients:
            c.loop_misc()


def _client(client_id: str) -> mqtt.Client:
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id)
    c.max_inflight_messages_set(20)
    c.max_queued_messages_set(0)
    return c


# ---------------------------------------------------------------- a protocol device, no training
class SimDevice:
    def __init__(self, device: str, stats: dict[str, int]) -> None:
        self.id, self.stats = device, stats
        self.client = _client(device)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.round: dict[str, Any] | None = None
        self.task: dict[str, Any] | None = None
        self.download: p.Reassembly | None = None
        self.update: tuple[bytes, p.BlobRef] | None = None
        self.fetched: tuple[str, int] | None = None
        self.runs_seen: set[str] = set()
        self.finished = False

    def topic(self, name: str) -> str:
        return p.device_topic(self.id, name)

    def send(self, name: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(self.topic(name), payload, qos=1, retain=retain)
        self.stats["sent"] += 1
        self.stats["bytes"] += len(payload)

    def _on_connect(self, client, userdata, flags, reason, properties) -> None:
        for t in [p.cloud_topic("round")] + [self.topic(n) for n in p.DEVICE_DOWN]:
            client.subscribe(t, qos=1)
        self.send("presence", p.make_control("hello", device=self.id, tier=1, samples=100,
                                             software="bench"), retain=True)

    def _on_message(self, client, userdata, msg) -> None:
        self.stats["received"] += 1
        self.stats["bytes"] += len(msg.payload)
        if not msg.payload:
            return
        if msg.topic == p.cloud_topic("round"):
            self.round = p.parse_control(msg.payload, "round")
            if self.round["state"] == "open":
                self.runs_seen.add(self.round["run"])
            # a retained 'finished' of an earlier run is not ours
            self.finished = (self.round["state"] == "finished"
                             and self.round["run"] in self.runs_seen)
            self._maybe_fetch()
        elif msg.topic == self.topic("task"):
            self.task = p.parse_control(msg.payload, "task")
            self._maybe_fetch()
        elif msg.topic == self.topic("weights") and self.download is not None:
            self.download.add(p.parse_chunk(msg.payload))
            if self.download.complete:
                self._answer(self.download.blob())
        elif msg.topic == self.topic("reply"):
            self._on_reply(p.parse_control(msg.payload, "reply"))

    def _maybe_fetch(self) -> None:
        r, t = self.round, self.task
        if not r or not t or r["state"] != "open" or (t["run"], t["round"]) != (r["run"],
                                                                                 r["round"]):
            return
        if self.fetched == (t["run"], t["round"]):
            return
        self.fetched = (t["run"], t["round"])
        self.download = p.Reassembly(t["weights"])
        self.send("request", p.make_control("fetch", run=t["run"], round=t["round"],
                                            device=self.id, sha256=t["weights"].sha256,
                                            missing=None))

    def _answer(self, blob: bytes) -> None:
        """The tier-1 update: the received tensors, re-labelled for this device and round."""
        t = self.task
        assert t is not None
        tensors, _ = tensorfile.decode(blob)
        update = tensorfile.encode(tensors, {"run": t["run"], "round": t["round"],
                                             "device": self.id})
        self.update = (update, p.blob_ref(update))
        self.send("request", p.make_control("offer", run=t["run"], round=t["round"],
                                            device=self.id, blob=self.update[1], samples=100,
                                            loss=1.0, local_acc=None))

    def _on_reply(self, msg: dict[str, Any]) -> None:
        if msg["status"] == "send" and self.update is not None and self.task is not None:
            blob, ref = self.update
            for i in range(ref.chunks):
                self.send("update", p.chunk_frame(blob, ref, i, self.task["run"],
                                                  self.task["round"]))


def device_host(ids: list[str], port: int) -> None:
    """A process holding many simulated devices; prints its message counts at the end."""
    stats = {"sent": 0, "received": 0, "bytes": 0}
    loop, devices = Loop(), [SimDevice(d, stats) for d in ids]
    for d in devices:
        loop.add(d.client, "127.0.0.1", port)
    while not all(d.finished for d in devices):
        loop.step()
    for _ in range(20):
        loop.step(0.01)
    print(json.dumps(stats), flush=True)


# ---------------------------------------------------------------- bare transfer: echo
def bare_host(ids: list[str], port: int, size: int) -> None:
    """Plain subscribers: each receives its blob's chunks and publishes the same bytes back."""
    loop, clients, got = Loop(), [], {}

    def make(i: str) -> mqtt.Client:
        c = _client(f"bare-{i}")
        c.on_connect = lambda cl, *_: cl.subscribe(f"bare/down/{i}", qos=1)

        def on_message(cl, userdata, msg) -> None:
            got[i] = got.get(i, 0) + len(msg.payload)
            if got[i] >= size:
                ref = p.blob_ref(bytes(size))
                blob = bytes(size)
                for k in range(ref.chunks):
                    cl.publish(f"bare/up/{i}", p.chunk_frame(blob, ref, k, "bare", 0), qos=1)
        c.on_message = on_message
        return c

    for i in ids:
        clients.append(make(i))
        loop.add(clients[-1], "127.0.0.1", port)
    print("ready", flush=True)
    end = time.monotonic() + 600
    while time.monotonic() < end and sys.stdin.readable():
        loop.step()
        if len(got) == len(ids) and all(v >= size for v in got.values()):
            for _ in range(200):  # flush the echoes
                loop.step(0.01)
                if not any(c.want_write() for c in clients):
                    break
            break
    print("done", flush=True)


def bare_transfer(port: int, n: int, size: int, hosts: int) -> float:
    """Seconds for a publisher to send N blobs of ``size`` bytes in 1 MB chunks and get every
    one echoed back through the broker."""
    ids = [str(i) for i in range(n)]
    procs = [_spawn(["--bare-host", "--port", str(port), "--size", str(size), "--ids",
                     ",".join(ids[k::hosts])]) for k in range(hosts)]
    for pr in procs:
        assert pr.stdout.readline().strip() == "ready"
    time.sleep(0.5)
    pub, loop, received = _client("bare-pub"), Loop(), {}
    pub.max_inflight_messages_set(0)  # no window at all: the most favourable case for bare
    pub.on_connect = lambda cl, *_: cl.subscribe("bare/up/#", qos=1)

    def on_message(cl, userdata, msg) -> None:
        received[msg.topic] = received.get(msg.topic, 0) + len(msg.payload)
    pub.on_message = on_message
    loop.add(pub, "127.0.0.1", port)
    for _ in range(20):
        loop.step(0.01)
    blob = bytes(size)
    ref = p.blob_ref(blob)
    frames = [p.chunk_frame(blob, ref, k, "bare", 0) for k in range(ref.chunks)]
    start = time.perf_counter()
    for i in ids:
        for f in frames:
            pub.publish(f"bare/down/{i}", f, qos=1)
        loop.step(0)
    want = sum(len(f) for f in frames)
    while not (len(received) == n and all(v >= want for v in received.values())):
        loop.step(0.01)
        if time.perf_counter() - start > 600:
            raise RuntimeError("bare transfer did not finish")
    seconds = time.perf_counter() - start
    for pr in procs:
        pr.wait(30)
    pub.disconnect()
    return seconds


# ---------------------------------------------------------------- the cloud, in its own process
def cloud_child(args: argparse.Namespace) -> None:
    import torch

    from cloud.config import RunConfig
    from cloud.fleet import Fleet
    from cloud.server import CloudOptions, FleetCloud
    from common.mqtt_link import broker_settings

    torch.set_num_threads(1)
    verbose = os.environ.get("HMF_BENCH_VERBOSE")
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if verbose else (lambda s: None)
    fleet = Fleet.load(args.fleet)
    n = len(fleet.devices)
    cfg = RunConfig(model=args.model, strategy=args.strategy, clients=n, participants=n,
                    tier_mix=(1.0, 0.0, 0.0), rounds=args.rounds, seed=0)
    opts = CloudOptions(min_updates=n, round_timeout=600, wait_devices=n,
                        upload_slots=args.upload_slots)
    cloud = FleetCloud(cfg, fleet, args.out, broker_settings(f"mqtt://127.0.0.1:{args.port}"),
                       opts, log=log)
    queued = [0, 0]

    def watch() -> None:  # how far the worker falls behind the network thread
        while True:
            try:
                held = sum(len(e[2]) for e in list(cloud.link.events.queue) if e[0] == "message")
            except RuntimeError:  # the deque changed while copied
                held = 0
            queued[0] = max(queued[0], cloud.link.events.qsize())
            queued[1] = max(queued[1], held)
            time.sleep(0.01)
    threading.Thread(target=watch, daemon=True).start()
    rows = cloud.run()
    peak = peak_rss_mib()
    print(json.dumps({"rounds": [r["elapsed_s"] for r in rows], "peak_mib": peak,
                      "max_queued_events": queued[0], "max_queued_mib": queued[1] / 2**20,
                      "bytes_up": rows[-1]["bytes_up"], "bytes_down": rows[-1]["bytes_down"]}),
          flush=True)


def peak_rss_mib() -> float:
    """This process's own high-water RSS (VmHWM). Not ru_maxrss: Linux carries that over exec
    from the forked parent, so a child would report the bench's own peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _spawn(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE,
                            stdin=subprocess.PIPE, text=True, cwd=ROOT)


def fleet_round(port: int, n: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from cloud.fleet import Fleet, FleetDevice

    ids = [f"sim-{i:04d}" for i in range(n)]
    Fleet([FleetDevice(d, 1) for d in ids]).save(work / f"fleet-{n}.json")
    cloud = _spawn(["--cloud-child", "--port", str(port), "--fleet",
                    str(work / f"fleet-{n}.json"), "--out", str(work / f"run-{n}"),
                    "--model", args.model, "--strategy", args.strategy,
                    "--rounds", str(args.rounds), "--upload-slots", str(args.upload_slots)])
    hosts = [_spawn(["--device-host", "--port", str(port), "--ids",
                     ",".join(ids[k::args.hosts])]) for k in range(args.hosts)]
    out = json.loads(cloud.stdout.readline())
    stats = [json.loads(h.stdout.readline()) for h in hosts]
    for pr in [cloud, *hosts]:
        pr.wait(60)
    messages = sum(s["sent"] + s["received"] for s in stats)
    round_s = out["rounds"][-1]
    return {"devices": n, "round_s": round_s, "all_rounds_s": out["rounds"],
            "messages": messages // args.rounds, "msgs_per_s": messages / sum(out["rounds"]),
            "cloud_peak_mib": out["peak_mib"], "max_queued_events": out["max_queued_events"],
            "max_queued_mib": out["max_queued_mib"],
            "bytes_up": out["bytes_up"],
            "bytes_down": out["bytes_down"]}


def tier1_update_bytes(model: str) -> int:
    from common.models import build_model

    state = build_model(model, depth=1).state_dict()
    return len(p.encode_state(state, meta={"run": "x" * 12, "round": 1, "device": "sim-0000"}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", default="50,100,250,500")
    ap.add_argument("--model", default="hapt")
    ap.add_argument("--strategy", default="depthwise")
    ap.add_argument("--rounds", type=int, default=2, help="reported: the last (warm) round")
    ap.add_argument("--hosts", type=int, default=4, help="device processes")
    ap.add_argument("--upload-slots", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=2,
                    help="runs of each measurement; the fastest of each is reported")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--device-host", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bare-host", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cloud-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--ids", default="", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--fleet", default="", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device_host:
        return device_host(args.ids.split(","), args.port)
    if args.bare_host:
        return bare_host(args.ids.split(","), args.port, args.size)
    if args.cloud_child:
        return cloud_child(args)

    size = tier1_update_bytes(args.model)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = Broker(work).start()
        try:
            for n in [int(x) for x in args.devices.split(",")]:
                bares, rows = [], []
                for _ in range(args.repeat):  # alternate, keep the least disturbed of each
                    bares.append(bare_transfer(broker.port, n, size, args.hosts))
                    rows.append(fleet_round(broker.port, n, args, work))
                row = min(rows, key=lambda r: r["round_s"])
                bare = min(bares)
                row.update(bare_s=bare, ratio=row["round_s"] / bare,
                           round_s_runs=[r["round_s"] for r in rows], bare_s_runs=bares,
                           cloud_peak_mib=max(r["cloud_peak_mib"] for r in rows))
                results.append(row)
                print(f"{n:>5} devices: round {row['round_s']:6.2f}s  bare {bare:6.2f}s  "
                      f"ratio {row['ratio']:4.2f}  {row['msgs_per_s']:7.0f} msg/s  cloud peak "
                      f"{row['cloud_peak_mib']:6.0f} MiB  (events queued <= "
                      f"{row['max_queued_events']}, {row['max_queued_mib']:.0f} MiB)", flush=True)
        finally:
            broker.stop()
    report = {"model": args.model, "strategy": args.strategy, "update_bytes": size,
              "hosts": args.hosts, "cpus": os.cpu_count(), "repeat": args.repeat,
              "results": results}
    print()
    print(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


def table(report: dict[str, Any]) -> str:
    lines = [f"model {report['model']} ({report['update_bytes'] / 1e6:.2f} MB tier-1 update), "
             f"strategy {report['strategy']}, {report['hosts']} device processes, "
             f"{report['cpus']} CPUs, fastest of {report['repeat']} runs each",
             "| devices | round (s) | bare transfer (s) | round / bare | messages | msg/s | "
             "cloud peak RSS (MiB) |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        lines.append(f"| {r['devices']} | {r['round_s']:.2f} | {r['bare_s']:.2f} | "
                     f"{r['ratio']:.2f} | {r['messages']} | {r['msgs_per_s']:.0f} | "
                     f"{r['cloud_peak_mib']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
