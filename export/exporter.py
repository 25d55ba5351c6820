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
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from common import tensorfile
from common.models import NUM_BLOCKS, SPECS, State, build_model
from export.data import ExportData, Samples
from export.graphs import exit_graph, graph_macs, graph_params, segment_graph, tier_model

FORMAT = "hmf-onnx/1"
MANIFEST = "manifest.json"
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


def export_int8(out: Path, fp32: list[dict[str, Any]], data: ExportData
                ) -> list[dict[str, Any]]:
    """Quantises every fp32 graph; segment k > 1 is calibrated on the features that the fp32
    segments before it compute from the calibration samples."""
    from export.quantize import quantize_int8  # only export with --quantize needs it

    entries = []
    features = _segment_features(out, _by(fp32, "segment", "fp32"), data.calibration.x)
    for e in fp32:
        first = e["kind"] == "exit" or e["index"] == 1
        calib = data.calibration.x if first else features[e["index"] - 1]
        file = e["file"].replace(".onnx", ".int8.onnx")
        quantize_int8(out / e["file"], out / file, e["inputs"][0], calib)
        onnx_check(out / file)
        entries.append({**e, "file": file, "precision": "int8", "sha256": sha256(out / file),
                        "bytes": (out / file).stat().st_size})
    return entries


def _segment_features(out: Path, segments: dict[int, dict[str, Any]], x: np.ndarray
                      ) -> dict[int, np.ndarray]:
    """Features output by each fp32 segment on ``x``."""
    feats = {}
    for k in sorted(segments):
        x, _ = run_batched(session(out / segments[k]["file"]), x)
        feats[k] = x
    return feats


def int8_report(out: Path, fp32: list[dict[str, Any]], int8: list[dict[str, Any]],
                data: ExportData) -> dict[str, Any]:
    """Accuracy of each exit before and after quantisation (n/a without labelled data), and how
    often int8 and fp32 agree on the label."""
    from export.quantize import METHOD

    ev = data.evaluation
    before, after, agree = {}, {}, {}
    for k, e in sorted(_by(fp32, "exit", "fp32").items()):
        q = _by(int8, "exit", "int8")[k]
        a = run_batched(session(out / e["file"]), ev.x)[0].argmax(1)
        b = run_batched(session(out / q["file"]), ev.x)[0].argmax(1)
        agree[str(k)] = float((a == b).mean())
        before[str(k)] = float((a == ev.y).mean()) if ev.real else "n/a"
        after[str(k)] = float((b == ev.y).mean()) if ev.real else "n/a"
    note = None if ev.real else ("no labelled data: calibrated on synthetic random-normal inputs,"
                                 " so accuracy is n/a and the int8 ranges are not the real "
                                 "data's; pass --data-dir to calibrate and evaluate on real data")
    return {"method": METHOD,
            "calibration": {"samples": len(data.calibration.x), "source":
                            data.calibration.source},
            "evaluation": {"samples": len(ev.x), "source": ev.source},
            "accuracy": {"fp32": before, "int8": after}, "agreement_with_fp32": agree,
            "note": note}


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
                check_samples: int = 64) -> dict[str, Any]:
    """Exports, checks and describes the graphs of ``state`` (a global state of model ``name``);
    returns the manifest, also written to ``out/manifest.json``. Raises ExportCheckError (and
    writes no manifest) if a check fails."""
    if name not in SPECS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(SPECS)}")
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    tiers = _check_tiers(tiers)
    _check_state(name, state)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # no stale manifest next to new graphs
    spec = SPECS[name]
    example = torch.from_numpy(data.evaluation.x[:2])
    files = export_fp32(name, state, out, tiers, opset, example)
    check = check_fp32(name, state, out, files, data.evaluation.head(check_samples))
    manifest: dict[str, Any] = {
        "format": FORMAT, "model": name, "tiers": tiers,
        "source": source or {}, "num_classes": spec.num_classes,
        "class_names": list(spec.class_names),
        "input": {"name": INPUT, "shape": ["batch", *spec.input_shape], "dtype": "float32",
                  "preprocessing": preprocessing(name)},
        "opset": opset, "versions": versions(), "precisions": ["fp32"], "files": files,
        "check": check, "quantization": None,
    }
    if quantize == "int8":
        int8 = export_int8(out, files, data)
        manifest["files"] = files + int8
        manifest["precisions"].append("int8")
        manifest["quantization"] = int8_report(out, files, int8, data)
    _write_json(out / MANIFEST, manifest)
    return manifest
