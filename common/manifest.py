"""``manifest.json`` of an ONNX export (``hmf export onnx``): its format, and one validator that
the cloud and the device share.

A device reads manifests it did not write (copied by hand, fetched over MQTT, edited), so every
field it relies on is checked here, once, before any code indexes into it: a malformed manifest
is a ``ManifestError`` that names the field and what to do, never a ``KeyError`` or an
``IndexError`` deep in the runtime. Fields this module does not know are left alone (the cloud
adds ``source``, ``check``, ``quantization``; a device adds ``served``).

Also here: the per-channel statistics of model input (``channel_statistics``,
``InputStatistics``) that ``input.expected.statistics`` records for the calibration samples and
``hmf-device predict`` compares a file against, and the rule that flags an input far from them
(``input_warnings``).

numpy and the standard library only: no torch, no onnx (a board has neither).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "hmf-onnx/1"
MANIFEST = "manifest.json"
KINDS = ("exit", "segment")
PRECISIONS = ("fp32", "int8")
STAT_KEYS = ("mean", "std", "min", "max", "p01", "p99")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FIX = "re-export it with `hmf export onnx` or fetch it again"


class ManifestError(ValueError):
    """A model directory that is not a complete, intact export."""


# ---------------------------------------------------------------------------------------------
# Small typed checks: each raises a ManifestError naming the field


def _fail(where: str, field: str, problem: str) -> ManifestError:
    return ManifestError(f"{where}: {field} {problem}; {_FIX}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _int(where: str, field: str, v: Any, low: int) -> int:
    if not _is_int(v) or v < low:
        raise _fail(where, field, f"must be an integer >= {low} (got {v!r})")
    return v


def _str(where: str, field: str, v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise _fail(where, field, f"must be a non-empty string (got {v!r})")
    return v


def _dict(where: str, field: str, v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise _fail(where, field, f"must be an object (got {type(v).__name__})")
    return v


def _list(where: str, field: str, v: Any, nonempty: bool = True) -> list[Any]:
    if not isinstance(v, list) or (nonempty and not v):
        raise _fail(where, field, "must be a non-empty list" if nonempty else "must be a list")
    return v


def _file_name(where: str, field: str, v: Any) -> str:
    """A bare file name inside the model directory: a manifest never names a path (one from
    elsewhere could otherwise make the device read ``../../etc/...``)."""
    name = _str(where, field, v)
    if "/" in name or "\\" in name or "\0" in name or name in (".", "..") or ".." in name:
        raise _fail(where, field, f"must be a bare file name without '/', '\\' or '..' "
                                  f"(got {name!r})")
    return name


# ---------------------------------------------------------------------------------------------
# The manifest


def validate(data: Any, where: str = MANIFEST) -> dict[str, Any]:
    """``data`` (a parsed manifest) if it is well formed; else a ManifestError naming the first
    problem. ``where`` names the file in messages."""
    if not isinstance(data, dict):
        raise ManifestError(f"{where} must hold a JSON object, not a {type(data).__name__}; "
                            f"{_FIX}")
    if data.get("format") != FORMAT:
        raise ManifestError(f"{where}: format {data.get('format')!r}, expected {FORMAT!r} "
                            f"(an export of another version of hmf?); {_FIX}")
    _str(where, "model", data.get("model"))
    _classes(where, data)
    shape = _input(where, data.get("input"))
    precisions = _precisions(where, data.get("precisions"))
    _files(where, data.get("files"), precisions)
    if "tiers" in data:
        for i, t in enumerate(_list(where, "tiers", data["tiers"])):
            _int(where, f"tiers[{i}]", t, 1)
    if data.get("calibration") is not None:
        _calibration(where, data["calibration"])
    expected = data["input"].get("expected")
    if expected is not None:
        _expected(where, expected, shape[1])
    return data


def _classes(where: str, data: dict[str, Any]) -> None:
    n = _int(where, "num_classes", data.get("num_classes"), 1)
    names = _list(where, "class_names", data.get("class_names"))
    for i, name in enumerate(names):
        _str(where, f"class_names[{i}]", name)
    if len(names) != n:
        raise _fail(where, "class_names", f"has {len(names)} names but num_classes is {n}")


def _input(where: str, v: Any) -> list[Any]:
    """``input``: its name, shape ``["batch", d1, ...]``, dtype and preprocessing."""
    inp = _dict(where, "input", v)
    _str(where, "input.name", inp.get("name"))
    shape = _list(where, "input.shape", inp.get("shape"))
    if shape[0] != "batch" or len(shape) < 2:
        raise _fail(where, "input.shape", f"must be ['batch', d1, ...] (got {shape!r})")
    for i, d in enumerate(shape[1:], 1):
        _int(where, f"input.shape[{i}]", d, 1)
    if inp.get("dtype", "float32") != "float32":
        raise _fail(where, "input.dtype", f"must be 'float32' (got {inp.get('dtype')!r})")
    pre = inp.get("preprocessing")
    if pre is not None:
        pre = _dict(where, "input.preprocessing", pre)
        if pre.get("kind") == "image":
            norm = _dict(where, "input.preprocessing.normalize", pre.get("normalize"))
            for key in ("scale", "mean", "std"):
                if not _is_number(norm.get(key)):
                    raise _fail(where, f"input.preprocessing.normalize.{key}",
                                f"must be a finite number (got {norm.get(key)!r})")
            if norm["scale"] == 0 or norm["std"] == 0:
                raise _fail(where, "input.preprocessing.normalize", "divides by zero")
    return shape


def _precisions(where: str, v: Any) -> list[str]:
    precisions = _list(where, "precisions", v)
    for i, q in enumerate(precisions):
        if q not in PRECISIONS:
            raise _fail(where, f"precisions[{i}]", f"must be one of {', '.join(PRECISIONS)} "
                                                   f"(got {q!r})")
    if len(set(precisions)) != len(precisions):
        raise _fail(where, "precisions", f"lists one twice ({precisions})")
    return precisions


def _files(where: str, v: Any, precisions: list[str]) -> None:
    """Each graph once, with a precision the manifest declares. Gaps are allowed: an export may
    leave out an int8 graph that lost too much accuracy (devices run fp32 there), so whether a
    cascade has every segment it needs is checked where it runs."""
    files = _list(where, "files", v)
    seen_names, seen_keys = set(), set()
    for i, entry in enumerate(files):
        f = f"files[{i}]"
        e = _dict(where, f, entry)
        name = _file_name(where, f"{f}.file", e.get("file"))
        if e.get("kind") not in KINDS:
            raise _fail(where, f"{f}.kind", f"must be 'exit' or 'segment' (got "
                                            f"{e.get('kind')!r})")
        index = _int(where, f"{f}.index", e.get("index"), 1)
        if e.get("precision") not in precisions:
            raise _fail(where, f"{f}.precision", f"must be one of the manifest's precisions "
                                                 f"{precisions} (got {e.get('precision')!r})")
        if not isinstance(e.get("sha256"), str) or not _SHA256.fullmatch(e["sha256"]):
            raise _fail(where, f"{f}.sha256", "must be 64 lowercase hex digits")
        _int(where, f"{f}.bytes", e.get("bytes"), 0)
        key = (e["kind"], index, e["precision"])
        if name in seen_names or key in seen_keys:
            raise _fail(where, f, f"lists {name} ({e['precision']} {e['kind']} {index}) twice")
        seen_names.add(name)
        seen_keys.add(key)
    for q in precisions:
        if not any(p == q for _, _, p in seen_keys):
            raise _fail(where, "files", f"has no {q} graph although precisions lists {q}")


def _calibration(where: str, v: Any) -> None:
    cal = _dict(where, "calibration", v)
    _file_name(where, "calibration.file", cal.get("file"))
    if not isinstance(cal.get("sha256"), str) or not _SHA256.fullmatch(cal["sha256"]):
        raise _fail(where, "calibration.sha256", "must be 64 lowercase hex digits")
    _int(where, "calibration.bytes", cal.get("bytes"), 0)
    _int(where, "calibration.samples", cal.get("samples"), 1)
    if "source" in cal:
        _str(where, "calibration.source", cal["source"])


def _expected(where: str, v: Any, channels: int) -> None:
    """``input.expected``: what the model's input looks like. Every key is optional; those
    present must be well formed, and statistics give one value per input channel."""
    exp = _dict(where, "input.expected", v)
    if "unit" in exp:
        _str(where, "input.expected.unit", exp["unit"])
    if "sampling_hz" in exp and not (_is_number(exp["sampling_hz"]) and exp["sampling_hz"] > 0):
        raise _fail(where, "input.expected.sampling_hz", f"must be a positive number (got "
                                                         f"{exp['sampling_hz']!r})")
    if "window_samples" in exp:
        _int(where, "input.expected.window_samples", exp["window_samples"], 1)
    if "axes" in exp:
        axes = _list(where, "input.expected.axes", exp["axes"])
        for i, a in enumerate(axes):
            _str(where, f"input.expected.axes[{i}]", a)
    if exp.get("statistics") is not None:
        _statistics(where, exp["statistics"], channels)


def _statistics(where: str, v: Any, channels: int) -> None:
    field = "input.expected.statistics"
    stats = _dict(where, field, v)
    _int(where, f"{field}.samples", stats.get("samples"), 1)
    per = _dict(where, f"{field}.per_channel", stats.get("per_channel"))
    for key in STAT_KEYS:
        values = per.get(key)
        if (not isinstance(values, list) or len(values) != channels
                or not all(_is_number(x) for x in values)):
            raise _fail(where, f"{field}.per_channel.{key}",
                        f"must be a list of {channels} finite numbers, one per input channel")
    if any(s < 0 for s in per["std"]) or any(a > b for a, b in zip(per["p01"], per["p99"],
                                                                    strict=True)):
        raise _fail(where, f"{field}.per_channel", "has a negative std or p01 > p99")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def read(path: str | Path) -> dict[str, Any]:
    """The validated manifest in file ``path``."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as e:
        raise ManifestError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, NaN, deep nesting
        raise ManifestError(f"{path} is not valid JSON ({str(e)[:120]}); {_FIX}") from None
    return validate(data, str(path))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Input statistics: what the model's input looked like, and whether a file looks like it


class InputStatistics:
    """Per-channel statistics of model input (axis 1 of ``(N, C, ...)``: the accelerometer axes,
    the colour channels) accumulated batch by batch, so a file of any size needs only one batch
    in memory. Mean and std over every value of the channel (all samples, all positions)."""

    def __init__(self, channels: int) -> None:
        self.count = 0
        self.samples = 0
        self.sum = np.zeros(channels)
        self.sum_sq = np.zeros(channels)

    def add(self, x: np.ndarray) -> None:
        """A batch ``(n, C, ...)`` of finite values."""
        if len(x) == 0:
            return
        flat = x.reshape(len(x), x.shape[1], -1)
        self.samples += len(x)
        self.count += flat.shape[0] * flat.shape[2]
        # float64 sums of a float32 batch: exact enough at any file size, one (C,) vector each
        self.sum += flat.sum(axis=(0, 2), dtype=np.float64)
        self.sum_sq += np.einsum("ncl,ncl->c", flat, flat, dtype=np.float64)

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.count, 1)

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(np.maximum(self.sum_sq / max(self.count, 1) - self.mean ** 2, 0.0))


def channel_statistics(x: np.ndarray) -> dict[str, Any]:
    """``input.expected.statistics`` of samples ``x`` (``(N, C, ...)``, the graph's input after
    any preprocessing): per channel the mean, std, min, max and the 1st and 99th percentiles of
    all its values."""
    flat = np.asarray(x, np.float64).transpose(1, 0, *range(2, x.ndim)).reshape(x.shape[1], -1)
    p01, p99 = np.percentile(flat, [1, 99], axis=1)
    per = {"mean": flat.mean(1), "std": flat.std(1), "min": flat.min(1), "max": flat.max(1),
           "p01": p01, "p99": p99}
    return {"samples": int(len(x)),
            "per_channel": {k: [round(float(v), 6) for v in per[k]] for k in STAT_KEYS}}


SCALE_FACTOR = 3.0  # input RMS more than 3x above or below the calibration's: warn
LOCATION_MARGIN = 0.5  # channel mean beyond [p01, p99] widened by half its width: warn
G = 9.80665


def input_warnings(stats: InputStatistics, expected: dict[str, Any],
                   axes: list[str] | None = None, unit: str | None = None) -> list[str]:
    """Why the input summarised by ``stats`` looks unlike the calibration samples of
    ``expected`` (``input.expected.statistics``); empty when it looks alike.

    The rule, chosen to be robust to what a file legitimately varies in (which activities, how
    the board is held):

    * scale: the RMS of all input values against the calibration's RMS, sqrt(mean over channels
      of mean^2 + std^2). Over all three axes of an accelerometer this is about the magnitude
      of gravity plus motion, whatever the orientation, so only a different unit, sensor or
      preprocessing moves it by more than ``SCALE_FACTOR`` (m/s^2 instead of g: 9.8x).
    * location: a channel whose mean lies outside the calibration's [p01, p99] of that channel,
      widened by ``LOCATION_MARGIN`` of its width on each side (another axis order or offset).
    """
    if stats.count == 0:
        return []
    per = expected["per_channel"]
    mean_e, std_e = np.asarray(per["mean"], float), np.asarray(per["std"], float)
    rms_e = math.sqrt(float(np.mean(mean_e ** 2 + std_e ** 2)))
    rms = math.sqrt(float(np.mean(stats.mean ** 2 + stats.std ** 2)))
    warnings = []
    if rms_e > 0 and not 1 / SCALE_FACTOR <= rms / rms_e <= SCALE_FACTOR:
        ratio = rms / rms_e
        warnings.append(f"the input's values are {_times(ratio)} the size of the calibration "
                        f"samples' (RMS {rms:.3g} against {rms_e:.3g}): "
                        f"{_scale_cause(ratio, unit)}")
    lo, hi = np.asarray(per["p01"], float), np.asarray(per["p99"], float)
    margin = LOCATION_MARGIN * (hi - lo)
    names = axes if axes and len(axes) == len(lo) else [str(c) for c in range(len(lo))]
    for c in np.flatnonzero((stats.mean < lo - margin) | (stats.mean > hi + margin)):
        warnings.append(f"channel {names[c]}: mean {stats.mean[c]:.3g} is outside the "
                        f"calibration samples' range [{lo[c]:.3g}, {hi[c]:.3g}] (1st-99th "
                        "percentile): a different sensor, axis order, offset or preprocessing?")
    return warnings


def _times(ratio: float) -> str:
    return f"{ratio:.3g}x" if ratio >= 1 else f"1/{1 / ratio:.3g}"


def _scale_cause(ratio: float, unit: str | None) -> str:
    """The likely cause of a scale off by ``ratio`` (9.8: m/s^2 against g)."""
    def near(target: float) -> bool:
        return target / 1.6 <= ratio <= target * 1.6

    if near(G) and unit in (None, "g"):
        return "values in m/s^2 where the model takes g? (divide by 9.80665)"
    if near(1 / G) and unit in (None, "m/s^2"):
        return "values in g where the model takes m/s^2? (multiply by 9.80665)"
    return ("a different unit, sensor or preprocessing than the model was trained on "
            "(wrong model for this data?)")
