"""int8 where it is good enough, fp32 elsewhere: the fallback the export leaves (an int8 graph
left out runs in fp32) and the board's own check on the shipped calibration windows.

Deterministic on any CPU: the disagreement is made, not hoped for. Windows 1000 times larger
than the calibration saturate every int8 range, whatever the kernels.
"""

import hashlib
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from test_export import briefly_trained_hapt

from common.manifest import read as read_manifest
from common.protocol import GraphFile, blob_ref
from device.cli import hmf_device
from device.precision import choose_precisions
from device.profile import profile
from device.runtime import DeviceModel
from device.serving import ModelFetcher
from export.data import export_data, hapt_split
from export.exporter import Int8Policy, export_onnx


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """Every int8 graph shipped (loose bounds), calibrated on real windows."""
    out = tmp_path_factory.mktemp("good")
    export_onnx("hapt", briefly_trained_hapt(), out,
                export_data("hapt", None, calibration=64, evaluation=64), quantize="int8",
                tiers=[1, 2], int8=Int8Policy(min_agreement=0.0, max_drop=1.0))
    return out


@pytest.fixture(scope="module")
def windows():
    _, (x, _) = hapt_split()
    return x[:50]


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rewrite(d, change):
    m = json.loads((d / "manifest.json").read_text())
    change(m)
    (d / "manifest.json").write_text(json.dumps(m))


def _kept_fp32(d, k):
    """What an export writes when int8 exit k and segment k lose accuracy: no int8 files for
    them, their names in quantization.kept_fp32."""
    def change(m):
        m["files"] = [f for f in m["files"] if not (f["precision"] == "int8"
                                                     and f["index"] == k)]
        m["quantization"]["kept_fp32"] = [f"exit_{k}", f"segment_{k}"]
    for kind in ("exit", "segment"):
        (d / f"{kind}_{k}.int8.onnx").unlink()
    _rewrite(d, change)


def _loud_calibration(d, factor=1000.0):
    """The shipped calibration windows scaled up: int8 saturates on them on any CPU. The bound
    the board holds int8 to becomes the default export's (0.97)."""
    with np.load(d / "calibration.npz") as f:
        x, y = f["x"] * factor, f["y"]
    np.savez(d / "calibration.npz", x=x.astype(np.float32), y=y)
    digest = hashlib.sha256((d / "calibration.npz").read_bytes()).hexdigest()
    size = (d / "calibration.npz").stat().st_size

    def change(m):
        m["calibration"].update(sha256=digest, bytes=size)
        m["quantization"]["bounds"]["min_agreement"] = 0.97
    _rewrite(d, change)


def test_int8_request_runs_fp32_where_the_export_left_int8_out(good, tmp_path, windows):
    d = _copy(good, tmp_path / "m")
    _kept_fp32(d, 2)
    read_manifest(d / "manifest.json")  # still a valid manifest
    int8, fp32 = DeviceModel(d, precision="int8"), DeviceModel(d)
    assert int8.exits == [1, 2] and int8.segments == [1, 2]
    assert [int8.precision_of("exit", k) for k in (1, 2)] == ["int8", "fp32"]
    np.testing.assert_array_equal(int8.logits(windows, 2), fp32.logits(windows, 2))
    assert not np.array_equal(int8.logits(windows, 1), fp32.logits(windows, 1))
    cascade = int8.cascade(windows, threshold=1.1)  # nobody leaves early: all reach exit 2
    np.testing.assert_array_equal(cascade.labels, fp32.logits(windows, 2).argmax(1))


def test_an_export_without_any_int8_says_why(good, tmp_path):
    d = _copy(good, tmp_path / "m")
    for k in (1, 2):
        for kind in ("exit", "segment"):
            (d / f"{kind}_{k}.int8.onnx").unlink()

    def change(m):
        m["files"] = [f for f in m["files"] if f["precision"] == "fp32"]
        m["precisions"] = ["fp32"]
        m["quantization"]["kept_fp32"] = ["exit_1", "exit_2", "segment_1", "segment_2"]
    _rewrite(d, change)
    with pytest.raises(ValueError, match="kept every graph in fp32"):
        DeviceModel(d, precision="int8")


def test_the_board_keeps_int8_where_it_agrees_and_drops_it_where_it_does_not(good, tmp_path):
    assert [(v.exit, v.precision) for v in choose_precisions(good, min_agreement=0.0)] == [
        (1, "int8"), (2, "int8")]
    d = _copy(good, tmp_path / "loud")
    _loud_calibration(d)
    verdicts = choose_precisions(d, min_agreement=0.97)
    assert [v.precision for v in verdicts] == ["fp32", "fp32"]
    assert all(v.agreement < 0.97 and "calibration windows here" in v.why for v in verdicts)


def test_the_board_refuses_calibration_windows_that_are_not_the_exports(good, tmp_path):
    d = _copy(good, tmp_path / "m")
    np.savez(d / "calibration.npz", x=np.zeros((4, 3, 151), np.float32))
    with pytest.raises(ValueError, match="differs from the manifest's sha256"):
        choose_precisions(d)


def test_profile_auto_times_both_and_says_which_and_why(good, tmp_path):
    d = _copy(good, tmp_path / "loud")
    _loud_calibration(d)
    r = profile(d, precision="auto", runs=5)
    assert r["precision"] == "auto"
    for row in r["exits"]:  # int8 disagrees here: fp32 whatever the speed
        assert row["precision"] == "fp32" and row["int8_agreement"] < 0.97
        assert set(row["latency_by_precision"]) == {"fp32", "int8"}
        assert row["p95_ms"] == row["latency_by_precision"]["fp32"]["p95_ms"]
    r = profile(good, precision="auto", runs=5)
    for row in r["exits"]:  # the export's bound is 0: int8 exactly where it is faster
        lat = row["latency_by_precision"]
        faster = lat["int8"]["p95_ms"] < lat["fp32"]["p95_ms"]
        assert row["precision"] == ("int8" if faster else "fp32"), row["why"]


def test_predict_auto_reports_its_choice(good, tmp_path, windows):
    d = _copy(good, tmp_path / "loud")
    _loud_calibration(d)
    np.save(tmp_path / "w.npy", windows)
    res = CliRunner().invoke(hmf_device, ["predict", "--model-dir", str(d), "--input",
                                          str(tmp_path / "w.npy"), "--precision", "auto",
                                          "--exit", "2", "--json"])
    assert res.exit_code == 0, res.output
    assert "precision auto: exit 2: fp32 (int8 agrees with fp32 on" in res.stderr
    labels = [p["label"] for p in json.loads(res.stdout)["predictions"]]
    assert labels == DeviceModel(d).logits(windows, 2).argmax(1).tolist()


def test_an_int8_device_fetches_fp32_where_int8_was_left_out(tmp_path):
    ref = blob_ref(b"x")
    files = [GraphFile(f"{kind}_{k}{s}.onnx", kind, k, q, ref)
             for kind in ("exit", "segment") for k in (1, 2, 3)
             for q, s in (("fp32", ""), ("int8", ".int8")) if not (q == "int8" and k == 3)]
    fetcher = ModelFetcher(tmp_path, "d1", tier=3, precisions=("int8",), log=lambda _: None)
    got = sorted(f.file for f in fetcher._wanted(files))
    assert got == ["exit_1.int8.onnx", "exit_2.int8.onnx", "exit_3.onnx",
                   "segment_1.int8.onnx", "segment_2.int8.onnx", "segment_3.onnx"]
    fp32 = ModelFetcher(tmp_path / "b", "d2", tier=2, precisions=("fp32",), log=lambda _: None)
    assert sorted(f.file for f in fp32._wanted(files)) == [
        "exit_1.onnx", "exit_2.onnx", "segment_1.onnx", "segment_2.onnx"]


def test_a_served_int8_model_is_profiled_as_it_is_and_said_unchecked(good, tmp_path, windows):
    """What an int8 device fetched over MQTT looks like: int8 graphs only, no calibration
    windows (they are not served), a "served" entry. profile --precision auto (the default)
    and predict --precision auto run int8 and say that it was not checked here."""
    d = _copy(good, tmp_path / "served")
    for k in (1, 2):
        for kind in ("exit", "segment"):
            (d / f"{kind}_{k}.onnx").unlink()
    (d / "calibration.npz").unlink()

    def change(m):
        m["files"] = [f for f in m["files"] if f["precision"] == "int8"]
        m.update(precisions=["int8"], calibration=None, served={"run": "r", "round": 1})
    _rewrite(d, change)
    r = profile(d, precision="auto", runs=3)
    assert [row["precision"] for row in r["exits"]] == ["int8", "int8"]
    assert all("not checked against fp32 here: no calibration windows here (a model served"
               in row["why"] for row in r["exits"])
    np.save(tmp_path / "w.npy", windows)
    res = CliRunner().invoke(hmf_device, ["predict", "--model-dir", str(d), "--input",
                                          str(tmp_path / "w.npy"), "--precision", "auto"])
    assert res.exit_code == 0, res.output
    assert "precision auto: exit 2: int8 (int8 not checked against fp32 here" in res.stderr
