"""The device agent behind ``hmf-device join``: a board's side of a real fleet
(protocol: docs/PROTOCOL.md).

The device announces itself (retained hello, last will on disconnect), follows the cloud's
retained round message, and for each task of its own: fetches the weights, trains them with
``train_task`` and the seed the cloud sent (so it computes what the simulator computes),
offers the update, uploads it when the cloud grants a slot, and waits for the receipt. Every
request is repeated after ``retry_s`` without an answer, and at once after a reconnect; the
cloud ignores repeats. A trained update is kept in the work directory until accepted, so a
restarted device, or a restarted cloud that re-runs the round, does not train twice.

With static BatchNorm the cloud follows an accepted update with a ``calibrate`` job on the same
task topic, while the round is ``calibrating``: the device fetches the new global model the same
way, recomputes its BatchNorm statistics on its own train data
(``common.calibration.bn_statistics``) and offers and uploads only those statistics.

With a ``ModelFetcher`` (device/serving.py) the agent also follows the cloud's retained
``model`` message and hands it the graph chunks; the fetcher decides what to request.

All work runs on the main thread; paho's callbacks only enqueue events (common/mqtt_link.py).
"""

from __future__ import annotations

import queue
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import protocol as p
from common import tensorfile
from common.calibration import batches, bn_statistics
from common.models import SPECS, build_model
from common.mqtt_link import BrokerSettings, Link
from common.training import TrainConfig, accuracy_per_exit, train_task
from device.serving import ModelFetcher

SOFTWARE = "hmf-device/0.1.0"


class Stop(Exception):
    """Raised by the signal handler to leave whatever the device is doing, training included."""


class BrokerUnreachable(RuntimeError):
    """No connection to the broker within ``connect_timeout``: the message says why and what to
    check."""


def load_device_data(path: str | Path) -> dict[str, np.ndarray]:
    """x (float32), y (int64), and optionally test_x, test_y: never unpickled."""
    with np.load(path, allow_pickle=False) as f:
        names = set(f.files)
        if not {"x", "y"} <= names:
            raise ValueError(f"{path} must hold arrays x and y (it has {sorted(names)})")
        data = {"x": np.asarray(f["x"], np.float32), "y": np.asarray(f["y"], np.int64)}
        if {"test_x", "test_y"} <= names:
            data["test_x"] = np.asarray(f["test_x"], np.float32)
            data["test_y"] = np.asarray(f["test_y"], np.int64)
    if len(data["x"]) != len(data["y"]):
        raise ValueError(f"{path}: {len(data['x'])} samples but {len(data['y'])} labels")
    return data


class DeviceAgent:
    def __init__(self, device_id: str, broker: BrokerSettings, data: dict[str, np.ndarray],
                 work_dir: str | Path, tier: int | None = None, retry_s: float = 10.0,
                 stay: bool = False, log: Callable[[str], None] = print,
                 serving: ModelFetcher | None = None,
                 connect_timeout: float | None = None) -> None:
        """``connect_timeout``: seconds to try to reach the broker after ``run`` starts before
        giving up (``BrokerUnreachable``); None: forever. Only the first connection is bounded:
        a device that was connected waits for a restarted broker however long it takes."""
        self.id = p.check_device_id(device_id)
        self.connect_timeout = connect_timeout
        self.ever_connected = False
        self.last_failure: tuple[str, str] | None = None  # ("unreachable"|"refused", reason)
        self.data, self.tier, self.retry_s, self.stay, self.log = data, tier, retry_s, stay, log
        self.serving = serving
        self.work = Path(work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        topics = [p.cloud_topic("round"), p.cloud_topic("status")]
        topics += [p.cloud_topic("model")] if serving else []
        topics += [p.device_topic(self.id, n) for n in p.DEVICE_DOWN]
        bye = p.make_control("bye", device=self.id, reason="connection lost")
        self.link = Link(self.id, broker, topics, will=(self.topic("presence"), bye))
        self.round: dict[str, Any] | None = None
        self.task: dict[str, Any] | None = None
        self.download: p.Reassembly | None = None
        self.result: dict[str, Any] | None = self._load_result()
        self.stats: dict[str, Any] | None = None  # the last BatchNorm statistics computed
        self.done: set[tuple[str, int, str]] = set()  # _done_key of jobs answered
        self.runs_seen: set[str] = set()  # runs seen open: only their end makes us leave
        self.phase = "idle"  # idle | fetching | offering | sending
        self.last_sent = 0.0
        self.cloud_state: str | None = None  # the cloud's last status: online | offline
        self.uploaded: tuple[str, float] | None = None  # (sha256, when) of the last full upload
        self.stopping = False
        self.training = False

    def topic(self, name: str) -> str:
        return p.device_topic(self.id, name)

    # ------------------------------------------------------------------ main loop
    def run(self) -> int:
        """Until the run finishes (or forever with ``stay``), or SIGINT/SIGTERM: exit code 0.
        Raises ``BrokerUnreachable`` when no connection was made within ``connect_timeout``."""
        previous = {}
        if threading.current_thread() is threading.main_thread():  # (tests run agents in threads)
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, self._on_signal)
        bound = (f"; giving up after {self.connect_timeout:g} s without a connection"
                 if self.connect_timeout else "")
        self.log(f"{self.id}: joining {self.broker} ({len(self.data['x'])} samples, tier "
                 f"{self.tier or 'as assigned'}){bound}")
        deadline = time.monotonic() + (self.connect_timeout or float("inf"))
        self.link.start()
        try:
            while not self.stopping:
                try:
                    ev = self.link.events.get(timeout=0.5)
                    self._handle(ev)
                except queue.Empty:
                    pass
                if not self.ever_connected and time.monotonic() > deadline:
                    raise BrokerUnreachable(self._unreachable_message())
                self._retry()
        except Stop:
            self.log(f"{self.id}: stopping on signal")
        finally:
            bye = p.make_control("bye", device=self.id, reason="left")
            self.link.stop(last=(self.topic("presence"), bye))
            for sig, handler in previous.items():  # an agent run in-process leaves no trace
                signal.signal(sig, handler)
        return 0

    @property
    def broker(self) -> str:
        return f"{self.link.settings.host}:{self.link.settings.port}"

    def _unreachable_message(self) -> str:
        """Why joining gave up, and what to check."""
        kind, reason = self.last_failure or ("unreachable", "no answer")
        waited = f"{self.connect_timeout:g} s"
        forever = "; --connect-timeout 0 waits forever"
        if kind == "refused":
            check = ("check --username and --password-file (the user name defaults to the "
                     "device id) against the broker's password file" if _is_auth(reason)
                     else "check the broker's log")
            return (f"the broker at {self.broker} refused this device for {waited} "
                    f"({reason}): {check}{forever}")
        return (f"could not reach the broker at {self.broker} within {waited} (last attempt: "
                f"{reason}): check --broker and that the broker runs and is reachable from "
                f"this device{forever}")

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stopping = True
        if self.training:
            raise Stop()

    def _handle(self, ev: tuple[Any, ...]) -> None:
        if ev[0] == "connected":
            self.ever_connected, self.last_failure = True, None
            self.log(f"{self.id}: connected; hello sent")
            hello = p.make_control("hello", device=self.id, tier=self.tier,
                                   samples=len(self.data["x"]), software=SOFTWARE)
            self.link.publish(self.topic("presence"), hello, retain=True)
            self.last_sent = 0.0  # repeat the pending request at once
            if self.serving:
                self.serving.reconnected()
        elif ev[0] == "disconnected":
            if self.last_failure is None:  # not the close that follows a refused connection
                self.log(f"{self.id}: lost the broker ({ev[1]}): reconnecting with backoff")
        elif ev[0] in ("unreachable", "refused"):
            self._on_connect_failed(ev[0], ev[1], ev[2])
        elif ev[0] == "message":
            try:
                self._on_message(ev[1], ev[2])
            except p.ProtocolError as e:
                self.log(f"{self.id}: ignored a message on {ev[1]}: {e}")

    def _on_connect_failed(self, kind: str, reason: str, retry_s: int) -> None:
        """Says what the device is waiting for, each time an attempt fails."""
        self.last_failure = (kind, reason)
        if kind == "refused":
            hint = "; check --username/--password-file" if _is_auth(reason) else ""
            what = f"the broker at {self.broker} refused the connection ({reason}{hint})"
        else:
            what = f"cannot reach the broker at {self.broker} ({reason})"
        self.log(f"{self.id}: {what}; retrying in {retry_s} s")

    def _on_message(self, topic: str, payload: bytes) -> None:
        if topic == p.cloud_topic("status"):
            if payload:
                self._on_cloud_status(p.parse_control(payload, "status")["state"])
        elif topic == p.cloud_topic("round"):
            if payload:
                self._on_round(p.parse_control(payload, "round"))
        elif topic == self.topic("task"):
            if payload:
                self._on_task(p.parse_control(payload, "task", "calibrate"))
        elif topic == self.topic("weights"):
            self._on_weights(p.parse_chunk(payload))
        elif topic == self.topic("reply"):
            self._on_reply(p.parse_control(payload, "reply"))
        elif self.serving and topic == p.cloud_topic("model"):
            if payload:  # an empty retained message: the cloud serves nothing now
                self._request_graphs(self.serving.on_model(p.parse_control(payload, "model")))
        elif self.serving and topic == self.topic("graphs"):
            self._request_graphs(self.serving.on_chunk(p.parse_chunk(payload)))

    def _request_graphs(self, request: bytes | None) -> None:
        if request is not None:
            self.link.publish(self.topic("request"), request)

    # ------------------------------------------------------------------ state machine
    def _on_cloud_status(self, state: str) -> None:
        """A cloud that (re)starts may have lost what it accepted before: offer again what this
        device did for the current round (the cloud ignores an offer it already has)."""
        if state == self.cloud_state:  # republished after a reconnect: the cloud is the same
            return
        self.cloud_state = state
        self.log(f"{self.id}: cloud {state}")
        if state == "online":
            self.done.clear()
            self.last_sent = 0.0
            self._advance()

    def _on_round(self, msg: dict[str, Any]) -> None:
        if self.round == msg:
            return
        self.round = msg
        self.last_sent = 0.0  # a re-opened round: repeat a pending request at once
        if msg["state"] == "finished":
            self.phase, self.download = "idle", None
            if msg["run"] not in self.runs_seen:  # a retained message of an earlier run
                self.log(f"{self.id}: run {msg['run']} has finished; waiting for a new run")
                return
            self.log(f"{self.id}: run {msg['run']} finished after {msg['round']} rounds")
            if not self.stay:
                self.stopping = True
            return
        self.runs_seen.add(msg["run"])
        left = msg["deadline"] - time.time()
        self.log(f"{self.id}: round {msg['round']}/{msg['rounds']} {msg['state']}"
                 + (f" (deadline in {left:.0f}s)" if msg["state"] == "open" else ""))
        self._advance()

    def _on_task(self, msg: dict[str, Any]) -> None:
        if msg["device"] != self.id:
            raise p.ProtocolError("device mismatch", msg["device"])
        if self.task and (self.task["type"], _key(self.task)) == (msg["type"], _key(msg)):
            return
        self.task = msg
        self.phase, self.download = "idle", None  # whatever was under way was for another job
        self._advance()

    def _active(self) -> dict[str, Any] | None:
        """The job to work on now: a task while its round is open, a calibration while its
        round is calibrating, of the current run, not yet answered."""
        r, t = self.round, self.task
        if not r or not t or r["state"] != JOB_PHASE[t["type"]] or (t["run"], t["round"]) != (
                r["run"], r["round"]) or _done_key(t) in self.done:
            return None
        return t

    def _advance(self) -> None:
        task = self._active()
        if task is None:
            self.phase, self.download = "idle", None
            return
        if self.phase != "idle":
            return
        if self._pending(task):
            self.log(f"{self.id}: round {task['round']}: {_what(task)} already computed, "
                     "offering it")
            self._offer()
            return
        if task["type"] == "task" and self.tier is not None and task["depth"] > self.tier:
            self.log(f"{self.id}: round {task['round']}: refusing a depth-{task['depth']} task "
                     f"(this device declared tier {self.tier})")
            self.done.add(_done_key(task))
            return
        ref = task["weights"]
        self.download = p.Reassembly(ref)
        what = (f"task depth {task['depth']}" if task["type"] == "task"
                else "BatchNorm calibration of the full model")
        self.log(f"{self.id}: round {task['round']}: {what}; downloading "
                 f"{ref.size / 1e6:.1f} MB of weights in {ref.chunks} chunk(s)")
        self.phase = "fetching"
        self._fetch()

    def _fetch(self) -> None:
        task, d = self.task, self.download
        assert task is not None and d is not None
        missing = d.missing() if d.have else None
        self._send("request", p.make_control("fetch", run=task["run"], round=task["round"],
                                             device=self.id, sha256=d.ref.sha256,
                                             missing=missing))

    def _send(self, name: str, payload: bytes) -> None:
        self.link.publish(self.topic(name), payload)
        self.last_sent = time.monotonic()

    def _retry(self) -> None:
        if self.serving and self.link.connected.is_set():
            self._request_graphs(self.serving.retry())
        if self.phase == "idle" or time.monotonic() - self.last_sent < self.retry_s:
            return
        if self._active() is None:
            self.phase, self.download = "idle", None
            return
        if not self.link.connected.is_set():
            return
        if self.phase == "fetching" and self.download is not None:
            self.log(f"{self.id}: weights incomplete: asking again")
            self._fetch()
        else:
            self.log(f"{self.id}: no receipt for the update: offering again")
            self._offer()

    def _on_weights(self, chunk: p.Chunk) -> None:
        d, task = self.download, self._active()
        if d is None or task is None or self.phase != "fetching":
            return  # late or repeated chunks of a finished download
        if chunk.sha256 != d.ref.sha256 or (chunk.run, chunk.round) != (task["run"],
                                                                         task["round"]):
            raise p.ProtocolError("unexpected blob", chunk.sha256[:16])
        d.add(chunk)
        self.last_sent = time.monotonic()  # progress: no need to ask again yet
        if not d.complete:
            return
        try:
            blob = d.blob()
            self.download = None
            (self._train if task["type"] == "task" else self._calibrate)(task, blob)
        except p.ProtocolError:
            self.download = p.Reassembly(d.ref)  # start over: the retry timer asks again
            self.phase = "fetching"
            raise

    def _received_state(self, task: dict[str, Any], blob: bytes, model: torch.nn.Module
                        ) -> dict[str, torch.Tensor] | None:
        """The job's weights decoded for ``model``; None (job skipped) if the local data does
        not fit the model."""
        state, _ = p.decode_state(blob, p.spec_of(model.state_dict()), task["dtype"])
        shape, want = tuple(self.data["x"].shape[1:]), SPECS[task["model"]].input_shape
        if shape != want:
            self.log(f"{self.id}: data shape {shape} does not fit {task['model']} {want}: "
                     f"skipping round {task['round']}")
            self.phase = "idle"
            self.done.add(_done_key(task))
            return None
        return state

    def _train(self, task: dict[str, Any], blob: bytes) -> None:
        model = build_model(_model_name(task), depth=task["depth"],
                            width_fraction=task["width"])
        state = self._received_state(task, blob, model)
        if state is None:
            return
        x, y = torch.from_numpy(self.data["x"]), torch.from_numpy(self.data["y"])
        local_acc = self._local_accuracy(model, state)
        cfg = TrainConfig.from_json(task["train"])
        self.log(f"{self.id}: round {task['round']}: training {cfg.epochs} epoch(s) on "
                 f"{len(x)} samples")
        start = time.perf_counter()
        self.training = True
        try:
            trained, loss = train_task(model, state, x, y, cfg, task["seed"])
        finally:
            self.training = False
        meta = {"run": task["run"], "round": task["round"], "device": self.id,
                "samples": len(x), "loss": loss}
        update = p.encode_state(trained, task["dtype"], meta)
        self.log(f"{self.id}: round {task['round']}: trained in "
                 f"{time.perf_counter() - start:.1f}s, loss {loss:.3f}; offering the update "
                 f"({len(update) / 1e6:.1f} MB)")
        self.result = {"key": list(_key(task)), "blob": update, "samples": len(x),
                       "loss": loss if np.isfinite(loss) else None, "local_acc": local_acc}
        self._save_result()
        self._offer()

    def _calibrate(self, task: dict[str, Any], blob: bytes) -> None:
        """BatchNorm statistics of the full global model on this device's train data, offered
        like an update (kept in memory only: recomputing them is cheap)."""
        model_name = _model_name(task)
        state = self._received_state(task, blob, build_model(model_name))
        if state is None:
            return
        start = time.perf_counter()
        self.training = True  # a signal may interrupt it, like training
        try:
            stats = bn_statistics(model_name, state, batches(torch.from_numpy(self.data["x"])))
        finally:
            self.training = False
        meta = {"run": task["run"], "round": task["round"], "device": self.id}
        blob = p.encode_state(stats, "float32", meta)  # a few KB: full precision
        self.log(f"{self.id}: round {task['round']}: BatchNorm statistics of "
                 f"{len(self.data['x'])} samples in {time.perf_counter() - start:.1f}s; "
                 "offering them")
        self.stats = {"key": list(_key(task)), "blob": blob, "samples": len(self.data["x"]),
                      "loss": None, "local_acc": None}
        self._offer()

    def _local_accuracy(self, model: torch.nn.Module, state: dict[str, torch.Tensor]
                        ) -> list[float] | None:
        """Accuracy of the received (global) model on this device's own test split."""
        if "test_x" not in self.data or len(self.data["test_x"]) == 0:
            return None
        model.load_state_dict(state)
        return accuracy_per_exit(model, torch.from_numpy(self.data["test_x"]),
                                 torch.from_numpy(self.data["test_y"]))

    def _pending(self, job: dict[str, Any]) -> dict[str, Any] | None:
        """What this device has computed for ``job`` (its update or its statistics), if any."""
        res = self.stats if job["type"] == "calibrate" else self.result
        return res if res is not None and res["key"] == list(_key(job)) else None

    def _offer(self) -> None:
        task = self._active()
        res = self._pending(task) if task else None
        if task is None or res is None:
            return
        self.phase = "offering"
        self._send("request", p.make_control(
            "offer", run=task["run"], round=task["round"], device=self.id,
            blob=p.blob_ref(res["blob"]), samples=res["samples"], loss=res["loss"],
            local_acc=res["local_acc"]))

    def _on_reply(self, msg: dict[str, Any]) -> None:
        task = self._active()
        res = self._pending(task) if task else None
        if task is None or res is None or (msg["run"], msg["round"], msg["device"]) != (
                task["run"], task["round"], self.id):
            return
        ref = p.blob_ref(res["blob"])
        if msg["sha256"] != ref.sha256:
            return
        self.last_sent = time.monotonic()
        if msg["status"] == "send":
            self._upload(task, res["blob"], ref, msg["missing"])
        elif msg["status"] == "wait":
            self.phase = "offering"
        else:
            verdict = "accepted" if msg["status"] == "accepted" else \
                f"rejected ({msg['reason']})"
            self.log(f"{self.id}: round {task['round']}: {_what(task)} {verdict}; waiting for "
                     "the next round")
            self.done.add(_done_key(task))
            self.phase = "idle"

    def _upload(self, task: dict[str, Any], blob: bytes, ref: p.BlobRef,
                missing: list[int] | None) -> None:
        """Send the chunks the cloud lacks (all if it does not say). A "send" for all of a blob
        sent in full less than ``retry_s`` ago answers a repeated offer: those chunks are on
        their way, and sending them again would only make duplicates."""
        recent = self.uploaded is not None and self.uploaded[0] == ref.sha256 and (
            time.monotonic() - self.uploaded[1] < self.retry_s)
        if missing is None and recent and self.phase == "sending":
            return
        self.phase = "sending"
        indices = range(ref.chunks) if missing is None else [i for i in missing
                                                               if i < ref.chunks]
        for i in indices:
            self.link.publish(self.topic("update"),
                              p.chunk_frame(blob, ref, i, task["run"], task["round"]))
        if missing is None:
            self.uploaded = (ref.sha256, time.monotonic())
        self.log(f"{self.id}: round {task['round']}: uploading {len(indices)} of {ref.chunks} "
                 "chunk(s)")

    # ------------------------------------------------------------------ work-dir cache
    def _save_result(self) -> None:
        res = self.result
        assert res is not None
        meta = {k: v for k, v in res.items() if k != "blob"}
        tensorfile.save(self.work / "update.hmf", {"blob": torch.frombuffer(
            bytearray(res["blob"]), dtype=torch.uint8)}, meta)

    def _load_result(self) -> dict[str, Any] | None:
        path = self.work / "update.hmf"
        if not path.exists():
            return None
        try:
            tensors, meta = tensorfile.load(path)
            return {**meta, "blob": tensors["blob"].numpy().tobytes()}
        except (tensorfile.TensorFileError, KeyError, OSError):
            return None


JOB_PHASE = {"task": "open", "calibrate": "calibrating"}  # job type -> its round's state


def _is_auth(reason: str) -> bool:
    """A refusal about credentials (MQTT 3.1.1 "Not authorized", MQTT 5 "Bad user name or
    password")."""
    return "authori" in reason.lower() or "password" in reason.lower()


def _key(task: dict[str, Any]) -> tuple[str, int, str, int | None]:
    """What makes two jobs the same work: run, round, weights and seed (None: calibration)."""
    return (task["run"], task["round"], task["weights"].sha256, task.get("seed"))


def _done_key(job: dict[str, Any]) -> tuple[str, int, str]:
    """A job's entry in ``DeviceAgent.done``: a round's calibration follows its task."""
    return job["run"], job["round"], job["type"]


def _what(job: dict[str, Any]) -> str:
    return "update" if job["type"] == "task" else "BatchNorm statistics"


def _model_name(job: dict[str, Any]) -> str:
    if job["model"] not in SPECS:
        raise p.ProtocolError("bad field", f"unknown model {job['model']}")
    return job["model"]


__all__ = ["BrokerUnreachable", "DeviceAgent", "Stop", "load_device_data"]
