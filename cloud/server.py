"""``hmf-cloud start``: the cloud of a real fleet, over MQTT (protocol: docs/PROTOCOL.md).

One worker thread (the caller's) does everything: it reads the events that paho's callbacks put
on a queue, serves weights, grants upload slots, verifies and streams updates into the running
aggregate, and closes rounds (aggregation, evaluation, checkpoint). Callbacks never work.

A round computes what ``Simulation.round`` computes: the same participants (``cloud/fleet.py``),
the same submodels, the same training seeds sent to the devices, the same server step
(``cloud/streaming.py``), the same checkpoints and ``metrics.jsonl`` rows (plus the fleet's own
figures). It closes when every task's update is in, or at its deadline if at least
``min_updates`` are in; with fewer it waits another ``round_timeout``.

Memory stays flat in the number of devices: weights go out through a window of at most
``send_window`` unacknowledged chunks, at most ``upload_slots`` uploads are reassembled at once,
and updates are folded into a running sum as they are verified.

With ``export_onnx`` the cloud also serves the latest global model: after each round's
checkpoint it exports the model as ONNX graphs (``export.exporter``, checks included) into
``OUT/onnx/round_N``, publishes a retained ``model`` message and answers ``fetch_graph`` requests
with chunks of those files, after any task weights waiting in the same window.
"""

from __future__ import annotations

import json
import queue
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cloud.aggregation import server_step
from cloud.calibration import BnStatsSum
from cloud.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from cloud.config import RunConfig
from cloud.distillation import Distiller
from cloud.federation import seed_of
from cloud.fleet import Fleet, select
from cloud.robust import RoundGuard, ServerGuard, non_finite, screen, server_snapshot
from cloud.runlog import RunLog
from cloud.simulation import _check_same_run, initial_state, strategy_for
from cloud.strategies import ClientTask, ClientUpdate, Strategy
from cloud.streaming import StreamingAggregate
from common import protocol as p
from common.calibration import bn_statistics_of
from common.models import NUM_BLOCKS, SPECS, State, build_model
from common.mqtt_link import BrokerSettings, Link
from common.training import TrainConfig, accuracy_per_exit

RUN_FILE = "fleet_run.json"
HEADER_SLACK = 64 * 1024  # tensor-file header allowance on top of the raw tensor bytes
LIVE = ("open", "calibrating")  # round states in which devices fetch and upload
CALIBRATION = "calibrate"  # the blob key of the full model sent for static BatchNorm
BlobKey = tuple[int, float] | str  # (depth, width) of a task's submodel, or CALIBRATION


@dataclass
class CloudOptions:
    min_updates: int = 1
    round_timeout: float = 600.0
    transfer_dtype: str = "float32"
    select: str = "all"  # "all": the simulator's draw; "online": only devices online now
    wait_devices: int | None = None  # devices online before a round opens; None: min_updates
    upload_slots: int = 16
    send_window: int = 64  # unacknowledged weight chunks in flight
    slot_timeout: float = 60.0  # an upload that stalls this long is dropped (device re-offers)
    eval_data: str | None = None
    log_limit: int = 20  # rejections logged per reason per round (all are counted)
    fetch_budget: float = 8.0  # bytes a device may fetch per blob per round, in blob sizes
    absent_grace: float = 30.0  # after this long, tasks of devices offline hold no round open
    connect_timeout: float = 60.0  # give up without a first broker connection; 0: never
    export_onnx: bool = False  # export and serve each round's global model as ONNX graphs
    export_quantize: str | None = None  # "int8": also static int8 graphs
    serve_graphs_s: float = 60.0  # after the last round, keep answering fetch_graph this long


@dataclass
class ModelRelease:
    """A round's exported graphs as served: the retained ``model`` message and the bytes of
    every file (``manifest.json`` included) by sha256, held in memory while they are current."""

    round: int
    directory: Path
    message: bytes
    blobs: dict[str, tuple[bytes, p.BlobRef]]

    @property
    def size(self) -> int:
        return sum(ref.size for _, ref in self.blobs.values())


@dataclass
class Task:
    """What one device is asked for in a round: a trained update, or (static BN) statistics."""

    device: str
    task: ClientTask
    seed: int
    key: BlobKey  # tasks with equal keys share a weights blob
    spec: p.TensorSpec  # of the blob the device uploads
    max_update: int
    dtype: str  # wire dtype of the uploaded blob's floating tensors
    message: bytes = b""


@dataclass
class Upload:
    ref: p.BlobRef
    offer: dict[str, Any]
    reassembly: p.Reassembly | None = None  # None while waiting for a slot
    last_activity: float = field(default_factory=time.monotonic)


@dataclass
class Round:
    number: int
    deadline: float  # wall clock (unix), as sent to devices
    tasks: dict[str, Task]
    blobs: dict[BlobKey, tuple[bytes, p.BlobRef]]
    aggregate: StreamingAggregate | BnStatsSum  # the latter in a round's calibration phase
    guard: RoundGuard | None = None  # the round's clipping (None while calibrating)
    state: str = "open"
    opened: float = field(default_factory=time.monotonic)
    accepted: dict[str, dict[str, Any]] = field(default_factory=dict)
    uploads: dict[str, Upload] = field(default_factory=dict)
    waiting: deque[str] = field(default_factory=deque)
    fetched: Counter[str] = field(default_factory=Counter)  # weight bytes queued per device
    bytes_down: int = 0
    bytes_up: int = 0
    extended: int = 0


class BrokerUnreachable(RuntimeError):
    """No first connection to the broker within ``connect_timeout``: the message says why and
    what to check."""


class FleetCloud:
    def __init__(self, cfg: RunConfig, fleet: Fleet, out_dir: str | Path,
                 broker: BrokerSettings, opts: CloudOptions,
                 log: Callable[[str], None] = print, client_id: str = "hmf-cloud") -> None:
        if opts.transfer_dtype not in p.WIRE_DTYPES:
            raise ValueError(f"transfer dtype must be one of {list(p.WIRE_DTYPES)}")
        self.cfg, self.fleet, self.out, self.opts, self.log = cfg, fleet, Path(out_dir), opts, log
        self.fed = fleet.federation(cfg.participants, cfg.tier_mix)
        if cfg.weighting == "samples" and any(d.samples is None for d in fleet.devices):
            raise ValueError("--weighting samples needs every device's sample count in the "
                             "fleet file (\"samples\", as hmf-cloud partition writes it): a "
                             "device's own claim is not a weight the cloud can trust")
        self.strategy: Strategy = strategy_for(cfg)  # seeded: same hypernetworks as hmf simulate
        self.distiller = Distiller.for_run(cfg)
        self.guard = ServerGuard(cfg.clip_factor, cfg.clip_window,
                                 SPECS[cfg.model].num_classes)
        self.eval = _load_eval(opts.eval_data) if opts.eval_data else None
        self.link = Link(client_id, broker,
                         [p.device_topic("+", name) for name in p.DEVICE_UP],
                         will=(p.cloud_topic("status"), p.make_control("status",
                                                                        state="offline")),
                         max_inflight=max(20, opts.send_window))
        self.presence: dict[str, dict[str, Any]] = {}
        self.round: Round | None = None
        self.run_id = ""
        self.rounds_total = cfg.rounds
        self.finished = False
        self.sending: deque[tuple[str, BlobKey, int, int]] = deque()
        self.inflight: set[int] = set()
        self.logged: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()  # refused input since the last metrics row
        self.duplicates: Counter[str] = Counter()  # harmless repeats since the last row
        self.queued: set[tuple[str, BlobKey, int]] = set()  # (device, blob, index) in sending
        self.graph_fetched: Counter[str] = Counter()  # graph bytes queued per device, release
        self.release: ModelRelease | None = None  # the graphs being served
        self.graph_sending: deque[tuple[str, str, int, int]] = deque()  # device, sha, index, round
        self.graph_queued: set[tuple[str, str, int]] = set()  # (device, sha, index) in the deque
        self.graph_bytes = 0  # graph chunk bytes sent since the last metrics row
        self._export_samples: Any = None  # export.data.ExportData, loaded on first export
        self.last_failure: tuple[str, str] | None = None  # ("unreachable"|"refused", reason)

    # ------------------------------------------------------------------ run
    def run(self, resume: bool = False) -> list[dict[str, Any]]:
        first, state = self._start(resume)
        runlog = RunLog(self.out, self.cfg.to_json(), resume_round=first - 1)
        self.link.start()
        try:
            self._wait_connected()
            for r in range(first, self.cfg.rounds + 1):
                self._wait_for_devices()
                state, row = self._play_round(state, r)
                save_checkpoint(self.out, r, state, self.strategy, self.cfg.to_json(),
                                self.guard.to_json())
                if self.opts.export_onnx:
                    row["export"] = self._export_round(r, state)
                    row["bytes_graphs"], self.graph_bytes = self.graph_bytes, 0
                runlog.append(row)
                self.log(format_fleet_round(row, self.cfg.rounds))
            self._clear_tasks()
            self._serve_final_model()
            self.finished = True
            self._publish_round_message()
            self._set_release(None)  # nobody answers fetch_graph once the cloud has left
            self.log(f"run {self.run_id} finished: {self.out / 'summary.json'}")
        finally:
            self.link.stop(last=(p.cloud_topic("status"),
                                 p.make_control("status", state="offline")))
        return runlog.rows

    def _start(self, resume: bool) -> tuple[int, State]:
        """(first round, global state): a fresh run, or the checkpoint's state and RNG."""
        first, state = 1, initial_state(self.cfg)
        run_file = self.out / RUN_FILE
        if resume and (self.out / CHECKPOINT).exists():
            done, state, meta = load_checkpoint(self.out, self.strategy)
            _check_same_run(meta["config"], self.cfg.to_json())
            saved = json.loads(run_file.read_text())
            if saved["fleet"] != self.fleet.to_json():
                raise ValueError("--resume with another fleet file than the checkpoint's run")
            self.run_id, first = saved["run"], done + 1
            self.guard.load_json(meta.get("guard"))
            self.log(f"resuming run {self.run_id} in {self.out} after round {done}")
            self._resume_release(done, state)
        else:
            if resume:
                self.log(f"no checkpoint in {self.out}: starting from round 1")
            self.out.mkdir(parents=True, exist_ok=True)
            self.run_id = uuid.uuid4().hex[:12]
            run_file.write_text(json.dumps({"run": self.run_id, "fleet": self.fleet.to_json()})
                                + "\n")
        return first, state

    def _wait_connected(self) -> None:
        """Until the first connection to the broker; ``BrokerUnreachable`` after
        ``connect_timeout`` seconds (0: wait forever). Every failed attempt is logged with its
        reason and the back-off (``_handle``). Later losses are waited out however long: a
        restarted broker comes back."""
        limit = self.opts.connect_timeout
        deadline = time.monotonic() + limit if limit > 0 else float("inf")
        while not self.link.connected.is_set():
            if time.monotonic() > deadline:
                raise BrokerUnreachable(self._unreachable_message())
            self._pump(min(0.5, max(deadline - time.monotonic(), 0.0)))

    def _unreachable_message(self) -> str:
        where = f"{self.link.settings.host}:{self.link.settings.port}"
        kind, reason = self.last_failure or ("unreachable", "no answer")
        waited = f"within {self.opts.connect_timeout:g} s"
        if kind == "refused":
            return (f"the broker at {where} refused the cloud {waited} ({reason}): "
                    f"{_refusal_hint(reason)}; --connect-timeout 0 retries forever")
        return (f"could not reach the broker at {where} {waited} (last attempt: {reason}): "
                "check --broker and that mosquitto runs (mosquitto -c DIR/mosquitto.conf); "
                "--connect-timeout 0 retries forever")

    def _wait_for_devices(self) -> None:
        want = self.opts.wait_devices
        want = self.opts.min_updates if want is None else want
        want = min(want, len(self.fleet.devices))
        said = -1
        while len(self.online()) < want:
            if len(self.online()) != said:
                said = len(self.online())
                self.log(f"waiting for devices: {said}/{want} online")
            self._pump(0.5)

    def online(self) -> set[str]:
        return {d for d, h in self.presence.items() if h["type"] == "hello"}

    # ------------------------------------------------------------------ one round
    def _play_round(self, state: State, r: int) -> tuple[State, dict[str, Any]]:
        start = time.perf_counter()
        self._open_round(state, r)
        rnd = self.round
        assert rnd is not None
        need = min(self.opts.min_updates, len(rnd.tasks))
        self._collect(rnd)
        while len(rnd.accepted) < need:
            rnd.deadline = time.time() + self.opts.round_timeout
            rnd.extended += 1
            self.log(f"round {r}: {len(rnd.accepted)} of at least {need} updates at the "
                     f"deadline: waiting another {self.opts.round_timeout:g}s")
            self._publish_round_message()
            self._collect(rnd)
        return self._close_round(state, start)

    def _collect(self, rnd: Round) -> None:
        """Handle events until every task of ``rnd`` is answered or its deadline has passed."""
        while not self._answered(rnd) and (left := rnd.deadline - time.time()) > 0:
            self._pump(min(left, 0.5))
            self._expire_uploads()

    def _answered(self, rnd: Round) -> bool:
        """Every task answered; or, ``absent_grace`` after the round opened, every task of a
        device that is online, with at least ``min_updates`` in: a device that is not there
        (the simulator's draw includes it) does not hold the round to its deadline."""
        if len(rnd.accepted) == len(rnd.tasks):
            return True
        if time.monotonic() - rnd.opened < self.opts.absent_grace:
            return False
        online = self.online()
        waiting = [d for d in rnd.tasks if d not in rnd.accepted and d in online]
        return not waiting and len(rnd.accepted) >= min(self.opts.min_updates, len(rnd.tasks))

    def _open_round(self, state: State, r: int) -> None:
        online = None
        if self.opts.select == "online":
            online = {self.fleet.index(d) for d in self.online()}
        tasks = self.strategy.tasks(select(self.fed, self.cfg.seed, r, online))
        order = [t.client for t in tasks]
        deadline = time.time() + self.opts.round_timeout
        guard = self.guard.round(state)
        ensemble = self.distiller.ensemble(order) if self.distiller is not None else None
        rnd = Round(r, deadline, {}, {}, StreamingAggregate(self.strategy, state, order, guard,
                                                            ensemble),
                    guard)
        specs: dict[tuple[int, float], p.TensorSpec] = {}
        for t in tasks:
            key = (t.depth, t.width_fraction)
            if key not in rnd.blobs:
                sent = self.strategy.submodel(state, t)[1]
                blob = p.encode_state(sent, self.opts.transfer_dtype)
                rnd.blobs[key], specs[key] = (blob, p.blob_ref(blob)), p.spec_of(sent)
            device = self.fleet.devices[t.client].id
            rnd.tasks[device] = Task(device, t, seed_of(self.cfg.seed, 5, r, t.client), key,
                                     specs[key], _max_update(specs[key], self.opts.transfer_dtype),
                                     self.opts.transfer_dtype)
        self.round = rnd
        self.logged.clear()
        self._publish_round_message()
        for task in rnd.tasks.values():
            task.message = self._task_message(task)
            self.link.publish(p.device_topic(task.device, "task"), task.message, retain=True)
        tiers = Counter(t.task.tier for t in rnd.tasks.values())
        self.log(f"round {r}: {len(rnd.tasks)} tasks (tier 1/2/3: "
                 f"{tiers[1]}/{tiers[2]}/{tiers[3]}), deadline in {self.opts.round_timeout:g}s")

    def _train_json(self) -> dict[str, Any]:
        """The local training every task asks for: the run's settings plus the strategy's loss
        (self-distillation for depthfl and scalefl), exactly as the simulator builds it."""
        cfg = self.strategy.train_config(
            TrainConfig(self.cfg.local_epochs, self.cfg.batch_size, self.cfg.lr))
        return {k: v for k, v in cfg.to_json().items() if v is not None}

    def _task_message(self, task: Task) -> bytes:
        assert self.round is not None
        return p.make_control(
            "task", run=self.run_id, round=self.round.number, device=task.device,
            model=self.cfg.model, depth=task.task.depth, width=task.task.width_fraction,
            seed=task.seed, train=self._train_json(),
            weights=self.round.blobs[task.key][1], dtype=self.opts.transfer_dtype,
            deadline=self.round.deadline)

    def _close_round(self, state: State, start: float) -> tuple[State, dict[str, Any]]:
        rnd = self.round
        assert rnd is not None and isinstance(rnd.aggregate, StreamingAggregate)
        rnd.state = "closed"
        self._publish_round_message()
        self._clear_sending()
        server_start = time.perf_counter()
        snapshot = server_snapshot(self.strategy)
        new_state, metrics = rnd.aggregate.finish(rnd.number)
        new_state = server_step(state, new_state, self.strategy.server_lr)
        ensemble = rnd.aggregate.ensemble
        if ensemble is not None and self.distiller is not None and not non_finite(new_state):
            new_state, distilled = self.distiller.apply(new_state, ensemble, rnd.number)
            metrics.update(distilled)
        server_s = time.perf_counter() - server_start
        if self.strategy.static_bn and not non_finite(new_state):  # never send a broken model
            new_state, metrics["calibration"] = self._calibrate(rnd, new_state)
        updates = list(rnd.accepted.values())
        tier_of = {d: t.task.tier for d, t in rnd.tasks.items()}
        losses = [u["loss"] for u in updates if u["loss"] is not None]
        row: dict[str, Any] = {
            "round": rnd.number, "strategy": self.strategy.name,
            "participants": {str(t): sum(1 for d in rnd.accepted if tier_of[d] == t)
                             for t in (1, 2, 3)},
            "selected": {str(t): sum(1 for d in tier_of.values() if d == t) for t in (1, 2, 3)},
            "devices_online": len(self.online()), "devices": len(self.fleet.devices),
            "server_s": server_s, "hypernet_s": metrics.pop("hypernet_s", 0.0),
            "bytes_down": rnd.bytes_down, "bytes_up": rnd.bytes_up,
            "transfer_dtype": self.opts.transfer_dtype,
            "train_loss": float(np.mean(losses)) if losses else None,
            "rejected": dict(self.rejected), "duplicates": dict(self.duplicates),
            "clipped": rnd.guard.metrics() if rnd.guard else {},
            "absent": sorted(set(rnd.tasks) - set(rnd.accepted) - self.online())[:50],
            "deadline_extended": rnd.extended,
            **metrics,
        }
        self.rejected, self.duplicates = Counter(), Counter()
        if not rnd.tasks:
            row["note"] = "no participant could train this strategy's model: global unchanged"
        local = _device_accuracy(tier_of, rnd.accepted)
        if local:
            row["device_acc"] = local
        evaluated = self.eval is not None and (rnd.number % self.cfg.eval_every == 0
                                               or rnd.number == self.cfg.rounds)
        acc = self._accuracy(new_state) if evaluated and not non_finite(new_state) else None
        assert rnd.guard is not None
        kept, why = self.guard.settle(rnd.guard, self.strategy, snapshot, state, new_state, acc)
        row["committed"] = why is None
        if why is not None:
            self.log(f"round {rnd.number}: not committed: {why}; the global model of the round "
                     "before stays")
            row["note"] = f"not committed: {why}; the previous global model stays"
            row["refused_acc"] = acc
            acc = self._accuracy(kept) if evaluated else None
        if acc is not None:
            row["acc"] = {"global": acc}
        row["elapsed_s"] = time.perf_counter() - start
        for reason, n in self.logged.items():
            if n > self.opts.log_limit:
                self.log(f"round {rnd.number}: {n - self.opts.log_limit} more '{reason}' "
                         "rejections not shown")
        return kept, row

    def _accuracy(self, state: State) -> dict[str, float | None]:
        assert self.eval is not None
        return _global_accuracy(self.cfg.model, state, self.eval,
                                self.strategy.evaluated_exits())

    # ------------------------------------------------------------------ static BatchNorm
    def _calibrate(self, trained: Round, state: State) -> tuple[State, dict[str, Any]]:
        """HeteroFL's static BN, the deployable way: every device whose update was accepted
        computes the BatchNorm statistics of the new global model ``state`` on its own train
        data (``calibrate`` message, full model through the weights path) and uploads only
        them (offer/slot/chunk path); ``BnStatsSum`` combines them. Devices that do not answer
        by the deadline (``round_timeout``) are left out. The phase's traffic and rejections
        count in ``trained``'s metrics."""
        start = time.perf_counter()
        rnd = self._open_calibration(trained, state)
        self._collect(rnd)
        late = sorted(set(rnd.tasks) - set(rnd.accepted))
        if late:
            self.log(f"round {rnd.number}: no statistics from {', '.join(late[:20])} by the "
                     "deadline: left out of the BatchNorm statistics")
        if not rnd.accepted:
            self.log(f"round {rnd.number}: no device sent statistics: the aggregate's "
                     "BatchNorm statistics stay")
        self.round = trained
        self._publish_round_message()  # "closed": nothing more is taken for this round
        self._clear_sending()
        trained.bytes_down += rnd.bytes_down
        trained.bytes_up += rnd.bytes_up
        return rnd.aggregate.result(), {"asked": len(rnd.tasks), "answered": len(rnd.accepted),
                                        "s": time.perf_counter() - start}

    def _open_calibration(self, trained: Round, state: State) -> Round:
        """The calibration phase of round ``trained`` as a round of its own (same number, state
        ``calibrating``), so fetching and uploading run through the round machinery."""
        blob = p.encode_state(state, self.opts.transfer_dtype)
        spec = p.spec_of(bn_statistics_of(state))
        deadline = time.time() + self.opts.round_timeout
        rnd = Round(trained.number, deadline, {}, {CALIBRATION: (blob, p.blob_ref(blob))},
                    BnStatsSum(state), state="calibrating")
        for device in sorted(trained.accepted):
            rnd.tasks[device] = Task(device, trained.tasks[device].task, 0, CALIBRATION, spec,
                                     _max_update(spec, "float32"), "float32")
        self.round = rnd
        self._publish_round_message()
        for task in rnd.tasks.values():
            task.message = p.make_control(
                "calibrate", run=self.run_id, round=rnd.number, device=task.device,
                model=self.cfg.model, weights=rnd.blobs[CALIBRATION][1],
                dtype=self.opts.transfer_dtype, deadline=deadline)
            self.link.publish(p.device_topic(task.device, "task"), task.message, retain=True)
        self.log(f"round {rnd.number}: {len(rnd.tasks)} devices recompute BatchNorm "
                 f"statistics, deadline in {self.opts.round_timeout:g}s")
        return rnd

    # ------------------------------------------------------------------ serving the model
    def _export_round(self, r: int, state: State) -> dict[str, Any]:
        """Export round ``r``'s global model and serve it; on failure keep serving the last
        good export. Returns the metrics row's ``export`` entry."""
        start = time.perf_counter()
        directory = self.out / "onnx" / f"round_{r}"
        try:
            export_graphs(self.cfg, state, directory, self._export_data(),
                          self.opts.export_quantize,
                          {"round": r, "run": self.run_id, "strategy": self.strategy.name})
            release = load_release(directory, self.run_id, r)
        except (RuntimeError, ValueError, OSError) as e:  # ExportCheckError is a RuntimeError
            kept = self.release.round if self.release else None
            self.log(f"round {r}: ONNX export failed ({str(e)[:300]}); "
                     + (f"round {kept}'s graphs stay current" if kept else "no graphs served"))
            return {"ok": False, "s": time.perf_counter() - start, "error": str(e)[:500],
                    "serving": kept}
        self._set_release(release)
        seconds = time.perf_counter() - start
        self.log(f"round {r}: exported {len(release.blobs) - 1} ONNX graphs "
                 f"({release.size / 1e6:.1f} MB) to {directory} in {seconds:.1f}s; serving them")
        return {"ok": True, "s": seconds, "dir": str(directory), "files": len(release.blobs) - 1,
                "bytes": release.size, "serving": r}

    def _export_data(self) -> Any:
        """The export's check (and int8 calibration) samples, loaded once per run."""
        if self._export_samples is None:
            from export.data import export_data

            evaluation = 2000 if self.opts.export_quantize else 64  # fp32 checks use 64
            self._export_samples = export_data(self.cfg.model, self.cfg.data_dir,
                                               calibration=256, evaluation=evaluation)
        return self._export_samples

    def _resume_release(self, done: int, state: State) -> None:
        """On --resume: serve the checkpoint round's graphs (exported again if they are missing
        or broken), else the newest intact export of this run."""
        if not self.opts.export_onnx or done < 1:
            return
        release = self._load_export(done)
        if release is None:
            # what stays current if exporting the checkpoint's round fails
            self.release = next((r for k in range(done - 1, 0, -1)
                                 if (r := self._load_export(k))), None)
            self._export_round(done, state)
            release = self.release
        self._set_release(release)
        if release is not None:
            self.log(f"serving round {release.round}'s graphs from {release.directory}")

    def _load_export(self, r: int) -> ModelRelease | None:
        directory = self.out / "onnx" / f"round_{r}"
        if not (directory / "manifest.json").is_file():
            return None
        try:
            return load_release(directory, self.run_id, r)
        except (ValueError, OSError, KeyError, TypeError) as e:
            self.log(f"cannot serve {directory}: {str(e)[:300]}")
            return None

    def _set_release(self, release: ModelRelease | None) -> None:
        """Make ``release`` current (None: serve nothing) and tell everyone (retained)."""
        self.release = release
        self.graph_sending.clear()  # chunks of the previous release are not wanted any more
        self.graph_queued.clear()
        self.graph_fetched.clear()
        if self.link.connected.is_set():  # else the next connect publishes it (_republish)
            self._publish_model()

    def _publish_model(self) -> None:
        """The retained model message; an empty one clears a previous run's."""
        payload = self.release.message if self.release is not None else b""
        self.link.publish(p.cloud_topic("model"), payload, retain=True)

    def _serve_final_model(self) -> None:
        """Keep answering fetch_graph after the last round, so devices get the final graphs."""
        if self.release is None or self.opts.serve_graphs_s <= 0:
            return
        self.log(f"serving round {self.release.round}'s graphs for "
                 f"{self.opts.serve_graphs_s:g}s before finishing")
        end = time.monotonic() + self.opts.serve_graphs_s
        while (left := end - time.monotonic()) > 0:
            self._pump(min(left, 0.5))

    def _on_fetch_graph(self, device: str, msg: dict[str, Any]) -> None:
        rel = self.release
        if msg["run"] != self.run_id:
            raise p.ProtocolError("unknown run", msg["run"])
        if rel is None:
            raise p.ProtocolError("unknown blob", "no model is being served")
        if msg["round"] != rel.round:
            raise p.ProtocolError("stale round", f"graphs of round {msg['round']}, serving "
                                                 f"round {rel.round}")
        if msg["sha256"] not in rel.blobs:
            raise p.ProtocolError("unknown blob", msg["sha256"][:16])
        ref = rel.blobs[msg["sha256"]][1]
        for i in self._admit(device, ref.sha256, msg["missing"], ref, self.graph_queued,
                             self.graph_fetched, self.opts.fetch_budget * rel.size):
            self.graph_sending.append((device, ref.sha256, i, rel.round))

    def _send_graph_chunks(self) -> None:
        """Graph chunks share the window with task weights, which go first: training is on the
        round's critical path, serving is not."""
        while (self.graph_sending and not self.sending
               and len(self.inflight) < self.opts.send_window):
            if not self.link.connected.is_set():
                return
            device, sha, index, number = self.graph_sending.popleft()
            self.graph_queued.discard((device, sha, index))
            rel = self.release
            if rel is None or number != rel.round:
                continue
            self.graph_bytes += self._publish_chunk(device, "graphs", *rel.blobs[sha], index,
                                                    number)

    # ------------------------------------------------------------------ events
    def _pump(self, timeout: float) -> None:
        """Handle the events that arrive within ``timeout`` (then any already queued)."""
        try:
            ev = self.link.events.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            self._send_chunks()
            return
        for _ in range(10_000):
            self._handle(ev)
            try:
                ev = self.link.events.get_nowait()
            except queue.Empty:
                break
        self._send_chunks()

    def _handle(self, ev: tuple[Any, ...]) -> None:
        kind = ev[0]
        if kind == "message":
            self._on_message(ev[1], ev[2])
        elif kind == "published":
            self.inflight.discard(ev[1])
        elif kind == "connected":
            self.last_failure = None
            self.log("connected to the broker")
            self._republish()
        elif kind == "disconnected":
            if self.last_failure is None:  # not the close that follows a refused attempt
                self.log(f"lost the broker ({ev[1]}): reconnecting with backoff")
            self._clear_sending()
            self.graph_sending.clear()
            self.graph_queued.clear()
            self.inflight.clear()
        elif kind in ("refused", "unreachable"):
            self.last_failure = (kind, ev[1])
            where = f"{self.link.settings.host}:{self.link.settings.port}"
            what = (f"the broker at {where} refused the connection ({ev[1]}): "
                    f"{_refusal_hint(ev[1])}" if kind == "refused"
                    else f"cannot reach the broker at {where} ({ev[1]})")
            self.log(f"{what}; retrying in {ev[2]} s")

    def _republish(self) -> None:
        """After any (re)connect: retained state may be gone (a restarted broker)."""
        self.link.publish(p.cloud_topic("status"), p.make_control("status", state="online"),
                          retain=True)
        self._publish_model()
        if self.round is not None:
            self._publish_round_message()
            if self.round.state in LIVE:
                for task in self.round.tasks.values():
                    self.link.publish(p.device_topic(task.device, "task"), task.message,
                                      retain=True)

    def _publish_round_message(self) -> None:
        if self.round is None:
            return
        state = "finished" if self.finished else self.round.state
        msg = p.make_control("round", run=self.run_id, round=self.round.number,
                             rounds=self.cfg.rounds, state=state, deadline=self.round.deadline)
        self.link.publish(p.cloud_topic("round"), msg, retain=True)

    def _clear_tasks(self) -> None:
        for device in self.fleet.ids:
            self.link.publish(p.device_topic(device, "task"), b"", retain=True)

    def _on_message(self, topic: str, payload: bytes) -> None:
        device = "?"
        try:
            device, name = p.parse_device_topic(topic)
            if self.fleet.index(device) is None:
                raise p.ProtocolError("unknown device", device)
            if name == "presence":
                self._on_presence(device, payload)
            elif name == "request":
                msg = p.parse_control(payload, "fetch", "offer", "fetch_graph")
                if msg["device"] != device:
                    raise p.ProtocolError("device mismatch", f"{msg['device']} on {topic}")
                handler = {"fetch": self._on_fetch, "offer": self._on_offer,
                           "fetch_graph": self._on_fetch_graph}[msg["type"]]
                handler(device, msg)
            elif name == "update":
                self._on_chunk(device, p.parse_chunk(payload))
            else:
                raise p.ProtocolError("bad topic", topic)
        except p.ProtocolError as e:
            self._reject(device, e.reason, e.detail)
        except Exception as e:  # noqa: BLE001  a bug or a case no check foresaw: this input's
            # fault, never the run's (issue 19: one update with a bool in a shape stopped it)
            self._reject(device, "unhandled input", f"{type(e).__name__}: {e}")

    def _reject(self, device: str, reason: str, detail: str) -> None:
        """Count and log refused input; whatever the device wrote is escaped and cut short."""
        self.rejected[reason] += 1
        self.logged[reason] += 1
        if self.logged[reason] <= self.opts.log_limit:
            self.log(f"rejected from {device}: {reason}: {p.printable(detail)}")

    def _on_presence(self, device: str, payload: bytes) -> None:
        if not payload:  # a retained presence being cleared
            return
        msg = p.parse_control(payload, "hello", "bye")
        if msg["device"] != device:
            raise p.ProtocolError("device mismatch", msg["device"])
        before = self.presence.get(device, {}).get("type")
        self.presence[device] = msg
        if msg["type"] == "hello" and before != "hello":
            tier = self.fleet.devices[self.fleet.index(device)].tier
            note = ""
            if msg["tier"] is not None and msg["tier"] < tier:
                note = f" (declares tier {msg['tier']}: it will refuse tier-{tier} tasks)"
            self.log(f"device {device} online: tier {tier}, {msg['samples']} samples, "
                     f"software {p.printable(msg['software'], 64)}{note}")
        elif msg["type"] == "bye" and before != "bye":
            self.log(f"device {device} offline: {p.printable(msg['reason'], 120)}")

    def _current(self, device: str, msg: dict[str, Any]) -> Task:
        """The open round's task of ``device`` that ``msg`` is about, or a ProtocolError."""
        rnd = self.round
        if msg["run"] != self.run_id or rnd is None:
            raise p.ProtocolError("unknown run", msg["run"])
        if msg["round"] != rnd.number or rnd.state not in LIVE:
            raise p.ProtocolError("stale round", f"round {msg['round']}, open: "
                                                 f"{rnd.number if rnd.state in LIVE else None}")
        task = rnd.tasks.get(device)
        if task is None:
            raise p.ProtocolError("no task", f"{device} has no task in round {rnd.number}")
        return task

    # ------------------------------------------------------------------ weights out
    def _on_fetch(self, device: str, msg: dict[str, Any]) -> None:
        """Queue the chunks asked for, each once however often it is asked, and no more than
        ``fetch_budget`` times the blob's bytes per device and round (a fetch costs the cloud
        a megabyte a chunk for a few bytes of request)."""
        task = self._current(device, msg)
        rnd = self.round
        assert rnd is not None
        _, ref = rnd.blobs[task.key]
        if msg["sha256"] != ref.sha256:
            raise p.ProtocolError("unknown blob", msg["sha256"][:16])
        for i in self._admit(device, task.key, msg["missing"], ref, self.queued, rnd.fetched,
                             self.opts.fetch_budget * ref.size):
            self.sending.append((device, task.key, i, rnd.number))

    def _admit(self, device: str, key: Any, missing: list[int] | None, ref: p.BlobRef,
               queued: set, fetched: Counter, budget: int) -> list[int]:
        """The chunks of a fetch to queue: each once however often it is asked (repeats are
        counted as duplicates), and within ``budget`` bytes per device (``fetched`` holds what
        was sent; ProtocolError "fetch budget" past it). Marks them queued and spent."""
        admitted = []
        for i in wanted_chunks(missing, ref):
            if (device, key, i) in queued:
                self.duplicates["fetched chunk"] += 1
                continue
            size = chunk_size(ref, i)
            if fetched[device] + size > budget:
                raise p.ProtocolError("fetch budget", f"{fetched[device]} bytes already sent "
                                      f"to {device} this round, at most {budget}")
            fetched[device] += size
            queued.add((device, key, i))
            admitted.append(i)
        return admitted

    def _clear_sending(self) -> None:
        self.sending.clear()
        self.queued.clear()

    def _send_chunks(self) -> None:
        self._send_weight_chunks()
        self._send_graph_chunks()

    def _send_weight_chunks(self) -> None:
        """Publish queued weight chunks while fewer than ``send_window`` await their PUBACK."""
        rnd = self.round
        while self.sending and len(self.inflight) < self.opts.send_window:
            if not self.link.connected.is_set() or rnd is None:
                return
            device, key, index, number = self.sending.popleft()
            self.queued.discard((device, key, index))
            if number != rnd.number or rnd.state not in LIVE:
                continue
            rnd.bytes_down += self._publish_chunk(device, "weights", *rnd.blobs[key], index,
                                                  number)

    def _publish_chunk(self, device: str, topic: str, blob: bytes, ref: p.BlobRef, index: int,
                       number: int) -> int:
        """One chunk frame to a device, counted against the send window; returns its bytes."""
        frame = p.chunk_frame(blob, ref, index, self.run_id, number)
        self.inflight.add(self.link.publish(p.device_topic(device, topic), frame).mid)
        return len(frame)

    # ------------------------------------------------------------------ updates in
    def _reply(self, device: str, sha: str, status: str, reason: str = "",
               missing: list[int] | None = None) -> None:
        """``missing``: with ``send``, the chunks the cloud still lacks (None: all of them)."""
        assert self.round is not None
        self.link.publish(p.device_topic(device, "reply"), p.make_control(
            "reply", run=self.run_id, round=self.round.number, device=device, sha256=sha,
            status=status, reason=p.printable(reason, 300)[:300], missing=missing))

    def _on_offer(self, device: str, msg: dict[str, Any]) -> None:
        task = self._current(device, msg)
        rnd = self.round
        assert rnd is not None
        ref: p.BlobRef = msg["blob"]
        if device in rnd.accepted:  # a repeated offer: say again what happened
            self.duplicates["offer"] += 1
            self._reply(device, rnd.accepted[device]["sha256"], "accepted", "duplicate offer")
            return
        if ref.size > task.max_update:
            self._reply(device, ref.sha256, "rejected", "update larger than the task's model")
            raise p.ProtocolError("oversized update", f"{ref.size} > {task.max_update} bytes")
        current = rnd.uploads.get(device)
        if current is not None and current.ref == ref:  # repeated (a reconnect, a retry)
            self.duplicates["offer"] += 1
            current.last_activity = time.monotonic()
            if current.reassembly is None:
                self._reply(device, ref.sha256, "wait")
            else:  # resume: only what is still missing, not the whole upload again
                have = current.reassembly.have
                self._reply(device, ref.sha256, "send",
                            missing=current.reassembly.missing() if have else None)
            return
        rnd.uploads[device] = Upload(ref, msg)  # a new blob replaces an older upload
        if device not in rnd.waiting:
            rnd.waiting.append(device)
        self._grant_slots()
        if rnd.uploads[device].reassembly is None:
            self._reply(device, ref.sha256, "wait", "all upload slots busy")

    def _grant_slots(self) -> None:
        rnd = self.round
        assert rnd is not None
        busy = sum(1 for u in rnd.uploads.values() if u.reassembly is not None)
        while rnd.waiting and busy < self.opts.upload_slots:
            device = rnd.waiting.popleft()
            upload = rnd.uploads.get(device)
            if upload is None or upload.reassembly is not None:
                continue
            upload.reassembly = p.Reassembly(upload.ref)
            upload.last_activity = time.monotonic()
            busy += 1
            self._reply(device, upload.ref.sha256, "send")

    def _expire_uploads(self) -> None:
        rnd = self.round
        if rnd is None:
            return
        now = time.monotonic()
        for device, up in list(rnd.uploads.items()):
            if up.reassembly is not None and now - up.last_activity > self.opts.slot_timeout:
                del rnd.uploads[device]
                self._reject(device, "missing chunks", f"upload stalled {self.opts.slot_timeout:g}"
                             f"s, missing {up.reassembly.missing()[:20]}: slot freed")
        self._grant_slots()

    def _on_chunk(self, device: str, chunk: p.Chunk) -> None:
        rnd = self.round
        if chunk.run != self.run_id or rnd is None:
            raise p.ProtocolError("unknown run", chunk.run)
        if chunk.round != rnd.number or rnd.state not in LIVE:
            raise p.ProtocolError("stale round", f"chunk of round {chunk.round}")
        up = rnd.uploads.get(device)
        if device in rnd.accepted and rnd.accepted[device]["sha256"] == chunk.sha256:
            self.duplicates["chunk"] += 1  # a resend of what is in: harmless, not hostile
            return
        if up is None or up.reassembly is None:
            raise p.ProtocolError("unexpected chunk", "no upload slot granted")
        if not up.reassembly.add(chunk):
            self.duplicates["chunk"] += 1
            return
        up.last_activity = time.monotonic()
        if up.reassembly.complete:
            self._finish_upload(device, up)

    def _finish_upload(self, device: str, up: Upload) -> None:
        rnd = self.round
        assert rnd is not None and up.reassembly is not None
        task = rnd.tasks[device]
        del rnd.uploads[device]
        try:
            blob = up.reassembly.blob()
            state = self._checked_state(device, blob, task)
        except Exception as e:
            reason = e.reason if isinstance(e, p.ProtocolError) else "unhandled input"
            self._reply(device, up.ref.sha256, "rejected", f"{reason}: {e}")
            self._grant_slots()
            raise
        offer = up.offer
        samples = self._samples(device, offer["samples"])
        if isinstance(rnd.aggregate, BnStatsSum):
            rnd.aggregate.add(state)
        else:
            rnd.aggregate.add(ClientUpdate(task.task, samples, state,
                                           offer["loss"] if offer["loss"] is not None
                                           else float("nan")))
        rnd.accepted[device] = {"sha256": up.ref.sha256, "loss": offer["loss"],
                                "local_acc": offer["local_acc"], "samples": samples}
        rnd.bytes_up += len(blob)
        self._reply(device, up.ref.sha256, "accepted")
        self._grant_slots()

    def _checked_state(self, device: str, blob: bytes, task: Task) -> State:
        """The uploaded state, decoded and checked against the task; else a ProtocolError."""
        rnd = self.round
        assert rnd is not None
        state, meta = p.decode_state(blob, task.spec, task.dtype)
        if (meta.get("run"), meta.get("round"), meta.get("device")) != (
                self.run_id, rnd.number, device):
            raise p.ProtocolError("stale round", f"update says {meta.get('run')}/"
                                                 f"{meta.get('round')}/{meta.get('device')}")
        if isinstance(rnd.aggregate, BnStatsSum):
            p.check_bn_statistics(state)
        elif (reason := screen(state)) is not None:
            raise p.ProtocolError(reason, "a BatchNorm variance below 0")
        return state

    def _samples(self, device: str, claimed: int) -> int:
        """A device's weight under ``--weighting samples``: its claim, but never more than the
        fleet file says it holds (the cloud's own knowledge)."""
        known = self.fleet.devices[self.fleet.index(device)].samples  # type: ignore[index]
        return claimed if known is None else min(claimed, known)


# ---------------------------------------------------------------------- exported graphs
def export_graphs(cfg: RunConfig, state: State, directory: Path, data: Any,
                  quantize: str | None, source: dict[str, Any]) -> None:
    """``export.exporter.export_onnx`` of ``state`` into ``directory``, checks included.

    The export builds torch modules, whose initialisation draws from torch's global RNG; the
    run's RNG (checkpointed, so that a resumed run computes what an uninterrupted one does) is
    restored afterwards, so exporting never changes what the next round computes."""
    from export.exporter import export_onnx

    with torch.random.fork_rng(devices=[]):
        export_onnx(cfg.model, state, directory, data, quantize=quantize, source=source)


def load_release(directory: Path, run_id: str, server_round: int) -> ModelRelease:
    """An export of this run read back for serving: every file is checked against the
    manifest's sha256 (ValueError otherwise) and described in the ``model`` message."""
    manifest_bytes = (directory / "manifest.json").read_bytes()
    manifest = json.loads(manifest_bytes)
    if manifest.get("source", {}).get("run") != run_id:
        raise ValueError(f"{directory} was exported by another run")
    manifest_ref = p.blob_ref(manifest_bytes)
    blobs = {manifest_ref.sha256: (manifest_bytes, manifest_ref)}
    files = []
    for entry in manifest["files"]:
        data = (directory / entry["file"]).read_bytes()
        ref = p.blob_ref(data)
        if ref.sha256 != entry["sha256"]:
            raise ValueError(f"{directory / entry['file']}: sha256 differs from the manifest's")
        files.append(p.GraphFile(entry["file"], entry["kind"], entry["index"],
                                 entry["precision"], ref))
        blobs[ref.sha256] = (data, ref)
    message = p.make_control("model", run=run_id, round=server_round, model=manifest["model"],
                             format=manifest["format"], manifest=manifest_ref, files=files)
    return ModelRelease(server_round, directory, message, blobs)


# ---------------------------------------------------------------------- helpers
def wanted_chunks(missing: list[int] | None, ref: p.BlobRef) -> list[int]:
    """The chunk indices a fetch asks for, each once and in range. A list longer than the
    blob has chunks is not what an honest device sends (it asks for what it lacks)."""
    if missing is None:
        return list(range(ref.chunks))
    if len(missing) > ref.chunks:
        raise p.ProtocolError("oversized request", f"{len(missing)} indices for a blob of "
                                                   f"{ref.chunks} chunks")
    return sorted({i for i in missing if i < ref.chunks})


def chunk_size(ref: p.BlobRef, index: int) -> int:
    return min(ref.chunk_bytes, ref.size - index * ref.chunk_bytes)


def _refusal_hint(reason: str) -> str:
    if "authori" in reason.lower() or "password" in reason.lower():
        return ("check --username (default hmf-cloud) and --password-file against the "
                "broker's password file (hmf-cloud broker-config writes secrets/hmf-cloud.txt)")
    return "check the broker's log"


def _max_update(spec: p.TensorSpec, dtype: str) -> int:
    wire = p.WIRE_DTYPES[dtype]
    total = 0
    for shape, dt in spec.values():
        itemsize = torch.empty((), dtype=wire if dt.is_floating_point else dt).element_size()
        total += int(np.prod(shape, dtype=np.int64)) * itemsize
    return total + HEADER_SLACK


def _load_eval(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    with np.load(path, allow_pickle=False) as f:
        return torch.from_numpy(np.asarray(f["x"], np.float32)), torch.from_numpy(
            np.asarray(f["y"], np.int64))


def _global_accuracy(model: str, state: State, data: tuple[torch.Tensor, torch.Tensor],
                     exits: int) -> dict[str, float | None]:
    net = build_model(model)
    net.load_state_dict(state)
    acc = accuracy_per_exit(net, data[0], data[1])
    return {str(e): (acc[e - 1] if e <= exits else None) for e in range(1, NUM_BLOCKS + 1)}


def _device_accuracy(tier_of: dict[str, int], accepted: dict[str, dict[str, Any]]
                     ) -> dict[str, Any]:
    """Devices' own test accuracy of the model they were sent (the previous global model), at
    their deepest exit, by tier: the authors' "mean local test accuracy", reported by devices."""
    by_tier: dict[int, list[float]] = {}
    for device, u in accepted.items():
        if u["local_acc"]:
            by_tier.setdefault(tier_of[device], []).append(u["local_acc"][-1])
    if not by_tier:
        return {}
    every = [a for v in by_tier.values() for a in v]
    return {"tier": {str(t): float(np.mean(by_tier[t])) if t in by_tier else None
                     for t in (1, 2, 3)}, "local_mean": float(np.mean(every))}


def format_fleet_round(row: dict[str, Any], rounds: int) -> str:
    sel, got = row["selected"], row["participants"]
    parts = [f"round {row['round']:>3}/{rounds}", f"{row['elapsed_s']:6.1f}s",
             f"devices {row['devices_online']}/{row['devices']}",
             "updates " + " ".join(f"t{t}:{got[t]}/{sel[t]}" for t in ("1", "2", "3"))]
    if row.get("train_loss") is not None:
        parts.append(f"loss {row['train_loss']:.3f}")
    if row["rejected"]:
        parts.append(f"rejected {sum(row['rejected'].values())}")
    if "acc" in row:
        g = row["acc"]["global"]
        parts.append("global[" + " ".join(f"{k}:{v:.3f}" if v is not None else f"{k}:-"
                                          for k, v in g.items()) + "]")
    if "device_acc" in row:
        parts.append(f"devices-local {row['device_acc']['local_mean']:.3f}")
    if "note" in row:
        parts.append(f"({row['note']})")
    return "  ".join(parts)


__all__ = ["CloudOptions", "FleetCloud", "format_fleet_round"]
