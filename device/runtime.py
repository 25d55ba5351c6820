"""Inference on a device from an exported model directory, with ONNX Runtime alone.

Reads ``manifest.json`` (written by ``hmf export onnx``), checks every graph's sha256 before use,
and offers two ways to classify:

* at a chosen exit (``predict(x, exit=k)``), with the per-exit graph that computes only blocks
  1..k;
* as a cascade (``cascade(x, threshold)``): segment after segment, each sample leaves at the
  first exit whose softmax confidence reaches the threshold (or at the deepest exported exit),
  so easy samples pay only for the shallow blocks.

Needs only numpy and onnxruntime (requirements-device.txt): no torch, no onnx.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

FORMAT = "hmf-onnx/1"
MANIFEST = "manifest.json"


class ManifestError(ValueError):
    """A model directory that is not a complete, intact export."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Manifest:
    """``manifest.json`` of an export directory."""

    dir: Path
    data: dict[str, Any]

    @classmethod
    def load(cls, model_dir: str | Path, verify: bool = True) -> Manifest:
        """Reads the manifest; with ``verify`` also checks each file's sha256, so a truncated
        copy or a file from another export is refused before it gives wrong answers."""
        d = Path(model_dir)
        path = d / MANIFEST
        if not path.is_file():
            raise ManifestError(f"no {MANIFEST} in {d}: export one with `hmf export onnx`")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ManifestError(f"{path} is not JSON: {e}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ManifestError(f"{path}: format {data.get('format')!r}, expected {FORMAT!r}")
        manifest = cls(d, data)
        if verify:
            manifest.verify()
        return manifest

    def verify(self) -> None:
        for f in self.data["files"]:
            path = self.dir / f["file"]
            if not path.is_file():
                raise ManifestError(f"{path} is listed in the manifest but missing")
            if _sha256(path) != f["sha256"]:
                raise ManifestError(f"{path}: sha256 differs from the manifest's "
                                    "(corrupt or from another export)")

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
    def precisions(self) -> list[str]:
        return list(self.data["precisions"])

    def indices(self, kind: str, precision: str = "fp32") -> list[int]:
        """The exits (``kind="exit"``) or segments exported at ``precision``."""
        return sorted(f["index"] for f in self.data["files"]
                      if f["kind"] == kind and f["precision"] == precision)

    def entry(self, kind: str, index: int, precision: str = "fp32") -> dict[str, Any]:
        for f in self.data["files"]:
            if (f["kind"], f["index"], f["precision"]) == (kind, index, precision):
                return f
        raise ManifestError(f"{self.dir}: no {precision} {kind} {index} (exported: "
                            f"{kind}s {self.indices(kind, precision)} at {self.precisions})")


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
    """Per sample: the label, the exit that gave it and its softmax confidence."""

    labels: np.ndarray  # int64 (N,)
    exits: np.ndarray  # int64 (N,)
    confidences: np.ndarray  # float32 (N,)


class DeviceModel:
    """ONNX Runtime sessions for one exported model at one precision.

    Sessions are created on first use, so a device that only ever runs exit 1 never loads the
    deeper graphs. ``threads``: intra-op threads per session (None: one per core); ``providers``:
    ONNX Runtime execution providers in order of preference (default the CPU); ``verify``:
    check every file's sha256 first; ``spin``: let idle thread pools spin (see
    ``session_options``).
    """

    def __init__(self, model_dir: str | Path, *, precision: str = "fp32",
                 threads: int | None = None, providers: list[str] | None = None,
                 verify: bool = True, spin: bool = False) -> None:
        self.manifest = Manifest.load(model_dir, verify=verify)
        if precision not in self.manifest.precisions:
            raise ManifestError(f"{model_dir} has no {precision} graphs (has "
                                f"{', '.join(self.manifest.precisions)}); export with "
                                "--quantize int8 for int8")
        self.precision, self.threads, self.spin = precision, threads, spin
        self.providers = providers or ["CPUExecutionProvider"]
        self._sessions: dict[tuple[str, int], ort.InferenceSession] = {}

    @property
    def exits(self) -> list[int]:
        return self.manifest.indices("exit", self.precision)

    @property
    def segments(self) -> list[int]:
        return self.manifest.indices("segment", self.precision)

    def close(self) -> None:
        """Drops every session (and the memory ONNX Runtime holds for it)."""
        self._sessions.clear()

    def session(self, kind: str, index: int) -> ort.InferenceSession:
        key = (kind, index)
        if key not in self._sessions:
            entry = self.manifest.entry(kind, index, self.precision)
            self._sessions[key] = ort.InferenceSession(
                str(self.manifest.dir / entry["file"]), session_options(self.threads, self.spin),
                providers=self.providers)
        return self._sessions[key]

    def prepare(self, x: np.ndarray) -> np.ndarray:
        """Checks the shape and applies the manifest's preprocessing where the graph does not:
        uint8 images are normalised as in training; float input is taken as already prepared."""
        x = np.asarray(x)
        shape = self.manifest.input_shape
        if x.shape == shape:
            x = x[None]
        if x.shape[1:] != shape:
            raise ValueError(f"expected samples of shape {shape} (or a batch of them), got "
                             f"{x.shape}")
        pre = self.manifest.data["input"]["preprocessing"]
        if x.dtype == np.uint8 and pre.get("kind") == "image":
            n = pre["normalize"]
            x = (x.astype(np.float32) / n["scale"] - n["mean"]) / n["std"]
        return np.ascontiguousarray(x, dtype=np.float32)

    def logits(self, x: np.ndarray, exit: int) -> np.ndarray:
        """Logits of exit ``exit`` from its own graph (blocks 1..exit only)."""
        sess = self.session("exit", exit)
        return sess.run(None, {sess.get_inputs()[0].name: self.prepare(x)})[0]

    def predict(self, x: np.ndarray, exit: int | None = None) -> Prediction:
        """Labels at exit ``exit`` (default: the deepest exported one)."""
        k = exit if exit is not None else self.exits[-1]
        p = softmax(self.logits(x, k))
        return Prediction(p.argmax(1), np.full(len(p), k), p.max(1).astype(np.float32))

    def run_segment(self, k: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(features, logits) of segment ``k``; ``x`` is the input (k = 1) or the features of
        segment k - 1."""
        sess = self.session("segment", k)
        features, logits = sess.run(None, {sess.get_inputs()[0].name: x})
        return features, logits

    def cascade(self, x: np.ndarray, threshold: float, max_exit: int | None = None
                ) -> Prediction:
        """Early exit: each sample leaves at the first exit whose softmax confidence is at least
        ``threshold``, or at ``max_exit`` (default: the deepest exported segment). A batch is
        narrowed after every exit, so only unsure samples pay for the next block."""
        last = max_exit or self.segments[-1]
        feats = self.prepare(x)
        n = len(feats)
        labels, exits = np.zeros(n, np.int64), np.zeros(n, np.int64)
        conf = np.zeros(n, np.float32)
        pending = np.arange(n)
        for k in range(1, last + 1):
            feats, logits = self.run_segment(k, feats)
            p = softmax(logits)
            best = p.max(1)
            done = best >= threshold if k < last else np.ones(len(best), bool)
            idx = pending[done]
            labels[idx], exits[idx], conf[idx] = p.argmax(1)[done], k, best[done]
            pending, feats = pending[~done], feats[~done]
            if len(pending) == 0:
                break
        return Prediction(labels, exits, conf)
