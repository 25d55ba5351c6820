"""Which precision each exit runs at on this board: int8 only where this CPU's int8 kernels give
fp32's answers.

The export measured int8 against fp32 on its own CPU, but int8 results depend on the kernels
ONNX Runtime picks for the CPU it runs on (x86 with or without VNNI, ARM with or without the
dot-product instructions). So the board measures again, on the calibration windows the export
ships (``calibration.npz``, checked against its sha256), and keeps int8 for an exit only where
its labels agree with fp32's on at least the export's ``min_agreement``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.manifest import ManifestError, sha256_file
from device.runtime import DeviceModel, Manifest

DEFAULT_MIN_AGREEMENT = 0.97  # an export without recorded bounds


@dataclass(frozen=True)
class ExitPrecision:
    """The verdict for one exit on this CPU."""

    exit: int
    precision: str  # what this exit should run at here
    agreement: float | None  # int8 vs fp32 on the calibration windows; None: not measured
    why: str


def unchecked_reason(manifest: Manifest) -> str | None:
    """Why int8 cannot be checked against fp32 in this model directory (None: it can): no
    calibration windows, or not every exit in fp32 (a device that fetched int8 graphs only)."""
    if not manifest.data.get("calibration"):
        return ("no calibration windows here (a model served over MQTT carries none: check a "
                "copy of the cloud's export directory)" if "served" in manifest.data else
                "the export ships no calibration windows (re-export with --quantize int8)")
    int8_exits = set(manifest.indices("exit", "int8"))
    if not int8_exits <= set(manifest.indices("exit", "fp32")):
        return "the fp32 graphs of some exits are not here"
    return None


def calibration_windows(manifest: Manifest) -> np.ndarray:
    """The export's calibration windows, verified against the manifest's sha256."""
    cal = manifest.data.get("calibration")
    if not cal:
        raise ManifestError(f"{manifest.dir}: the export ships no calibration windows (exported "
                            "without --quantize int8, or by an older hmf): re-export with "
                            "`hmf export onnx --quantize int8`")
    path = manifest.dir / cal["file"]
    if not path.is_file() or sha256_file(path) != cal["sha256"]:
        raise ManifestError(f"{path} is missing or differs from the manifest's sha256: copy the "
                            "whole export directory again")
    with np.load(path, allow_pickle=False) as f:
        x = f["x"]
    if x.dtype != np.float32 or x.shape[1:] != manifest.input_shape:
        raise ManifestError(f"{path}: windows of shape {x.shape[1:]} {x.dtype}, the graphs take "
                            f"{manifest.input_shape} float32")
    return x


def export_bound(manifest: Manifest) -> float:
    """The export's ``min_agreement``, which the board holds its own kernels to."""
    q = manifest.data.get("quantization") or {}
    bound = (q.get("bounds") or {}).get("min_agreement", DEFAULT_MIN_AGREEMENT)
    return float(bound) if isinstance(bound, int | float) else DEFAULT_MIN_AGREEMENT


def _labels(model: DeviceModel, x: np.ndarray, k: int) -> np.ndarray:
    return np.concatenate([model.logits(x[i:i + 256], exit=k).argmax(1)
                           for i in range(0, len(x), 256)])


def choose_precisions(model_dir: str | Path, *, threads: int | None = None,
                      providers: list[str] | None = None, min_agreement: float | None = None
                      ) -> list[ExitPrecision]:
    """Per exported exit, int8 or fp32 on this CPU (see the module's docstring). Exits without an
    int8 graph (none exported, or the export kept them in fp32) run fp32. ``min_agreement``:
    the bound (default: the export's)."""
    m = Manifest.load(model_dir)
    if "int8" not in m.precisions:
        return [ExitPrecision(k, "fp32", None, "no int8 graph exported")
                for k in m.indices("exit", "fp32")]
    reason = unchecked_reason(m)
    if reason:  # run what is there, and say that it is unchecked
        return [ExitPrecision(k, m.entry("exit", k, "int8")["precision"], None,
                              f"int8 not checked against fp32 here: {reason}")
                for k in m.indices("exit", "int8")]
    int8_exits = {f["index"] for f in m.data["files"]
                  if f["kind"] == "exit" and f["precision"] == "int8"}
    fp32 = DeviceModel(model_dir, threads=threads, providers=providers, verify=False)
    x = calibration_windows(m)
    bound = export_bound(m) if min_agreement is None else min_agreement
    int8 = DeviceModel(model_dir, precision="int8", threads=threads, providers=providers,
                       verify=False)
    verdicts = []
    for k in fp32.exits:
        if k not in int8_exits:
            verdicts.append(ExitPrecision(k, "fp32", None, "the export kept it in fp32"))
            continue
        agree = float((_labels(int8, x, k) == _labels(fp32, x, k)).mean())
        ok = agree >= bound
        verdicts.append(ExitPrecision(
            k, "int8" if ok else "fp32", agree,
            f"int8 agrees with fp32 on {agree:.1%} of {len(x)} calibration windows here "
            f"({'>=' if ok else '<'} {bound:.0%})"))
    fp32.close()
    int8.close()
    return verdicts

