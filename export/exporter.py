"""Export a global model to ONNX for devices: one graph per exit, one per segment, a manifest.

What lands in the output directory:

* ``exit_<k>.onnx``: raw input -> logits of exit k (stem, blocks 1..k, head k only);
* ``segment_<k>.onnx``: segment 1 takes the raw input, segment k > 1 the features of segment
  k-1; each returns its block's features and its head's logits (run them in order and stop at
  the first confident exit);
* with ``--quantize int8`` the same graphs as ``*.int8.onnx``;
* ``manifest.json``: what a device needs to run them without torch or onnx (see docs/DEVICE.md).

The export checks its own output before it writes the manifest, and refuses to write one for a
graph that fails: ``onnx.checker`` on every file, ONNX Runtime against torch on real samples
(max abs logit difference <= 1e-4 for logits of magnitude up to 1, scaled by the largest logit
above that, same argmax), and the chained segments against the per-exit graphs. The legacy
TorchScript exporter (``dynamo=False``) is used: it needs no onnxscript, folds BatchNorm into
the convolutions and writes the weights inside the ``.onnx`` file.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from common import cpu, tensorfile
from common.manifest import FORMAT, MANIFEST, channel_statistics
from common.models import NUM_BLOCKS, SPECS, State, build_model
from export.data import ExportData, Samples
from export.graphs import exit_graph, graph_macs, graph_params, segment_graph, tier_model
from export.quantize import DEFAULT_SCHEME, SCHEMES

CHECKPOINT = "checkpoint.hmf"
INPUT = "input"
# Max abs logit difference allowed between ONNX Runtime and torch (fp32) for logits up to 1 in
# magnitude. float32 rounding is relative, so it scales with the largest logit: a trained model's
# logits of ~700 differ by ~1e-4 from summation order alone (2e-7 relative).
TOLERANCE = 1e-4


def tolerance_for(logits: np.ndarray, tol: float = TOLERANCE) -> float:
    return tol * max(1.0, float(np.abs(logits).max()))
DEFAULT_OPSET = 17  # supported by every ONNX Runtime >= 1.14, JetPack 5's included
ACCEL_UNITS = {"hapt": "g"}  # UniMiB SHAR stores m/s^2


class ExportCheckError(RuntimeError):
    """An exported graph failed a check; no manifest was written."""


# ---------------------------------------------------------------------------------------------
# Inputs: checkpoints and what the manifest says about the model's input


def load_global_state(path: str | os.PathLike) -> tuple[State, dict[str, Any], Path]:
    """(global state, checkpoint meta, file) from a run directory or a checkpoint file.

    Reads the tensor file directly (``global.<name>`` tensors, meta with ``model`` and
    ``round``) so that exporting needs nothing of the server's code.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    tensors, meta = tensorfile.load(path)
    state = {k[len("global."):]: v for k, v in tensors.items() if k.startswith("global.")}
    if meta.get("model") not in SPECS:
        raise ValueError(f"{path}: meta names model {meta.get('model')!r}, not one of "
                         f"{', '.join(SPECS)}")
    if not state:
        raise ValueError(f"{path} holds no global.* tensors")
    return state, meta, path


def preprocessing(name: str) -> dict[str, Any]:
    """How a device turns its raw data into the graph's input (the in-graph reshape included)."""
    spec = SPECS[name]
    if tuple(spec.input_shape) == tuple(spec.image_shape):
        return {"kind": "image", "layout": "NCHW", "normalize": {"scale": 255.0, "mean": 0.5,
                                                                 "std": 0.5},
                "description": "pixels v in 0..255 -> (v/255 - 0.5)/0.5, i.e. [-1, 1]; "
                               "hmf-device predict applies it to uint8 input itself"}
    unit = ACCEL_UNITS.get(name, "m/s^2")
    image = "x".join(map(str, spec.image_shape))
    return {"kind": "raw", "unit": unit, "layout": "N x axes(x,y,z) x samples",
            "in_graph": f"drops the last sample of each axis and reads the rest row-major as "
                        f"{image} (the model's InputView)",
            "description": f"raw accelerometer values in {unit}, gravity included, "
                           f"not normalised"}


def versions() -> dict[str, str]:
    """Library versions that made the graphs (a device with another ONNX Runtime may differ)."""
    try:
        hmf = metadata.version("hmf")
    except metadata.PackageNotFoundError:
        hmf = "unknown"
    return {"hmf": hmf, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": ort.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# torch -> ONNX


def to_onnx(module: nn.Module, example: torch.Tensor, path: Path, inputs: Sequence[str],
            outputs: Sequence[str], opset: int) -> None:
    """Exports ``module`` with a dynamic batch axis, weights inside the file."""
    axes = {n: {0: "batch"} for n in (*inputs, *outputs)}
    with warnings.catch_warnings():  # the legacy exporter warns that it is the legacy exporter
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (example,), str(path), dynamo=False,
                          input_names=list(inputs), output_names=list(outputs),
                          dynamic_axes=axes, opset_version=opset, do_constant_folding=True)


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_batched(sess: ort.InferenceSession, x: np.ndarray, batch: int = 256) -> list[np.ndarray]:
    """All outputs of ``sess`` on ``x``, in batches (bounded memory for big test sets)."""
    name = sess.get_inputs()[0].name
    parts = [sess.run(None, {name: np.ascontiguousarray(x[i : i + batch])})
             for i in range(0, len(x), batch)]
    return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]


def _file_entry(out: Path, file: str, kind: str, index: int, precision: str, module: nn.Module,
                example: torch.Tensor, inputs: Sequence[str],
                outputs: Sequence[str]) -> dict[str, Any]:
    path = out / file
    return {"file": file, "kind": kind, "index": index, "precision": precision,
            "sha256": sha256(path), "bytes": path.stat().st_size,
            "params": graph_params(module), "macs": graph_macs(module, example),
            "inputs": list(inputs), "outputs": list(outputs)}


def export_fp32(name: str, state: State, out: Path, tiers: Sequence[int], opset: int,
                example: torch.Tensor) -> list[dict[str, Any]]:
    """Writes the fp32 exit graphs of ``tiers`` and segments 1..max(tiers); their entries."""
    entries = []
    for k in tiers:
        module = exit_graph(name, state, k)
        to_onnx(module, example, out / f"exit_{k}.onnx", [INPUT], ["logits"], opset)
        entries.append(_file_entry(out, f"exit_{k}.onnx", "exit", k, "fp32", module, example,
                                   [INPUT], ["logits"]))
    x = example
    for k in range(1, max(tiers) + 1):
        module = segment_graph(name, state, k)
        ins, outs = [INPUT if k == 1 else f"features_{k - 1}"], [f"features_{k}", f"logits_{k}"]
        to_onnx(module, x, out / f"segment_{k}.onnx", ins, outs, opset)
        entries.append(_file_entry(out, f"segment_{k}.onnx", "segment", k, "fp32", module, x,
                                   ins, outs))
        with torch.no_grad():
            x = module(x)[0]
    return entries


# ---------------------------------------------------------------------------------------------
# Checks


def _by(entries: list[dict[str, Any]], kind: str, precision: str) -> dict[int, dict[str, Any]]:
    return {e["index"]: e for e in entries if e["kind"] == kind and e["precision"] == precision}


def chain_logits(out: Path, segments: dict[int, dict[str, Any]], x: np.ndarray
                 ) -> dict[int, np.ndarray]:
    """Logits of every exit from running the segment graphs one after the other."""
    logits = {}
    for k in sorted(segments):
        x, logits[k] = run_batched(session(out / segments[k]["file"]), x)
    return logits


def onnx_check(path: Path) -> None:
    """``onnx.checker`` with full shape inference; a failure is an ExportCheckError."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportCheckError(f"{path.name} fails onnx.checker: {e}") from None


def _agreement(a: np.ndarray, b: np.ndarray, tol: float) -> tuple[float, int]:
    """(share of samples whose argmax agrees, disagreements where b's top two logits are more
    than ``tol`` apart, i.e. real ones rather than float ties)."""
    same = a.argmax(1) == b.argmax(1)
    top2 = np.sort(b, axis=1)[:, -2:]
    real = (~same) & (top2[:, 1] - top2[:, 0] > tol)
    return float(same.mean()), int(real.sum())


def check_fp32(name: str, state: State, out: Path, entries: list[dict[str, Any]],
               samples: Samples, tol: float = TOLERANCE) -> dict[str, Any]:
    """onnx.checker, ONNX Runtime vs torch per exit, chained segments vs per-exit graphs."""
    for e in entries:
        onnx_check(out / e["file"])
    exits, segments = _by(entries, "exit", "fp32"), _by(entries, "segment", "fp32")
    with torch.no_grad():
        ref = [z.numpy() for z in tier_model(name, state, max(segments))(torch.from_numpy(
            samples.x))]
    chained = chain_logits(out, segments, samples.x)
    report: dict[str, Any] = {"samples": len(samples.x), "source": samples.source,
                              "tolerance": tol, "onnx_checker": "passed", "exits": {},
                              "segments": {}}
    failures = []
    for k, e in sorted(exits.items()):
        got, limit = run_batched(session(out / e["file"]), samples.x)[0], tolerance_for(
            ref[k - 1], tol)
        diff = float(np.abs(got - ref[k - 1]).max())
        agree, wrong = _agreement(got, ref[k - 1], limit)
        seg = float(np.abs(chained[k] - got).max())
        report["exits"][str(k)] = {"max_abs_diff_vs_torch": diff, "argmax_agreement": agree,
                                   "max_abs_diff_segments_vs_exit": seg, "tolerance": limit}
        if diff > limit or wrong or seg > limit:
            failures.append(f"exit {k}: |ORT - torch| {diff:.2e}, {wrong} argmax flips, "
                            f"|segments - exit| {seg:.2e} (tolerance {limit:.2e})")
    for k in sorted(segments):
        diff, limit = float(np.abs(chained[k] - ref[k - 1]).max()), tolerance_for(ref[k - 1], tol)
        report["segments"][str(k)] = {"max_abs_diff_vs_torch": diff, "tolerance": limit}
        if diff > limit:
            failures.append(f"segment {k}: |ORT - torch| {diff:.2e} (tolerance {limit:.2e})")
    report["passed"] = not failures
    if failures:
        raise ExportCheckError("export check failed: " + "; ".join(failures))
    return report


# ---------------------------------------------------------------------------------------------
# int8


@dataclass(frozen=True)
class Int8Policy:
    """How int8 graphs are made and when one is not good enough to ship.

    A graph passes when its labels agree with fp32's on at least ``min_agreement`` of the
    evaluation samples and, where they are labelled, its accuracy is at most ``max_drop`` below
    fp32's. One that fails is left out (``on_failure="fp32"``: devices asking for int8 run that
    exit's or segment's fp32 graph) or fails the export (``"refuse"``)."""

    scheme: str = DEFAULT_SCHEME
    min_agreement: float = 0.97
    max_drop: float = 0.02
    on_failure: str = "fp32"

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown int8 scheme {self.scheme!r}; choose one of "
                             f"{', '.join(SCHEMES)}")
        if not 0 <= self.min_agreement <= 1 or not 0 <= self.max_drop <= 1:
            raise ValueError("min_agreement and max_drop must be in [0, 1]")
        if self.on_failure not in ("fp32", "refuse"):
            raise ValueError(f"on_failure must be 'fp32' or 'refuse', got {self.on_failure!r}")

    def verdict(self, agreement: float, acc_fp32: float | None, acc_int8: float | None
                ) -> str | None:
        """Why a graph fails the bounds (None: it passes)."""
        if agreement < self.min_agreement:
            return f"agrees with fp32 on {agreement:.1%} < {self.min_agreement:.0%}"
        if acc_fp32 is not None and acc_int8 is not None and acc_fp32 - acc_int8 > self.max_drop:
            return (f"loses {100 * (acc_fp32 - acc_int8):.1f} accuracy points > "
                    f"{100 * self.max_drop:.1f}")
        return None


def _segment_features(out: Path, segments: dict[int, dict[str, Any]], x: np.ndarray
                      ) -> dict[int, list[np.ndarray]]:
    """(features, logits) output by each fp32 segment, chained from ``x``."""
    outs = {}
    for k in sorted(segments):
        outs[k] = run_batched(session(out / segments[k]["file"]), x)
        x = outs[k][0]
    return outs


def quantize_graphs(out: Path, fp32: list[dict[str, Any]], calibration: np.ndarray,
                    scheme: str) -> list[dict[str, Any]]:
    """Quantises every fp32 graph; segment k > 1 is calibrated on the features that the fp32
    segments before it compute from the calibration samples."""
    from export.quantize import quantize_int8  # only export with --quantize needs it

    entries = []
    features = _segment_features(out, _by(fp32, "segment", "fp32"), calibration)
    for e in fp32:
        first = e["kind"] == "exit" or e["index"] == 1
        calib = calibration if first else features[e["index"] - 1][0]
        file = e["file"].replace(".onnx", ".int8.onnx")
        quantize_int8(out / e["file"], out / file, e["inputs"][0], calib, scheme)
        onnx_check(out / file)
        entries.append({**e, "file": file, "precision": "int8", "sha256": sha256(out / file),
                        "bytes": (out / file).stat().st_size})
    return entries


def _judge(name: str, labels: np.ndarray, reference: np.ndarray, y: np.ndarray | None,
           policy: Int8Policy) -> dict[str, Any]:
    """One int8 graph's labels against fp32's (and the truth, where known)."""
    agree = float((labels == reference).mean())
    acc_fp32 = None if y is None else float((reference == y).mean())
    acc_int8 = None if y is None else float((labels == y).mean())
    reason = policy.verdict(agree, acc_fp32, acc_int8)
    return {"graph": name, "precision": "fp32" if reason else "int8",
            "agreement_with_fp32": agree, "accuracy_fp32": acc_fp32,
            "accuracy_int8": acc_int8, "reason": reason}


def judge_int8(out: Path, fp32: list[dict[str, Any]], int8: list[dict[str, Any]],
               ev: Samples, policy: Int8Policy) -> dict[str, dict[str, Any]]:
    """Per int8 graph, its verdict on the evaluation samples. Exit graphs are compared with
    their fp32 twins; segments as a device's cascade runs them, each int8 segment fed what the
    segments before it (int8 where they pass, else fp32) computed."""
    y = ev.y if ev.real else None
    verdicts = {}
    for k, e in sorted(_by(fp32, "exit", "fp32").items()):
        ref = run_batched(session(out / e["file"]), ev.x)[0].argmax(1)
        got = run_batched(session(out / _by(int8, "exit", "int8")[k]["file"]), ev.x)[0]
        verdicts[f"exit_{k}"] = _judge(f"exit_{k}", got.argmax(1), ref, y, policy)
    fp32_chain = _segment_features(out, _by(fp32, "segment", "fp32"), ev.x)
    x = ev.x
    for k, q in sorted(_by(int8, "segment", "int8").items()):
        feats, logits = run_batched(session(out / q["file"]), x)
        v = _judge(f"segment_{k}", logits.argmax(1), fp32_chain[k][1].argmax(1), y, policy)
        verdicts[f"segment_{k}"] = v
        if v["reason"]:  # the cascade runs this segment in fp32, on what came before
            feats = run_batched(session(out / _by(fp32, "segment", "fp32")[k]["file"]), x)[0]
        x = feats
    return verdicts


def export_int8(out: Path, fp32: list[dict[str, Any]], data: ExportData, policy: Int8Policy
                ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The int8 graphs that pass ``policy`` (the others deleted) and the quantisation report.
    Raises ExportCheckError if one fails and the policy refuses."""
    int8 = quantize_graphs(out, fp32, data.calibration.x, policy.scheme)
    verdicts = judge_int8(out, fp32, int8, data.evaluation, policy)
    failed = {name: v["reason"] for name, v in verdicts.items() if v["reason"]}
    if failed and policy.on_failure == "refuse":
        raise ExportCheckError("int8 refused: " + "; ".join(
            f"{n} {r}" for n, r in failed.items()) + " (measured on " + cpu.cpu_name() +
            "); export without --quantize, or with --int8-on-failure fp32")
    kept = []
    for e in int8:
        if f"{e['kind']}_{e['index']}" in failed:
            (out / e["file"]).unlink()
        else:
            kept.append(e)
    return kept, int8_report(verdicts, data, policy)


def int8_report(verdicts: dict[str, dict[str, Any]], data: ExportData, policy: Int8Policy
                ) -> dict[str, Any]:
    """What the manifest says about int8: scheme, bounds, the CPU that measured, and per graph
    its agreement with fp32, accuracies and whether it ships."""
    ev = data.evaluation
    exits = {n.split("_")[1]: v for n, v in verdicts.items() if n.startswith("exit_")}
    na = "n/a"
    note = None if ev.real else ("no labelled data: calibrated on synthetic random-normal inputs,"
                                 " so accuracy is n/a and the int8 ranges are not the real "
                                 "data's; pass --data-dir to calibrate and evaluate on real data")
    return {"method": SCHEMES[policy.scheme].describe(policy.scheme),
            "bounds": {"min_agreement": policy.min_agreement, "max_accuracy_drop":
                       policy.max_drop, "on_failure": policy.on_failure},
            "measured_on": cpu.describe(),
            "calibration": {"samples": len(data.calibration.x), "source":
                            data.calibration.source},
            "evaluation": {"samples": len(ev.x), "source": ev.source},
            "accuracy": {"fp32": {k: na if v["accuracy_fp32"] is None else v["accuracy_fp32"]
                                  for k, v in exits.items()},
                         "int8": {k: na if v["accuracy_int8"] is None else v["accuracy_int8"]
                                  for k, v in exits.items()}},
            "agreement_with_fp32": {k: v["agreement_with_fp32"] for k, v in exits.items()},
            "graphs": verdicts,
            "kept_fp32": sorted(n for n, v in verdicts.items() if v["reason"]),
            "note": note}


# ---------------------------------------------------------------------------------------------
# What a device needs to know about its input, and the windows to check int8 on its own CPU

CALIBRATION_FILE = "calibration.npz"
CALIBRATION_BYTES = 4 << 20  # ship at most this much (STL-10's 96x96 images: 38 of them)
# Raw sensor models: what the windows must be (UniMiB SHAR and HAPT: 3 s at 50 Hz)
SENSORS = {"hapt": {"unit": "g", "sampling_hz": 50, "window_samples": 151,
                    "axes": ["x", "y", "z"]},
           "unimib": {"unit": "m/s^2", "sampling_hz": 50, "window_samples": 151,
                      "axes": ["x", "y", "z"]}}


def expected_input(name: str, calibration: Samples) -> dict[str, Any]:
    """``input.expected``: the sensor (raw models) and the calibration samples' statistics, which
    ``hmf-device predict`` compares a file against. Synthetic samples give no statistics."""
    sensor = SENSORS.get(name, SENSORS["unimib"] if name.startswith("unimib") else {})
    stats = channel_statistics(calibration.x) if calibration.real else None
    return {**sensor, "statistics": stats}


def ship_calibration(out: Path, calibration: Samples) -> dict[str, Any]:
    """Writes up to ``CALIBRATION_BYTES`` of the calibration samples to ``calibration.npz``
    (x, and y where labelled): a board measures its own int8 kernels' agreement with fp32 on
    them (``hmf-device profile``)."""
    per_sample = max(1, calibration.x[0].nbytes)
    n = max(1, min(len(calibration.x), CALIBRATION_BYTES // per_sample))
    arrays = {"x": np.ascontiguousarray(calibration.x[:n], np.float32)}
    if calibration.real:
        arrays["y"] = np.asarray(calibration.y[:n], np.int64)
    path = out / CALIBRATION_FILE
    np.savez(path, **arrays)
    return {"file": CALIBRATION_FILE, "sha256": sha256(path), "bytes": path.stat().st_size,
            "samples": n, "source": calibration.source}


# ---------------------------------------------------------------------------------------------
# The whole export


def _check_tiers(tiers: Sequence[int]) -> list[int]:
    tiers = sorted(set(tiers))
    if not tiers or not all(1 <= t <= NUM_BLOCKS for t in tiers):
        raise ValueError(f"tiers must be in 1..{NUM_BLOCKS}, got {tiers}")
    return tiers


def _check_state(name: str, state: State) -> None:
    expected = set(build_model(name).state_dict())
    missing = sorted(expected - set(state))
    if missing:
        raise ValueError(f"the state lacks {len(missing)} tensors of model {name!r}, e.g. "
                         f"{missing[0]}")


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    """Atomically: a device never reads half a manifest."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.chmod(tmp, 0o644)  # mkstemp makes it private; a manifest is for every user
    os.replace(tmp, path)


def export_onnx(name: str, state: State, out: str | os.PathLike, data: ExportData, *,
                tiers: Sequence[int] = (1, 2, 3), opset: int = DEFAULT_OPSET,
                quantize: str | None = None, source: dict[str, Any] | None = None,
                check_samples: int = 64, int8: Int8Policy | None = None) -> dict[str, Any]:
    """Exports, checks and describes the graphs of ``state`` (a global state of model ``name``);
    returns the manifest, also written to ``out/manifest.json``. Raises ExportCheckError (and
    writes no manifest) if a check fails. With ``quantize="int8"``, ``int8`` (default
    ``Int8Policy()``) says how int8 graphs are made and which ship."""
    if name not in SPECS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(SPECS)}")
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    tiers = _check_tiers(tiers)
    _check_state(name, state)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    spec = SPECS[name]
    example = torch.from_numpy(data.evaluation.x[:2])
    files = export_fp32(name, state, out, tiers, opset, example)
    check = check_fp32(name, state, out, files, data.evaluation.head(check_samples))
    manifest: dict[str, Any] = {
        "format": FORMAT, "model": name, "tiers": tiers,
        "source": source or {}, "num_classes": spec.num_classes,
        "class_names": list(spec.class_names),
        "input": {"name": INPUT, "shape": ["batch", *spec.input_shape], "dtype": "float32",
                  "preprocessing": preprocessing(name),
                  "expected": expected_input(name, data.calibration)},
        "opset": opset, "versions": versions(), "precisions": ["fp32"], "files": files,
        "check": check, "quantization": None, "calibration": None,
    }
    if quantize == "int8":
        kept, manifest["quantization"] = export_int8(out, files, data, int8 or Int8Policy())
        manifest["files"] = files + kept
        manifest["precisions"] += ["int8"] if kept else []
        manifest["calibration"] = ship_calibration(out, data.calibration)
    _write_json(out / MANIFEST, manifest)
    return manifest


def _remove_stale(out: Path) -> None:
    """An earlier export's manifest, int8 graphs and calibration windows: none may survive next
    to the new graphs (a device would load a stale manifest; an int8 graph this export leaves
    out would look shipped)."""
    for path in (out / MANIFEST, out / CALIBRATION_FILE, *out.glob("*.int8.onnx")):
        path.unlink(missing_ok=True)
