"""The device runtime (ONNX Runtime only): per-exit prediction, cascade, profile, CLI."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from model_states import perturbed_state

from common.models import build_model, tier_state
from device.cli import hmf_device
from device.profile import deepest_tier_within, profile, tier_within
from device.runtime import DeviceModel, ManifestError, softmax
from export.data import export_data, hapt_split
from export.exporter import Int8Policy, export_onnx

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4


LOOSE = Int8Policy(min_agreement=0.0, max_drop=1.0)


@pytest.fixture(scope="module")
def state():
    return perturbed_state("hapt")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, state):
    out = tmp_path_factory.mktemp("hapt_onnx")
    export_onnx("hapt", state, out, export_data("hapt", None, calibration=32, evaluation=64),
                quantize="int8",
                int8=LOOSE)  # every int8 graph ships, on any CPU: these tests run them
    return out


@pytest.fixture(scope="module")
def windows():
    _, (x, y) = hapt_split()
    return x[:48], y[:48]


@pytest.fixture(scope="module")
def reference(state, windows):
    """torch's logits at every exit, from the model itself (not from the export code)."""
    model = build_model("hapt")
    model.load_state_dict(state)
    with torch.no_grad():
        return [z.numpy() for z in model.eval()(torch.from_numpy(windows[0]))]


def test_predict_at_each_exit_matches_torch(model_dir, windows, reference):
    model = DeviceModel(model_dir, threads=1)
    assert model.exits == [1, 2, 3] and model.segments == [1, 2, 3]
    for k in (1, 2, 3):
        logits = model.logits(windows[0], k)
        assert np.abs(logits - reference[k - 1]).max() <= TOL
        p = model.predict(windows[0], exit=k)
        np.testing.assert_array_equal(p.labels, reference[k - 1].argmax(1))
        np.testing.assert_allclose(p.confidences, softmax(reference[k - 1]).max(1), atol=1e-5)
        assert (p.exits == k).all()
    # one sample without its batch axis
    one = model.predict(windows[0][0])
    assert one.labels.tolist() == [reference[2][0].argmax()]


def test_cascade_stops_at_the_first_confident_exit(model_dir, windows, reference):
    model = DeviceModel(model_dir)
    probs = [softmax(z) for z in reference]
    # a threshold that sends some samples out at each exit
    t = float(np.median(probs[0].max(1)))
    p = model.cascade(windows[0], t)
    for i in range(len(windows[0])):
        k = next((k for k in (1, 2) if probs[k - 1][i].max() >= t), 3)
        assert p.exits[i] == k
        assert p.labels[i] == probs[k - 1][i].argmax()
        assert p.confidences[i] == pytest.approx(probs[k - 1][i].max(), abs=1e-5)
    assert 0 < (p.exits == 1).sum() < len(p.exits)


def test_cascade_extremes_and_max_exit(model_dir, windows, reference):
    model = DeviceModel(model_dir)
    everyone_first = model.cascade(windows[0], 0.0)
    assert (everyone_first.exits == 1).all()
    np.testing.assert_array_equal(everyone_first.labels, reference[0].argmax(1))
    nobody_sure = model.cascade(windows[0], 1.01)
    assert (nobody_sure.exits == 3).all()
    np.testing.assert_array_equal(nobody_sure.labels, reference[2].argmax(1))
    capped = model.cascade(windows[0], 1.01, max_exit=2)
    assert (capped.exits == 2).all()
    np.testing.assert_array_equal(capped.labels, reference[1].argmax(1))


def test_int8_graphs_run_and_mostly_agree_with_fp32(model_dir, windows, reference):
    model = DeviceModel(model_dir, precision="int8")
    for k in (1, 2, 3):
        logits = model.logits(windows[0], k)
        assert np.abs(logits - reference[k - 1]).max() < 0.5 * np.abs(reference[k - 1]).max()
    assert model.cascade(windows[0], 0.5).labels.shape == (48,)


def test_corrupt_or_missing_exports_are_refused(model_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    with open(copy / "exit_2.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\0\0\0\0")
    with pytest.raises(ManifestError, match="sha256"):
        DeviceModel(copy)
    (copy / "segment_1.onnx").unlink()
    with pytest.raises(ManifestError, match="missing"):
        DeviceModel(copy, verify=True)
    with pytest.raises(ManifestError, match="manifest.json"):
        DeviceModel(tmp_path)
    m = json.loads((model_dir / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**m, "format": "other/9"}))
    with pytest.raises(ManifestError, match="format"):
        DeviceModel(tmp_path)
    fp32_only = tmp_path / "fp32"
    fp32_only.mkdir()
    (fp32_only / "manifest.json").write_text(json.dumps(
        {**m, "precisions": ["fp32"], "files": [f for f in m["files"]
                                                if f["precision"] == "fp32"]}))
    for f in m["files"]:
        if f["precision"] == "fp32":
            shutil.copy(model_dir / f["file"], fp32_only / f["file"])
    with pytest.raises(ManifestError, match="int8"):
        DeviceModel(fp32_only, precision="int8")


def test_sessions_use_the_threads_asked_for_and_do_not_spin(model_dir):
    opts = DeviceModel(model_dir, threads=1).session("exit", 1).get_session_options()
    assert opts.intra_op_num_threads == 1
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    spinning = DeviceModel(model_dir, spin=True).session("segment", 1).get_session_options()
    assert spinning.get_session_config_entry("session.intra_op.allow_spinning") == "1"


def test_wrong_input_shape_is_refused(model_dir):
    with pytest.raises(ValueError, match="shape"):
        DeviceModel(model_dir).predict(np.zeros((2, 3, 150), np.float32))


def test_profile_reports_latency_memory_and_the_machine(model_dir):
    r = profile(model_dir, runs=5, batch=2, threads=1)
    assert r["model"] == "hapt" and r["batch"] == 2 and [e["exit"] for e in r["exits"]] == [1, 2, 3]
    assert r["system"]["onnxruntime"] and r["system"]["cpu"]
    assert set(r["thermal_before"]) == {"temperatures_c", "cpufreq", "pi_throttled",
                                        "throttle_events"}
    for e in r["exits"]:
        assert 0 < e["min_ms"] <= e["median_ms"] <= e["p95_ms"] <= e["p99_ms"]
        assert e["throughput_per_s"] == pytest.approx(2 / (e["median_ms"] / 1e3))
        assert e["peak_rss_mb"] > 0
        if sys.platform == "linux":
            assert e["session_mb"] is not None
    # a deeper exit runs more MACs and holds more weights
    assert r["exits"][0]["macs"] < r["exits"][1]["macs"] < r["exits"][2]["macs"]


def test_deepest_tier_within_budget():
    fake = {"exits": [{"exit": k, "median_ms": k, "p95_ms": 2.0 * k, "p99_ms": 3.0 * k,
                       "mean_ms": k} for k in (1, 2, 3)]}
    assert tier_within(fake, 4.5) == 2  # by p95 by default
    assert tier_within(fake, 4.5, "median_ms") == 3
    assert tier_within(fake, 1.9) == 0
    assert deepest_tier_within("unused", 6.0, report=fake) == 3
    with pytest.raises(ValueError):
        tier_within(fake, 1.0, "max_ms")


def test_deepest_tier_within_profiles_the_model(model_dir):
    assert deepest_tier_within(model_dir, 1e6, runs=2) == 3
    assert deepest_tier_within(model_dir, 1e-6, runs=2) == 0


def test_cli_profile_and_predict(model_dir, windows, reference, tmp_path):
    runner = CliRunner()
    out = runner.invoke(hmf_device, ["profile", "--model-dir", str(model_dir), "--runs", "3",
                                     "--budget-ms", "100000", "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)
    assert report["deepest_tier_within_budget"] == 3 and len(report["exits"]) == 3
    text = runner.invoke(hmf_device, ["profile", "--model-dir", str(model_dir), "--runs", "2"])
    assert text.exit_code == 0 and "median ms" in text.output

    npz = tmp_path / "in.npz"
    np.savez(npz, x=windows[0], y=windows[1])
    got = runner.invoke(hmf_device, ["predict", "--model-dir", str(model_dir), "--input",
                                     str(npz), "--exit", "2", "--json"])
    assert got.exit_code == 0, got.output
    res = json.loads(got.output)
    labels = [p["label"] for p in res["predictions"]]
    assert labels == reference[1].argmax(1).tolist()
    assert res["summary"]["exits"] == {"2": 48}
    assert res["summary"]["accuracy"] == pytest.approx(
        float((reference[1].argmax(1) == windows[1]).mean()))
    casc = runner.invoke(hmf_device, ["predict", "--model-dir", str(model_dir), "--input",
                                      str(npz), "--threshold", "0"])
    assert casc.exit_code == 0 and "per exit {1: 48}" in casc.output
    both = runner.invoke(hmf_device, ["predict", "--model-dir", str(model_dir), "--input",
                                      str(npz), "--exit", "1", "--threshold", "0.5"])
    assert both.exit_code != 0
    gpu = runner.invoke(hmf_device, ["predict", "--model-dir", str(model_dir), "--input",
                                     str(npz), "--providers", "NoSuchExecutionProvider"])
    assert gpu.exit_code != 0 and "not in this onnxruntime build" in gpu.output


def test_uint8_images_are_normalised_as_in_training(tmp_path):
    state = perturbed_state("mnist")
    export_onnx("mnist", state, tmp_path, export_data("mnist", None, calibration=8),
                tiers=[1])
    pixels = np.random.default_rng(0).integers(0, 256, (4, 1, 28, 28), dtype=np.uint8)
    model = build_model("mnist", depth=1)
    model.load_state_dict(tier_state(state, 1))
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy((pixels / 255.0 - 0.5) / 0.5).float())[0].numpy()
    got = DeviceModel(tmp_path).logits(pixels, 1)
    assert np.abs(got - ref).max() <= TOL


def test_device_code_imports_neither_torch_nor_onnx_nor_the_cloud():
    code = ("import sys, device.cli, device.runtime, device.profile, device.inputs\n"
            "bad = [m for m in ('torch', 'onnx', 'cloud', 'export', 'scipy', 'matplotlib') "
            "if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
