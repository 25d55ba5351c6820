"""Inference on a device from an exported model directory, with ONNX Runtime alone.

Reads ``manifest.json`` (written by ``hmf export onnx``), checks every graph's sha256 before use,
and offers two ways to classify:

* at a chosen exit (``predict(x, exit=k)``), with the per-exit graph that computes only blocks
  1..k;
* as a cascade (``cascade(x, threshold)``): segment after segment, each sample leaves at the
  first exit whose softmax confidence reaches the threshold (or at the deepest exported exit),
  so easy samples pay only for the shallow blocks.

Both run in bounded batches (``DeviceModel.default_batch_size``: at most ``DEFAULT_BATCH``
samples per ONNX Runtime call, fewer for large samples), so memory stays flat whatever the
input's size, and neither labels a sample whose input holds NaN or Inf: its
``Prediction.status`` says so instead. The manifest is validated first (common/manifest.py), and
a graph that ONNX Runtime cannot load, or whose inputs and outputs do not fit the manifest, is a
``ManifestError`` naming the file, not a raw ONNX Runtime error.

Needs only numpy and onnxruntime (requirements-device.txt): no torch, no onnx.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from common.manifest import FORMAT, MANIFEST, InputStatistics, ManifestError, input_warnings
from common.manifest import read as read_manifest
from common.manifest import sha256_file as _sha256

DEFAULT_BATCH = 256  # samples per ONNX Runtime call at most: bounds memory at any input size
# ... and at most this many input values per call: ONNX Runtime's buffers grow with the batch
# times the size of a sample (stl10's 3x96x96 images: 3.2 GB at batch 256, 0.3 GB at 16)
BATCH_VALUES = 2**19

# Prediction.status: why a sample has no label
VALID, NONFINITE_INPUT, NONFINITE_OUTPUT = 0, 1, 2
STATUS_TEXT = {NONFINITE_INPUT: "non-finite input", NONFINITE_OUTPUT: "non-finite output"}

__all__ = ["BATCH_VALUES", "DEFAULT_BATCH", "FORMAT", "MANIFEST", "DeviceModel", "Manifest",
           "ManifestError", "Prediction", "STATUS_TEXT", "session_options", "softmax"]

_REFETCH = "re-export it with `hmf export onnx` or fetch it again"


@dataclass(frozen=True)
class Manifest:
    """``manifest.json`` of an export directory, validated (common/manifest.py)."""

    dir: Path
    data: dict[str, Any]

    @classmethod
    def load(cls, model_dir: str | Path, verify: bool = True) -> Manifest:
        """Reads and validates the manifest; with ``verify`` also checks each file's size and
        sha256, so a truncated copy or a file from another export is refused before it gives
        wrong answers."""
        d = Path(model_dir)
        path = d / MANIFEST
        if not path.is_file():
            raise ManifestError(f"no {MANIFEST} in {d}: export one with `hmf export onnx`")
        manifest = cls(d, read_manifest(path))
        if verify:
            manifest.verify()
        return manifest

    def verify(self) -> None:
        for f in self.data["files"]:
            path = self.dir / f["file"]
            if not path.is_file():
                raise ManifestError(f"{path} is listed in the manifest but missing; {_REFETCH}")
            size = path.stat().st_size
            if size != f["bytes"]:
                raise ManifestError(f"{path} is {size} bytes, the manifest says {f['bytes']} "
                                    f"(a truncated copy or from another export); {_REFETCH}")
            if _sha256(path) != f["sha256"]:
                raise ManifestError(f"{path}: sha256 differs from the manifest's "
                                    f"(corrupt or from another export); {_REFETCH}")

    @property
    def model(self) -> str:
        return self.data["model"]

    @property
    def class_names(self) -> list[str]:
        return list(self.data["class_names"])

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample's shape (without the batch axis)."""
        return tuple(self.data["input"]["shape"][1:])

    @property
    def expected(self) -> dict[str, Any] | None:
        """``input.expected`` (what the input must look like), if the export recorded it."""
        return self.data["input"].get("expected")

    @property
    def precisions(self) -> list[str]:
        return list(self.data["precisions"])

    def indices(self, kind: str, precision: str = "fp32") -> list[int]:
        """The exits (``kind="exit"``) or segments that run at ``precision``: for int8 also
        those the export kept in fp32 (see ``entry``)."""
        wanted = {precision, "fp32"} if self._int8_with_fallback(precision) else {precision}
        return sorted({f["index"] for f in self.data["files"]
                       if f["kind"] == kind and f["precision"] in wanted})

    def entry(self, kind: str, index: int, precision: str = "fp32") -> dict[str, Any]:
        """The graph that runs ``kind`` ``index`` at ``precision``. For int8, where the export
        left the int8 graph out because it lost accuracy (``quantization.kept_fp32``), the fp32
        graph: int8 where it is good enough, fp32 elsewhere."""
        found = {f["precision"]: f for f in self.data["files"]
                 if (f["kind"], f["index"]) == (kind, index)}
        if precision in found:
            return found[precision]
        if self._int8_with_fallback(precision) and "fp32" in found:
            return found["fp32"]
        raise ManifestError(f"{self.dir}: no {precision} {kind} {index} (exported: "
                            f"{kind}s {self.indices(kind, precision)} at {self.precisions})")

    def _int8_with_fallback(self, precision: str) -> bool:
        return precision == "int8" and "int8" in self.precisions


def session_options(threads: int | None = None, spin: bool = False) -> ort.SessionOptions:
    """One inference at a time, ``threads`` intra-op threads (None: ONNX Runtime's default, one
    per physical core), all graph optimisations.

    Spinning is off by default: each graph has its own thread pool, and a pool that keeps
    spinning after its call steals the cores from the next segment of a cascade, from local
    training and from the MQTT loop (measured on 2 busy cores: exit 3 of hapt took 17 ms with
    spinning pools, 2.6 ms without). It also wastes a battery-powered board's energy."""
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return opts


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class Prediction:
    """Per sample: the label, the exit that gave it and its softmax confidence.

    ``status`` says why a sample has no label (``STATUS_TEXT``): its input held NaN or Inf, or
    the graph's logits did. Such samples are never run through or labelled silently: their
    label is -1, exit 0 and confidence 0."""

    labels: np.ndarray  # int64 (N,)
    exits: np.ndarray  # int64 (N,)
    confidences: np.ndarray  # float32 (N,)
    status: np.ndarray | None = None  # uint8 (N,), VALID (0) or a key of STATUS_TEXT

    def __post_init__(self) -> None:
        if self.status is None:
            object.__setattr__(self, "status", np.zeros(len(self.labels), np.uint8))

    @property
    def valid(self) -> np.ndarray:
        return np.asarray(self.status) == VALID

    @classmethod
    def empty(cls, n: int) -> Prediction:
        return cls(np.full(n, -1, np.int64), np.zeros(n, np.int64), np.zeros(n, np.float32),
                   np.zeros(n, np.uint8))


def _finite_rows(x: np.ndarray) -> np.ndarray:
    return np.isfinite(x.reshape(len(x), -1)).all(axis=1)


def _ort_message(e: Exception) -> str:
    """ONNX Runtime's message without its noise (first line, bounded)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:300]


class DeviceModel:
    """ONNX Runtime sessions for one exported model at one precision.

    Sessions are created on first use, so a device that only ever runs exit 1 never loads the
    deeper graphs. ``threads``: intra-op threads per session (None: one per core); ``providers``:
    ONNX Runtime execution providers in order of preference (default the CPU); ``verify``:
    check every file's sha256 first; ``spin``: let idle thread pools spin (see
    ``session_options``).

    ``predict`` and ``cascade`` run at most ``batch_size`` samples per ONNX Runtime call
    (default: ``default_batch_size``), so memory does not grow with the input (a file opened
    by device/inputs.py is read batch by batch).
    """

    def __init__(self, model_dir: str | Path, *, precision: str = "fp32",
                 threads: int | None = None, providers: list[str] | None = None,
                 verify: bool = True, spin: bool = False) -> None:
        self.manifest = Manifest.load(model_dir, verify=verify)
        if precision not in self.manifest.precisions:
            kept = (self.manifest.data.get("quantization") or {}).get("kept_fp32")
            why = (f"the export kept every graph in fp32 ({', '.join(kept)} lost accuracy in "
                   "int8)" if kept else "export with --quantize int8 for int8")
            raise ManifestError(f"{model_dir} has no {precision} graphs (has "
                                f"{', '.join(self.manifest.precisions)}): {why}")
        self.precision, self.threads, self.spin = precision, threads, spin
        # exits (and their segments) this board runs in fp32 although int8 was asked for
        # (device/precision.py: its int8 kernels disagree with fp32 there)
        self.fp32_exits: set[int] = set()
        self.providers = providers or ["CPUExecutionProvider"]
        self._sessions: dict[tuple[str, int], ort.InferenceSession] = {}

    @property
    def default_batch_size(self) -> int:
        """``DEFAULT_BATCH`` samples, fewer when a batch would hold over ``BATCH_VALUES`` input
        values (256 for hapt's 3x151 windows, 170 for 3x32x32 images, 18 for stl10's)."""
        values = math.prod(self.manifest.input_shape)
        return max(1, min(DEFAULT_BATCH, BATCH_VALUES // values))

    @property
    def exits(self) -> list[int]:
        return self.manifest.indices("exit", self.precision)

    @property
    def segments(self) -> list[int]:
        return self.manifest.indices("segment", self.precision)

    def close(self) -> None:
        """Drops every session (and the memory ONNX Runtime holds for it)."""
        self._sessions.clear()

    # ------------------------------------------------------------------ sessions
    def precision_of(self, kind: str, index: int) -> str:
        """The precision graph ``kind`` ``index`` actually runs at."""
        return self.graph(kind, index)["precision"]

    def graph(self, kind: str, index: int) -> dict[str, Any]:
        """The manifest entry of the graph that runs ``kind`` ``index``."""
        precision = "fp32" if index in self.fp32_exits else self.precision
        return self.manifest.entry(kind, index, precision)

    def _path(self, kind: str, index: int) -> Path:
        return self.manifest.dir / self.graph(kind, index)["file"]

    def session(self, kind: str, index: int) -> ort.InferenceSession:
        """The session of a graph, built on first use. A file that matches its sha256 but is
        not a graph ONNX Runtime can load, or whose inputs and outputs do not fit the manifest,
        is a ManifestError (a manifest rewritten by hand, an export gone wrong)."""
        key = (kind, index)
        if key not in self._sessions:
            path = self._path(kind, index)
            try:
                sess = ort.InferenceSession(str(path), session_options(self.threads, self.spin),
                                            providers=self.providers)
            except Exception as e:  # ONNX Runtime's own types (InvalidProtobuf, Fail, ...)
                raise ManifestError(f"{path} is not a loadable ONNX graph: {_ort_message(e)}; "
                                    f"{_REFETCH}") from None
            self._check_io(sess, kind, index, path)
            self._sessions[key] = sess
        return self._sessions[key]

    def _check_io(self, sess: ort.InferenceSession, kind: str, index: int, path: Path) -> None:
        ins, outs = sess.get_inputs(), sess.get_outputs()
        want_outs = 1 if kind == "exit" else 2
        problem = None
        if len(ins) != 1 or len(outs) != want_outs:
            problem = (f"has {len(ins)} input(s) and {len(outs)} output(s); a {kind} graph has "
                       f"1 and {want_outs}")
        elif ins[0].type != "tensor(float)":
            problem = f"takes {ins[0].type}, not float32"
        elif kind == "exit" or index == 1:
            got, want = list(ins[0].shape), self.manifest.input_shape
            if len(got) != len(want) + 1 or any(isinstance(g, int) and g != w
                                                for g, w in zip(got[1:], want, strict=True)):
                problem = f"takes input {got}, the manifest says {['batch', *want]}"
        if problem is None:
            classes = outs[-1].shape[-1] if outs[-1].shape else None
            n = len(self.manifest.class_names)
            if isinstance(classes, int) and classes != n:
                problem = f"gives {classes} logits but the manifest names {n} classes"
        if problem:
            raise ManifestError(f"{path} does not fit its manifest: it {problem}; {_REFETCH}")

    def _run(self, kind: str, index: int, x: np.ndarray) -> list[np.ndarray]:
        sess = self.session(kind, index)
        try:
            out = sess.run(None, {sess.get_inputs()[0].name: x})
        except Exception as e:  # shapes were checked: a graph that fails to run is broken
            raise ManifestError(f"{self._path(kind, index)} failed to run on a batch of shape "
                                f"{x.shape}: {_ort_message(e)}; {_REFETCH}") from None
        n = len(self.manifest.class_names)
        if out[-1].ndim != 2 or out[-1].shape[1] != n:
            raise ManifestError(f"{self._path(kind, index)} gives logits of shape "
                                f"{out[-1].shape} but the manifest names {n} classes; "
                                f"{_REFETCH}")
        return out

    # ------------------------------------------------------------------ input
    def as_batch(self, x: np.ndarray) -> np.ndarray:
        """``x`` as a batch of samples of the manifest's input shape (one sample gains a batch
        axis). Checks the shape and dtype only: a lazily read file (device/inputs.py) is not
        read."""
        if not (hasattr(x, "shape") and hasattr(x, "dtype")):  # a lazy file reader stays lazy
            x = np.asarray(x)
        shape = self.manifest.input_shape
        if x.dtype.kind not in "fiu":
            raise ValueError(f"samples must be numbers (float or integer), got dtype {x.dtype}")
        if tuple(x.shape) == shape:
            x = np.asarray(x)[None]
        if tuple(x.shape[1:]) != shape:
            raise ValueError(f"expected samples of shape {shape} (or a batch of them, "
                             f"{('N', *shape)}), got {x.shape}")
        return x

    def prepare(self, x: np.ndarray) -> np.ndarray:
        """Checks the shape and applies the manifest's preprocessing where the graph does not:
        uint8 images are normalised as in training; float input is taken as already prepared.
        Returns a float32 batch (one copy of ``x``: call it on one batch at a time)."""
        x = self.as_batch(x)
        pre = self.manifest.data["input"].get("preprocessing") or {}
        if x.dtype == np.uint8 and pre.get("kind") == "image":
            n = pre["normalize"]
            x = (x.astype(np.float32) / n["scale"] - n["mean"]) / n["std"]
        return np.ascontiguousarray(x, dtype=np.float32)

    def batches(self, x: np.ndarray, batch_size: int | None = None
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(row numbers, prepared batch) of the finite rows of ``x``, ``batch_size`` rows of
        ``x`` at a time; rows holding NaN or Inf are left out."""
        batch_size = batch_size or self.default_batch_size
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1 (got {batch_size})")
        x = self.as_batch(x)
        for start in range(0, len(x), batch_size):
            xb = self.prepare(x[start:start + batch_size])
            finite = _finite_rows(xb)
            yield start + np.flatnonzero(finite), (xb if finite.all() else xb[finite])

    def statistics(self, x: np.ndarray, batch_size: int | None = None) -> InputStatistics:
        """Per-channel statistics of the finite samples of ``x``, as the graph sees them."""
        stats = InputStatistics(self.manifest.input_shape[0])
        for _, xb in self.batches(x, batch_size):
            stats.add(xb)
        return stats

    def input_warnings(self, x: np.ndarray, batch_size: int | None = None) -> list[str]:
        """Why ``x`` looks unlike the samples the model was calibrated on
        (``common.manifest.input_warnings``); empty if it looks alike or the manifest has no
        ``input.expected.statistics`` to compare with."""
        expected = self.manifest.expected or {}
        if not expected.get("statistics"):
            return []
        return input_warnings(self.statistics(x, batch_size), expected["statistics"],
                              axes=expected.get("axes"), unit=expected.get("unit"))

    # ------------------------------------------------------------------ inference
    def logits(self, x: np.ndarray, exit: int) -> np.ndarray:
        """Logits of exit ``exit`` from its own graph (blocks 1..exit only), in one call."""
        return self._run("exit", exit, self.prepare(x))[0]

    def predict(self, x: np.ndarray, exit: int | None = None,
                batch_size: int | None = None) -> Prediction:
        """Labels at exit ``exit`` (default: the deepest exported one). Rows holding NaN or
        Inf are not run: their ``status`` says so."""
        if not self.exits:
            raise ManifestError(f"{self.manifest.dir} has no {self.precision} exit graphs: "
                                "classify with the cascade (--threshold)")
        k = exit if exit is not None else self.exits[-1]
        x = self.as_batch(x)
        res = Prediction.empty(len(x))
        res.status[:] = NONFINITE_INPUT  # until the row's batch says otherwise
        for rows, xb in self.batches(x, batch_size):
            if len(rows):
                self._settle(res, rows, self._run("exit", k, xb)[0], k)
        return res

    def run_segment(self, k: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(features, logits) of segment ``k``; ``x`` is the input (k = 1) or the features of
        segment k - 1."""
        features, logits = self._run("segment", k, x)
        return features, logits

    def cascade(self, x: np.ndarray, threshold: float, max_exit: int | None = None,
                batch_size: int | None = None) -> Prediction:
        """Early exit: each sample leaves at the first exit whose softmax confidence is at least
        ``threshold``, or at ``max_exit`` (default: the deepest exported segment). A batch is
        narrowed after every exit, so only unsure samples pay for the next block."""
        if math.isnan(threshold):
            raise ValueError("threshold must be a number between 0 and 1, not NaN")
        if not self.segments:
            raise ManifestError(f"{self.manifest.dir} has no {self.precision} segment graphs: "
                                "use --exit")
        last = max_exit or self.segments[-1]
        missing = sorted(set(range(1, last + 1)) - set(self.segments))
        if missing:  # before anything runs, not halfway through the file
            raise ManifestError(f"{self.manifest.dir} has no {self.precision} segment "
                                f"{missing[0]}, which the cascade to exit {last} needs (its "
                                f"{self.precision} segments: {self.segments}); cascade at "
                                "another --precision, or classify with --exit")
        x = self.as_batch(x)
        res = Prediction.empty(len(x))
        res.status[:] = NONFINITE_INPUT
        for rows, xb in self.batches(x, batch_size):
            pending, feats = rows, xb
            for k in range(1, last + 1):
                if len(pending) == 0:
                    break
                feats, logits = self.run_segment(k, feats)
                best = self._confidence(logits)
                done = (best >= threshold) | ~np.isfinite(best) | (k == last)
                self._settle(res, pending[done], logits[done], k)
                pending, feats = pending[~done], feats[~done]
        return res

    @staticmethod
    def _confidence(logits: np.ndarray) -> np.ndarray:
        """Top softmax probability per row; NaN where the logits are not finite."""
        ok = np.isfinite(logits).all(axis=1)
        best = np.full(len(logits), np.nan, np.float32)
        if ok.any():
            best[ok] = softmax(logits[ok]).max(1)
        return best

    @staticmethod
    def _settle(res: Prediction, rows: np.ndarray, logits: np.ndarray, k: int) -> None:
        """Writes the answers for ``rows`` from their logits at exit ``k``."""
        ok = np.isfinite(logits).all(axis=1)
        res.status[rows[~ok]] = NONFINITE_OUTPUT
        good = rows[ok]
        res.status[good] = VALID
        if len(good):
            p = softmax(logits[ok])
            res.labels[good], res.exits[good] = p.argmax(1), k
            res.confidences[good] = p.max(1)
