"""Bad input and limits on the device (issue 18), with real ONNX Runtime sessions on a real
export of hapt and real files: malformed manifests, corrupt graphs whose sha256 matches, .npy and
broken input files, NaN/Inf rows, input far from the calibration samples, bounded batches, the
latency budget and the tier rule."""

from __future__ import annotations

import io
import json
import math
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from model_states import perturbed_state

from common.manifest import sha256_file
from device.cli import hmf_device
from device.inputs import ArrayFile, open_samples
from device.profile import (
    check_budget,
    interleaved_schedule,
    profile,
    tier_within,
    time_interleaved,
)
from device.runtime import NONFINITE_INPUT, NONFINITE_OUTPUT, VALID, DeviceModel, ManifestError
from export.data import export_data, hapt_split
from export.exporter import export_onnx


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hapt_fp32")
    export_onnx("hapt", perturbed_state("hapt"), out,
                export_data("hapt", None, calibration=16, evaluation=32), tiers=[1, 2, 3])
    return out


@pytest.fixture(scope="module")
def hapt():
    (train_x, _), (test_x, test_y) = hapt_split()
    return train_x, test_x[:300], test_y[:300]


def copy_export(src: Path, dst: Path, edit=None) -> Path:
    """A copy of an export, its manifest passed through ``edit`` (a dict -> JSON value)."""
    shutil.copytree(src, dst)
    if edit is not None:
        m = json.loads((dst / "manifest.json").read_text())
        (dst / "manifest.json").write_text(json.dumps(edit(m)))
    return dst


def replace_graph(d: Path, name: str, data: bytes) -> None:
    """Overwrites graph ``name`` and rewrites the manifest with its new sha256 and size, as a
    hand-edited or badly produced export would: the hash check passes."""
    (d / name).write_bytes(data)
    m = json.loads((d / "manifest.json").read_text())
    for f in m["files"]:
        if f["file"] == name:
            f["sha256"], f["bytes"] = sha256_file(d / name), len(data)
    (d / "manifest.json").write_text(json.dumps(m))


def strict_json(text: str):
    def refuse(token):
        raise AssertionError(f"{token} in JSON output")
    return json.loads(text, parse_constant=refuse)


def cli(*args: str):
    return CliRunner().invoke(hmf_device, [str(a) for a in args])


def assert_clean_error(result, code: int, *needles: str) -> None:
    """Exit status ``code`` with a message, never an uncaught exception."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    for needle in needles:
        assert re.search(needle, result.output), (needle, result.output)


# ---------------------------------------------------------------------------------------------
# Manifests and graphs


def _cut_classes(m):
    m["class_names"] = m["class_names"][:5]
    return m


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: [m], "must hold a JSON object, not a list"),
    (lambda m: {k: v for k, v in m.items() if k != "files"}, "files must be a non-empty list"),
    (lambda m: {k: v for k, v in m.items() if k != "input"}, "input must be an object"),
    (_cut_classes, "class_names has 5 names but num_classes is 6"),
    (lambda m: {**m, "files": [{**f, "file": "../" + f["file"]} for f in m["files"]]},
     "bare file name"),
], ids=["list", "no-files", "no-input", "short-class-names", "path-in-file"])
def test_malformed_manifests_are_clear_errors_in_predict_and_profile(export_dir, tmp_path, hapt,
                                                                     edit, message):
    d = copy_export(export_dir, tmp_path / "m", edit)
    npz = tmp_path / "in.npz"
    np.savez(npz, x=hapt[1][:4])
    assert_clean_error(cli("predict", "--model-dir", d, "--input", npz), 1, message,
                       "hmf export onnx")
    assert_clean_error(cli("profile", "--model-dir", d, "--runs", "1"), 1, message)


def test_graph_with_more_outputs_than_class_names_is_refused(export_dir, tmp_path, hapt):
    """num_classes and class_names agree with each other (5) but not with the graphs (6)."""
    def five(m):
        return {**_cut_classes(m), "num_classes": 5}
    d = copy_export(export_dir, tmp_path / "m", five)
    with pytest.raises(ManifestError, match="gives 6 logits but the manifest names 5 classes"):
        DeviceModel(d).predict(hapt[1][:2])
    npz = tmp_path / "in.npz"
    np.savez(npz, x=hapt[1][:4])
    assert_clean_error(cli("predict", "--model-dir", d, "--input", npz, "--threshold", "0.5"),
                       1, "segment_1.onnx does not fit its manifest")


def test_corrupt_graph_whose_sha256_matches_is_a_clear_error(export_dir, tmp_path, hapt):
    d = copy_export(export_dir, tmp_path / "m")
    good = (d / "exit_1.onnx").read_bytes()
    replace_graph(d, "exit_1.onnx", good[: len(good) // 2])  # truncated, hash rewritten
    model = DeviceModel(d)  # the hashes match: only loading the graph can tell
    with pytest.raises(ManifestError, match=r"exit_1.onnx is not a loadable ONNX graph: .*; "
                                            r"re-export it with `hmf export onnx` or fetch it"):
        model.predict(hapt[1][:2], exit=1)
    npz = tmp_path / "in.npz"
    np.savez(npz, x=hapt[1][:4])
    assert_clean_error(cli("predict", "--model-dir", d, "--input", npz, "--exit", "1"), 1,
                       "exit_1.onnx is not a loadable ONNX graph")
    assert_clean_error(cli("profile", "--model-dir", d, "--runs", "1"), 1,
                       "exit_1.onnx is not a loadable ONNX graph")
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((4, 3, 151), np.float32), y=np.zeros(4, np.int64))
    joined = cli("join", "--broker", "mqtt://127.0.0.1:1", "--device-id", "d1", "--data", data,
                 "--work-dir", tmp_path / "w", "--tier", "auto", "--budget-ms", "1000",
                 "--model-dir", d)
    assert_clean_error(joined, 1, "exit_1.onnx is not a loadable ONNX graph")
    assert "joining" not in joined.output
    # the other graphs still work: exit 3 does not need exit 1's file
    assert DeviceModel(d).predict(hapt[1][:2], exit=3).valid.all()


def test_a_graph_of_another_shape_is_refused(export_dir, tmp_path, hapt):
    """segment_2 (it takes block 1's features) under exit_1's name, hash rewritten."""
    d = copy_export(export_dir, tmp_path / "m")
    replace_graph(d, "exit_1.onnx", (d / "segment_2.onnx").read_bytes())
    with pytest.raises(ManifestError, match=r"exit_1.onnx does not fit its manifest: it has 1 "
                                            r"input\(s\) and 2 output\(s\)"):
        DeviceModel(d).predict(hapt[1][:2], exit=1)


# ---------------------------------------------------------------------------------------------
# Input files


def test_npy_and_npz_inputs_give_the_same_answers_read_lazily(export_dir, tmp_path, hapt):
    x, y = hapt[1][:40], hapt[2][:40]
    np.save(tmp_path / "w.npy", x)
    np.savez(tmp_path / "w.npz", x=x, y=y)
    np.savez_compressed(tmp_path / "c.npz", x=x, y=y)
    np.save(tmp_path / "fortran.npy", np.asfortranarray(x))
    lazy, none = open_samples(tmp_path / "w.npy")
    assert isinstance(lazy, ArrayFile) and none is None
    stored, labels = open_samples(tmp_path / "w.npz")
    assert isinstance(stored, ArrayFile) and labels.tolist() == y.tolist()
    np.testing.assert_array_equal(stored[5:9], x[5:9])
    assert isinstance(open_samples(tmp_path / "c.npz")[0], np.ndarray)  # inflated once
    want = DeviceModel(export_dir).predict(x).labels.tolist()
    for name in ("w.npy", "w.npz", "c.npz", "fortran.npy"):
        r = cli("predict", "--model-dir", export_dir, "--input", tmp_path / name, "--json")
        assert r.exit_code == 0, r.output
        assert [p["label"] for p in strict_json(r.stdout)["predictions"]] == want, name


def _write(tmp_path: Path, name: str, maker) -> Path:
    path = tmp_path / name
    maker(path)
    return path


def _claims_huge_shape(path: Path) -> None:
    """A compressed .npz member whose header claims 1.8 TB: refused before allocating it."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                  "shape": (10**9, 3, 151)})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", header.getvalue() + b"\0" * 100)


BAD_FILES = [
    ("empty.npz", lambda p: np.savez(p), "holds no arrays"),
    ("strings.npz", lambda p: np.savez(p, x=np.array(["a", "b"])), "holds <U1 values, not "
                                                                     "numbers"),
    ("objects.npy", lambda p: np.save(p, np.array([{"a": 1}], object), allow_pickle=True),
     "holds Python objects"),
    ("objects.npz", lambda p: np.savez(p, x=np.array([[1], "a"], object)),
     "holds Python objects"),
    ("complex.npy", lambda p: np.save(p, np.zeros((2, 3, 151), np.complex64)),
     "complex64 values, not numbers"),
    ("bool.npy", lambda p: np.save(p, np.zeros((2, 3, 151), bool)), "bool values"),
    ("shape.npz", lambda p: np.savez(p, x=np.zeros((4, 3, 150), np.float32)),
     r"expected samples of shape \(3, 151\)"),
    ("flat.npy", lambda p: np.save(p, np.zeros(453, np.float32)), r"got \(453,\)"),
    ("none.npy", lambda p: np.save(p, np.zeros((0, 3, 151), np.float32)), "holds no samples"),
    ("text.npz", lambda p: p.write_text("x,y\n1,2\n"), "neither a .npy nor a .npz"),
    ("truncated.npy", lambda p: (np.save(p, np.zeros((50, 3, 151), np.float32)),
                                 p.write_bytes(p.read_bytes()[:5000])), "truncated"),
    ("broken.npz", lambda p: p.write_bytes(b"PK\x03\x04" + b"\0" * 40), "cannot read"),
    ("huge-header.npz", lambda p: _claims_huge_shape(p), "truncated: its header promises "
                                                        r"shape \(1000000000, 3, 151\)"),
    ("two.npz", lambda p: np.savez(p, a=np.zeros((1, 3, 151)), b=np.zeros((1, 3, 151))),
     "holds a, b: name the samples with --key"),
]


@pytest.mark.parametrize(("name", "maker", "message"), BAD_FILES,
                         ids=[b[0] for b in BAD_FILES])
def test_bad_input_files_are_clear_errors(export_dir, tmp_path, name, maker, message):
    path = _write(tmp_path, name, maker)
    assert_clean_error(cli("predict", "--model-dir", export_dir, "--input", path), 2,
                       "Invalid value for --input", message)


def test_keys_and_labels(export_dir, tmp_path, hapt):
    x, y = hapt[1][:6], hapt[2][:6]
    np.savez(tmp_path / "k.npz", windows=x, y=y)  # the only array besides y
    r = cli("predict", "--model-dir", export_dir, "--input", tmp_path / "k.npz", "--json")
    assert r.exit_code == 0 and "accuracy" in strict_json(r.stdout)["summary"]
    assert_clean_error(cli("predict", "--model-dir", export_dir, "--input", tmp_path / "k.npz",
                           "--key", "nope"), 2, "has no array 'nope'")
    np.save(tmp_path / "k.npy", x)
    assert_clean_error(cli("predict", "--model-dir", export_dir, "--input", tmp_path / "k.npy",
                           "--key", "x"), 2, "--key is for .npz files")
    np.savez(tmp_path / "short.npz", x=x, y=y[:3])
    r = cli("predict", "--model-dir", export_dir, "--input", tmp_path / "short.npz", "--json")
    assert r.exit_code == 0
    assert "labels y ignored (no accuracy): there are 3 for 6 samples" in r.stderr
    assert "accuracy" not in strict_json(r.stdout)["summary"]


# ---------------------------------------------------------------------------------------------
# Non-finite rows


@pytest.fixture(scope="module")
def poisoned(hapt):
    x, y = hapt[1][:30].copy(), hapt[2][:30]
    x[3, 0, 7], x[8, 2, 0], x[9] = np.nan, np.inf, -np.inf
    x[20] = 3e38  # finite, but overflows inside the graph: non-finite logits
    return x, y


def test_non_finite_rows_get_no_label_in_the_api(export_dir, poisoned):
    x, _ = poisoned
    model = DeviceModel(export_dir)
    clean = np.ones(len(x), bool)
    clean[[3, 8, 9, 20]] = False
    for pred, ref in ((model.predict(x, exit=2, batch_size=8),
                       model.predict(x[clean], exit=2)),
                      (model.cascade(x, 0.5, batch_size=8), model.cascade(x[clean], 0.5))):
        assert pred.status[[3, 8, 9]].tolist() == [NONFINITE_INPUT] * 3
        assert pred.status[20] == NONFINITE_OUTPUT
        assert (pred.status[clean] == VALID).all()
        assert (pred.labels[~clean] == -1).all() and (pred.exits[~clean] == 0).all()
        np.testing.assert_array_equal(pred.labels[clean], ref.labels)
        np.testing.assert_array_equal(pred.exits[clean], ref.exits)
        assert np.isfinite(pred.confidences).all()


def test_non_finite_rows_in_the_cli(export_dir, tmp_path, poisoned):
    x, y = poisoned
    np.savez(tmp_path / "p.npz", x=x, y=y)
    for mode in (["--exit", "2"], ["--threshold", "0.5"]):
        r = cli("predict", "--model-dir", export_dir, "--input", tmp_path / "p.npz", "--json",
                *mode)
        assert r.exit_code == 0, r.output
        out = strict_json(r.stdout)  # no NaN or Infinity tokens anywhere
        rows, summary = out["predictions"], out["summary"]
        assert rows[3] == {"index": 3, "label": None, "class": None, "exit": None,
                           "confidence": None, "invalid": "non-finite input"}
        assert rows[20]["invalid"] == "non-finite output" and rows[20]["class"] is None
        assert summary["samples"] == 30 and summary["valid"] == 26
        assert summary["invalid"] == {"non-finite input": 3, "non-finite output": 1}
        assert sum(summary["exits"].values()) == 26
        labelled = [r for r in rows if r["invalid"] is None]
        right = sum(r["label"] == y[r["index"]] for r in labelled)
        assert summary["accuracy"] == pytest.approx(right / 26)
    text = cli("predict", "--model-dir", export_dir, "--input", tmp_path / "p.npz")
    assert text.exit_code == 0
    assert re.search(r"^\s+3  invalid: non-finite input$", text.output, re.M)
    assert "30 samples, per exit {3: 26}, 3 invalid (non-finite input), 1 invalid " \
           "(non-finite output), accuracy" in text.output


def test_every_row_invalid_is_exit_status_1_with_valid_json(export_dir, tmp_path):
    np.savez(tmp_path / "nan.npz", x=np.full((3, 3, 151), np.nan, np.float32))
    r = cli("predict", "--model-dir", export_dir, "--input", tmp_path / "nan.npz", "--json")
    assert r.exit_code == 1
    assert strict_json(r.stdout)["summary"]["valid"] == 0
    assert "not one of the 3 samples could be classified" in r.stderr


# ---------------------------------------------------------------------------------------------
# Input far from the calibration samples


def without_expected(m):
    m["input"].pop("expected", None)
    return m


def test_predict_warns_when_the_input_is_far_from_the_calibration_samples(export_dir, tmp_path,
                                                                         hapt):
    """The export records its calibration windows' statistics (input.expected); the same
    windows in m/s^2 instead of g are flagged on stderr, the windows in g are not."""
    x = hapt[1][:120]
    expected = json.loads((export_dir / "manifest.json").read_text())["input"]["expected"]
    assert expected["unit"] == "g" and len(expected["statistics"]["per_channel"]["mean"]) == 3
    np.savez(tmp_path / "g.npz", x=x)
    np.save(tmp_path / "ms2.npy", x * 9.80665)
    for mode in ([], ["--threshold", "0.5"]):
        same = cli("predict", "--model-dir", export_dir, "--input", tmp_path / "g.npz",
                   "--json", *mode)
        assert same.exit_code == 0 and same.stderr == ""
        assert strict_json(same.stdout)["summary"]["warnings"] == []
        off = cli("predict", "--model-dir", export_dir, "--input", tmp_path / "ms2.npy",
                  "--json", *mode)
        assert off.exit_code == 0  # a warning, not a refusal: the labels are still printed
        assert re.search(r"warning: .*ms2.npy: the input's values are 9\.\d+x the size of the "
                         r"calibration samples'.*m/s\^2 where the model takes g", off.stderr)
        assert strict_json(off.stdout)["summary"]["warnings"]  # stdout stays JSON
    # without input.expected (an older export) nothing is compared
    older = copy_export(export_dir, tmp_path / "older", without_expected)
    plain = cli("predict", "--model-dir", older, "--input", tmp_path / "ms2.npy", "--json")
    assert plain.exit_code == 0 and plain.stderr == ""
    assert strict_json(plain.stdout)["summary"]["warnings"] == []


# ---------------------------------------------------------------------------------------------
# Bounded batches


@pytest.fixture
def ort_calls(monkeypatch):
    """Every InferenceSession.run: (graph file, rows in the batch)."""
    calls = []
    original = ort.InferenceSession.run

    def run(self, output_names, feed, *args, **kwargs):
        calls.append((Path(self._model_path).name, len(next(iter(feed.values())))))
        return original(self, output_names, feed, *args, **kwargs)
    monkeypatch.setattr(ort.InferenceSession, "run", run)
    return calls


def test_predict_runs_bounded_batches_with_the_same_answers(export_dir, tmp_path, hapt,
                                                            ort_calls):
    x = hapt[1][:100]
    model = DeviceModel(export_dir)
    whole = model.predict(x, batch_size=1000), model.cascade(x, 0.4, batch_size=1000)
    ort_calls.clear()
    small = model.predict(x, batch_size=16), model.cascade(x, 0.4, batch_size=16)
    assert max(n for _, n in ort_calls) == 16
    assert {f for f, _ in ort_calls} >= {"exit_3.onnx", "segment_1.onnx", "segment_2.onnx"}
    for a, b in zip(whole, small, strict=True):
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.exits, b.exits)
        np.testing.assert_allclose(a.confidences, b.confidences, atol=1e-6)
    np.save(tmp_path / "w.npy", x)
    ort_calls.clear()
    r = cli("predict", "--model-dir", export_dir, "--input", tmp_path / "w.npy",
            "--batch-size", "7", "--json")
    assert r.exit_code == 0 and max(n for _, n in ort_calls) == 7
    assert [p["label"] for p in strict_json(r.stdout)["predictions"]] == whole[0].labels.tolist()


def test_the_default_batch_bounds_the_input_values_per_call(export_dir, tmp_path, hapt,
                                                            ort_calls):
    model = DeviceModel(export_dir)
    assert model.default_batch_size == 256  # hapt's 3x151 windows
    model.predict(hapt[1][:300])
    assert [n for _, n in ort_calls] == [256, 44]
    for shape, batch in (([3, 32, 32], 170), ([1, 28, 28], 256), ([3, 96, 96], 18)):
        d = copy_export(export_dir, tmp_path / f"{shape[-1]}",
                        lambda m, shape=shape: {**without_expected(m), "input": {
                            **m["input"], "shape": ["batch", *shape]}})
        assert DeviceModel(d).default_batch_size == batch


def test_a_cascade_with_a_missing_segment_is_refused_before_it_runs(export_dir, tmp_path, hapt,
                                                                     ort_calls):
    """An export may leave a segment out at one precision (an int8 graph that lost too much
    accuracy): a cascade that needs it says so before running any batch."""
    def drop_segment_2(m):
        m["files"] = [f for f in m["files"] if f["file"] != "segment_2.onnx"]
        return m
    d = copy_export(export_dir, tmp_path / "m", drop_segment_2)
    model = DeviceModel(d)
    with pytest.raises(ManifestError, match=r"no fp32 segment 2, which the cascade to exit 3 "
                                            r"needs \(its fp32 segments: \[1, 3\]\)"):
        model.cascade(hapt[1][:10], 0.5)
    assert ort_calls == []
    assert model.cascade(hapt[1][:10], 0.5, max_exit=1).valid.all()
    assert model.predict(hapt[1][:10], exit=2).valid.all()  # the exit graphs are all there


def test_an_export_without_exit_graphs_is_a_clear_error(export_dir, tmp_path, hapt):
    def segments_only(m):
        m["files"] = [f for f in m["files"] if f["kind"] == "segment"]
        return m
    d = copy_export(export_dir, tmp_path / "m", segments_only)
    assert_clean_error(cli("profile", "--model-dir", d, "--runs", "1"), 1,
                       "has no fp32 exit graphs to profile")
    np.savez(tmp_path / "w.npz", x=hapt[1][:4])
    assert_clean_error(cli("predict", "--model-dir", d, "--input", tmp_path / "w.npz"), 1,
                       "has no fp32 exit graphs: classify with the cascade")
    assert cli("predict", "--model-dir", d, "--input", tmp_path / "w.npz",
               "--threshold", "0.5").exit_code == 0


def test_a_lazy_file_is_read_one_batch_at_a_time(export_dir, tmp_path, hapt, monkeypatch):
    np.save(tmp_path / "w.npy", hapt[1][:50])
    x, _ = open_samples(tmp_path / "w.npy")
    reads = []
    original = ArrayFile.__getitem__

    def getitem(self, index):
        out = original(self, index)
        reads.append(len(out))
        return out
    monkeypatch.setattr(ArrayFile, "__getitem__", getitem)
    model = DeviceModel(export_dir)
    model.predict(x, batch_size=8)
    model.cascade(x, 0.5, batch_size=8)
    model.input_warnings(x, batch_size=8)
    assert reads and max(reads) == 8


# ---------------------------------------------------------------------------------------------
# Latency budget, measurement and the tier rule


def report(*p95s: float) -> dict:
    return {"exits": [{"exit": k, "p95_ms": v, "median_ms": v / 2, "p99_ms": v, "mean_ms": v}
                      for k, v in enumerate(p95s, 1)]}


def test_tier_rule_needs_every_exit_up_to_the_tier_within_budget():
    r = report(4.85, 8.28, 5.73)  # the measurement: exit 2 misses 6 ms, exit 3 not
    assert tier_within(r, 6.0) == 1
    assert tier_within(r, 8.28) == 3
    assert tier_within(r, 4.0) == 0
    assert tier_within(report(1, 2, 3), 2.5) == 2
    assert tier_within(r, 6.0, "median_ms") == 3  # 2.4 / 4.1 / 2.9
    partial = {"exits": [{"exit": k, "p95_ms": v} for k, v in ((2, 1.0), (3, 2.0))]}
    assert tier_within(partial, 1.5) == 2  # the exported exits, in order
    for bad in (0, -1, math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="positive number of milliseconds"):
            tier_within(r, bad)
        with pytest.raises(ValueError):
            check_budget(bad)


@pytest.mark.parametrize("budget", ["-1", "0", "nan", "inf", "-inf"])
def test_budgets_that_are_not_positive_and_finite_are_refused(export_dir, tmp_path, budget):
    r = cli("profile", "--model-dir", export_dir, "--runs", "1", "--budget-ms", budget)
    assert_clean_error(r, 2, "Invalid value for '--budget-ms'",
                       "must be a positive number of milliseconds")
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((4, 3, 151), np.float32), y=np.zeros(4, np.int64))
    j = cli("join", "--broker", "mqtt://127.0.0.1:1", "--device-id", "d1", "--data", data,
            "--work-dir", tmp_path / "w", "--tier", "auto", "--budget-ms", budget,
            "--model-dir", export_dir)
    assert_clean_error(j, 2, "must be a positive number of milliseconds")


def test_nan_threshold_is_refused(export_dir, tmp_path, hapt):
    np.savez(tmp_path / "w.npz", x=hapt[1][:2])
    assert_clean_error(cli("predict", "--model-dir", export_dir, "--input", tmp_path / "w.npz",
                           "--threshold", "nan"), 2, "not NaN")


def test_profile_interleaves_the_exits_of_a_real_export(export_dir, ort_calls):
    r = profile(export_dir, runs=4, warmup=1, threads=1)
    timed = [f for f, _ in ort_calls][-12:]
    assert timed == [f"exit_{k}.onnx" for k in interleaved_schedule([1, 2, 3], 4)]
    assert timed[:6] == ["exit_1.onnx", "exit_2.onnx", "exit_3.onnx",
                         "exit_2.onnx", "exit_3.onnx", "exit_1.onnx"]
    assert [e["runs"] for e in r["exits"]] == [4, 4, 4] and "interleaved" in r["timing"]
    for e in r["exits"]:
        assert 0 < e["min_ms"] <= e["median_ms"] <= e["p95_ms"] and e["peak_rss_mb"] > 0


def test_interleaving_spreads_drift_over_every_exit():
    """A board that slows down as it heats: each call takes its exit's cost times a factor
    that grows with every call. Timed one exit after the other, the last exit bears all the
    slowdown; interleaved, the measured costs keep their true ratio 1 : 2 : 3."""
    now, calls = [0.0], [0]

    def graph(cost):
        def run():
            calls[0] += 1
            now[0] += cost * (1 + calls[0] / 50)  # 1x at the start, 7x after 300 calls
        return run
    fns = {k: graph(k) for k in (1, 2, 3)}
    times = time_interleaved(fns, runs=100, warmup=0, clock=lambda: now[0])
    medians = {k: np.median(v) for k, v in times.items()}
    assert medians[2] / medians[1] == pytest.approx(2, rel=0.05)
    assert medians[3] / medians[1] == pytest.approx(3, rel=0.05)
    now[0], calls[0] = 0.0, 0
    one_after_other = {k: time_interleaved({k: fns[k]}, runs=100, warmup=0,
                                           clock=lambda: now[0])[k] for k in (1, 2, 3)}
    assert np.median(one_after_other[3]) / np.median(one_after_other[1]) > 6  # biased
