"""common/manifest.py: every malformed manifest is a ManifestError naming the field (never a
KeyError or IndexError later), the optional ``input.expected`` and ``calibration`` fields are
checked when present, and the input-statistics rule warns on the unit mistakes it is for."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.manifest import (
    FORMAT,
    InputStatistics,
    ManifestError,
    channel_statistics,
    input_warnings,
    read,
    validate,
)
from export.data import hapt_split

ROOT = Path(__file__).resolve().parents[1]
SHA = "ab" * 32


def good() -> dict:
    files = [{"file": f"{kind}_{k}.onnx", "kind": kind, "index": k, "precision": "fp32",
              "sha256": SHA, "bytes": 10} for kind in ("exit", "segment") for k in (1, 2)]
    return {"format": FORMAT, "model": "hapt", "tiers": [1, 2], "num_classes": 2,
            "class_names": ["A", "B"], "precisions": ["fp32"], "files": files,
            "input": {"name": "input", "shape": ["batch", 3, 151], "dtype": "float32",
                      "preprocessing": {"kind": "raw", "unit": "g"}}}


STATS = {"samples": 4, "per_channel": {k: [0.0, 1.0, 2.0] for k in
                                       ("mean", "std", "min", "max", "p01", "p99")}}


def mutate(path: str, value) -> dict:
    """``good()`` with the field at dotted ``path`` set to ``value`` (``DELETE``: removed)."""
    m = good()
    *parents, last = path.split(".")
    node = m
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is DELETE:
        del node[int(last) if isinstance(node, list) else last]
    else:
        node[int(last) if isinstance(node, list) else last] = value
    return m


DELETE = object()

BAD = [
    ("files", DELETE, "files must be a non-empty list"),
    ("files", {}, "files must be a non-empty list"),
    ("files", [], "files must be a non-empty list"),
    ("files.0", "exit_1.onnx", r"files\[0\] must be an object"),
    ("files.0.file", "../exit_1.onnx", "bare file name"),
    ("files.0.file", "/etc/passwd", "bare file name"),
    ("files.0.file", "a\\b.onnx", "bare file name"),
    ("files.0.file", 3, r"files\[0\].file must be a non-empty string"),
    ("files.0.kind", "head", "must be 'exit' or 'segment'"),
    ("files.0.index", 0, r"files\[0\].index must be an integer >= 1"),
    ("files.0.index", True, r"files\[0\].index must be an integer"),
    ("files.0.index", "1", r"files\[0\].index must be an integer"),
    ("files.0.precision", "int4", "precision must be one of the manifest's precisions"),
    ("files.0.precision", "int8", "precision must be one of the manifest's precisions"),
    ("files.0.sha256", "XYZ", "sha256 must be 64 lowercase hex digits"),
    ("files.0.sha256", DELETE, "sha256 must be 64 lowercase hex digits"),
    ("files.0.bytes", -1, r"bytes must be an integer >= 0"),
    ("files.0.bytes", 1.5, r"bytes must be an integer >= 0"),
    ("files.1.index", 1, "twice"),
    ("files.3", DELETE, None),  # drops segment 2: fine
    ("files.2", DELETE, None),  # segment 1 left out (an int8 graph out of bounds): fine here
    ("files.2.index", 2, "twice"),
    ("input", DELETE, "input must be an object"),
    ("input", [], "input must be an object"),
    ("input.name", DELETE, "input.name must be a non-empty string"),
    ("input.shape", DELETE, "input.shape must be a non-empty list"),
    ("input.shape", [3, 151], r"input.shape must be \['batch', d1, ...\]"),
    ("input.shape", ["batch"], r"input.shape must be \['batch', d1, ...\]"),
    ("input.shape", ["batch", 3, 0], r"input.shape\[2\] must be an integer >= 1"),
    ("input.shape", ["batch", 3, "151"], r"input.shape\[2\] must be an integer"),
    ("input.shape", ["batch", True, 151], r"input.shape\[1\] must be an integer"),
    ("input.dtype", "float64", "input.dtype must be 'float32'"),
    ("input.preprocessing", {"kind": "image", "normalize": {"scale": 0, "mean": 0, "std": 1}},
     "divides by zero"),
    ("input.preprocessing", {"kind": "image"}, "input.preprocessing.normalize must be an object"),
    ("class_names", ["A"], "class_names has 1 names but num_classes is 2"),
    ("class_names", "AB", "class_names must be a non-empty list"),
    ("class_names", ["A", 2], r"class_names\[1\] must be a non-empty string"),
    ("num_classes", DELETE, "num_classes must be an integer >= 1"),
    ("num_classes", 2.0, "num_classes must be an integer >= 1"),
    ("model", DELETE, "model must be a non-empty string"),
    ("model", ["hapt"], "model must be a non-empty string"),
    ("precisions", DELETE, "precisions must be a non-empty list"),
    ("precisions", "fp32", "precisions must be a non-empty list"),
    ("precisions", ["fp32", "fp32"], "lists one twice"),
    ("precisions", ["fp32", "int8"], "has no int8 graph"),
    ("tiers", [0], r"tiers\[0\] must be an integer >= 1"),
    ("format", "hmf-onnx/2", "format 'hmf-onnx/2', expected 'hmf-onnx/1'"),
    ("format", DELETE, "format None"),
]


@pytest.mark.parametrize(("path", "value", "message"), BAD,
                         ids=[f"{p}={v if v is not DELETE else 'deleted'}" for p, v, _ in BAD])
def test_malformed_manifests_name_the_field(path, value, message):
    m = mutate(path, value)
    if message is None:
        assert validate(m) is m
        return
    with pytest.raises(ManifestError, match=message) as e:
        validate(m, "some/manifest.json")
    assert str(e.value).startswith("some/manifest.json")
    assert "hmf export onnx" in str(e.value)  # what to do


@pytest.mark.parametrize("data", [[], [good()], "hapt", 3, None])
def test_a_manifest_must_be_an_object(data):
    with pytest.raises(ManifestError, match="must hold a JSON object"):
        validate(data)


def test_read_refuses_bad_json_and_nan(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read(path)
    path.write_text(json.dumps(good()).replace('"bytes": 10', '"bytes": NaN', 1))
    with pytest.raises(ManifestError, match="not valid JSON"):
        read(path)
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read(path)
    path.write_text(json.dumps([good()]))
    with pytest.raises(ManifestError, match="JSON object, not a list"):
        read(path)
    path.write_text(json.dumps(good()))
    assert read(path)["model"] == "hapt"


def with_expected(expected=None, calibration=None) -> dict:
    m = good()
    if expected is not None:
        m["input"]["expected"] = expected
    if calibration is not None:
        m["calibration"] = calibration
    return m


def test_optional_expected_and_calibration_are_accepted_when_well_formed():
    full = {"unit": "g", "sampling_hz": 50, "window_samples": 151, "axes": ["x", "y", "z"],
            "statistics": STATS}
    validate(with_expected(full, {"file": "calibration.npz", "sha256": SHA, "bytes": 5,
                                  "samples": 256, "source": "hapt train"}))
    validate(with_expected({"unit": "g"}))  # every key of expected is optional
    m = good()
    m["calibration"] = None
    validate(m)


@pytest.mark.parametrize(("expected", "message"), [
    ({"unit": 3}, "input.expected.unit"),
    ({"sampling_hz": 0}, "sampling_hz must be a positive number"),
    ({"sampling_hz": "50"}, "sampling_hz must be a positive number"),
    ({"window_samples": 1.5}, "window_samples must be an integer"),
    ({"axes": "xyz"}, "axes must be a non-empty list"),
    ({"statistics": {"samples": 4}}, "per_channel must be an object"),
    ({"statistics": {**STATS, "samples": 0}}, "statistics.samples must be an integer >= 1"),
    ({"statistics": {"samples": 4, "per_channel": {**STATS["per_channel"], "mean": [0, 1]}}},
     "per_channel.mean must be a list of 3 finite numbers"),
    ({"statistics": {"samples": 4, "per_channel": {**STATS["per_channel"],
                                                   "std": [0, 1, None]}}},
     "per_channel.std must be a list of 3"),
    ({"statistics": {"samples": 4, "per_channel": {**STATS["per_channel"],
                                                   "p99": [0, 1, float("inf")]}}},
     "per_channel.p99 must be a list of 3 finite numbers"),
    ({"statistics": {"samples": 4, "per_channel": {k: v for k, v in STATS["per_channel"].items()
                                                   if k != "p01"}}}, "per_channel.p01"),
    ({"statistics": {"samples": 4, "per_channel": {**STATS["per_channel"],
                                                   "p01": [5, 5, 5]}}}, "p01 > p99"),
    ([1], "input.expected must be an object"),
])
def test_malformed_expected_is_refused(expected, message):
    with pytest.raises(ManifestError, match=message):
        validate(with_expected(expected))


@pytest.mark.parametrize(("calibration", "message"), [
    ({"file": "../c.npz", "sha256": SHA, "bytes": 1, "samples": 1}, "bare file name"),
    ({"file": "c.npz", "sha256": "x", "bytes": 1, "samples": 1}, "calibration.sha256"),
    ({"file": "c.npz", "sha256": SHA, "bytes": 1, "samples": 0}, "calibration.samples"),
    ({"file": "c.npz", "sha256": SHA, "samples": 1}, "calibration.bytes"),
    ("calibration.npz", "calibration must be an object"),
])
def test_malformed_calibration_is_refused(calibration, message):
    with pytest.raises(ManifestError, match=message):
        validate(with_expected(calibration=calibration))


def test_validate_leaves_the_manifest_unchanged():
    m = with_expected({"statistics": STATS})
    before = copy.deepcopy(m)
    validate(m)
    assert m == before


# ---------------------------------------------------------------------------------------------
# Input statistics and the warning rule, on the shipped HAPT windows


@pytest.fixture(scope="module")
def hapt():
    (train_x, _), (test_x, test_y) = hapt_split()
    return channel_statistics(train_x[:256]), test_x, test_y


def stats_of(x: np.ndarray) -> InputStatistics:
    s = InputStatistics(x.shape[1])
    for i in range(0, len(x), 100):  # in batches, as predict accumulates them
        s.add(x[i:i + 100])
    return s


def test_streamed_statistics_equal_numpy(hapt):
    _, x, _ = hapt
    s = stats_of(x)
    np.testing.assert_allclose(s.mean, x.mean(axis=(0, 2), dtype=np.float64), rtol=1e-9)
    np.testing.assert_allclose(s.std, x.std(axis=(0, 2), dtype=np.float64), rtol=1e-5)
    assert s.samples == len(x)
    ref = channel_statistics(x)["per_channel"]
    np.testing.assert_allclose(ref["p01"], np.percentile(x.transpose(1, 0, 2).reshape(3, -1),
                                                         1, axis=1), atol=1e-6)


def test_hapt_windows_in_m_s2_warn_and_in_g_do_not(hapt):
    expected, x, y = hapt
    assert input_warnings(stats_of(x), expected, unit="g") == []
    for c in range(6):  # one activity alone (a still board, a walk) is not "far off"
        assert input_warnings(stats_of(x[y == c]), expected, unit="g") == [], c
    assert input_warnings(stats_of(x[:1]), expected, unit="g") == []  # one window
    warned = input_warnings(stats_of(x * 9.80665), expected, ["x", "y", "z"], unit="g")
    assert warned and re.search(r"values are 9\.\d+x the size", warned[0])
    assert "m/s^2 where the model takes g" in warned[0]
    assert any(w.startswith("channel x: mean") for w in warned)
    # the other way round: g fed to a model that takes m/s^2 (UniMiB SHAR)
    in_ms2 = {"samples": 1, "per_channel": {k: [v * 9.80665 for v in vals] for k, vals in
                                            expected["per_channel"].items()}}
    assert input_warnings(stats_of(x * 9.80665), in_ms2, unit="m/s^2") == []
    warned = input_warnings(stats_of(x), in_ms2, unit="m/s^2")
    assert warned and "g where the model takes m/s^2" in warned[0]
    # gravity removed: another preprocessing
    centered = x - x.mean(axis=2, keepdims=True)
    assert "different unit, sensor or preprocessing" in input_warnings(
        stats_of(centered), expected, unit="g")[0]


def test_common_manifest_imports_neither_torch_nor_onnx():
    code = ("import sys, common.manifest\n"
            "bad = [m for m in ('torch', 'onnx', 'onnxruntime', 'cloud', 'export') "
            "if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
