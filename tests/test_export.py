"""`hmf export onnx`: graphs per exit and per segment, checked against torch on real windows."""

import hashlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from model_states import perturbed_state

from cloud.cli import hmf
from common import tensorfile
from common.models import build_model, macs_per_sample, param_count
from common.training import TrainConfig, train_local
from export.data import HAPT_TEST_SUBJECTS, ExportData, Samples, export_data, hapt_split
from export.exporter import ExportCheckError, Int8Policy, check_fp32, export_onnx

TOL = 1e-4


def briefly_trained_hapt() -> dict[str, torch.Tensor]:
    """A HAPT model trained for a few dozen steps: better than chance, so accuracies mean
    something and int8's can be compared with fp32's."""
    torch.manual_seed(0)
    (tx, ty), _ = hapt_split()
    keep = np.random.default_rng(0).choice(len(tx), 512, replace=False)
    model = build_model("hapt")
    train_local(model, torch.from_numpy(tx[keep]), torch.from_numpy(ty[keep]),
                TrainConfig(epochs=1, batch_size=32, lr=2e-3), torch.Generator().manual_seed(0))
    return model.state_dict()


def torch_logits(name, state, x):
    model = build_model(name)
    model.load_state_dict(state)
    with torch.no_grad():
        return [z.numpy() for z in model.eval()(torch.from_numpy(x))]


def run(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


@pytest.fixture(scope="module")
def trained():
    return briefly_trained_hapt()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, trained):
    """The trained model written as a run directory's checkpoint, exported through the CLI."""
    run_dir = tmp_path_factory.mktemp("run")
    tensorfile.save(run_dir / "checkpoint.hmf", {f"global.{k}": v for k, v in trained.items()},
                    {"format": "hmf-checkpoint/1", "model": "hapt", "round": 7})
    out = tmp_path_factory.mktemp("onnx")
    result = CliRunner().invoke(hmf, ["export", "onnx", "--checkpoint", str(run_dir), "--out",
                                      str(out), "--quantize", "int8",
                                      "--calibration-samples", "128", "--eval-samples", "300"])
    assert result.exit_code == 0, result.output
    assert "check passed" in result.output
    return out, json.loads((out / "manifest.json").read_text()), run_dir


@pytest.fixture(scope="module")
def windows():
    """Real HAPT windows of the test volunteers, not used for calibration."""
    _, (x, y) = hapt_split()
    return x[:40], y[:40]


def test_manifest_describes_input_files_and_source(exported):
    out, m, run_dir = exported
    assert m["model"] == "hapt" and m["tiers"] == [1, 2, 3] and m["num_classes"] == 6
    assert m["class_names"][0] == "WALKING" and len(m["class_names"]) == 6
    assert {k: m["input"][k] for k in ("name", "shape", "dtype")} == {
        "name": "input", "shape": ["batch", 3, 151], "dtype": "float32"}
    pre = m["input"]["preprocessing"]
    assert pre["kind"] == "raw" and pre["unit"] == "g" and "1x18x25" in pre["in_graph"]
    assert m["opset"] == 17 and {"torch", "onnx", "onnxruntime"} <= set(m["versions"])
    ckpt = run_dir / "checkpoint.hmf"
    assert m["source"] == {"checkpoint": "checkpoint.hmf", "round": 7, "strategy": None,
                           "checkpoint_sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest()}
    names = {f["file"] for f in m["files"]}
    fp32 = {f"{kind}_{k}.onnx" for kind in ("exit", "segment") for k in (1, 2, 3)}
    int8 = {n.replace(".onnx", ".int8.onnx") for n in fp32
            if n[: -len(".onnx")] not in m["quantization"]["kept_fp32"]}
    assert names == fp32 | int8
    # weights inside the graphs: the directory holds nothing but them, the manifest and the
    # calibration windows
    assert {p.name for p in out.iterdir()} == names | {"manifest.json", "calibration.npz"}
    for f in m["files"]:
        assert hashlib.sha256((out / f["file"]).read_bytes()).hexdigest() == f["sha256"]


def test_nothing_of_the_build_machine_ships(exported):
    """No absolute path (the checkpoint's, the data's, the temp dirs') anywhere in the
    manifest: it travels to boards and other people."""
    out, m, run_dir = exported

    def strings(v):
        if isinstance(v, dict):
            for x in v.values():
                yield from strings(x)
        elif isinstance(v, list):
            for x in v:
                yield from strings(x)
        elif isinstance(v, str):
            yield v

    text = (out / "manifest.json").read_text()
    assert str(run_dir) not in text and str(out) not in text
    assert not [s for s in strings(m) if s.startswith("/") or ":\\" in s]


def test_the_manifest_says_what_the_input_must_look_like(exported):
    """Sensor, units, rate and window, and per-axis statistics of the calibration windows,
    recomputed here from the shipped calibration.npz."""
    out, m, _ = exported
    exp = m["input"]["expected"]
    assert (exp["unit"], exp["sampling_hz"], exp["window_samples"], exp["axes"]) == (
        "g", 50, 151, ["x", "y", "z"])
    cal = m["calibration"]
    assert cal["file"] == "calibration.npz" and cal["samples"] == 128
    assert hashlib.sha256((out / cal["file"]).read_bytes()).hexdigest() == cal["sha256"]
    with np.load(out / cal["file"], allow_pickle=False) as f:
        x, y = f["x"], f["y"]
    ref = export_data("hapt", None, calibration=128, evaluation=8).calibration
    np.testing.assert_array_equal(x, ref.x)
    np.testing.assert_array_equal(y, ref.y)
    stats = exp["statistics"]
    assert stats["samples"] == 128
    per_axis = x.transpose(1, 0, 2).reshape(3, -1).astype(np.float64)
    np.testing.assert_allclose(stats["per_channel"]["mean"], per_axis.mean(1), atol=1e-6)
    np.testing.assert_allclose(stats["per_channel"]["std"], per_axis.std(1), atol=1e-6)
    np.testing.assert_allclose(stats["per_channel"]["p99"], np.percentile(per_axis, 99, axis=1),
                               atol=1e-6)
    assert 0.5 < stats["per_channel"]["mean"][0] < 1.2  # x axis: gravity, in g


def test_params_and_macs_count_only_what_each_graph_computes(exported):
    _, m, _ = exported
    heads = [build_model("hapt").heads[i].fc.weight.numel() for i in range(3)]
    head_params = [sum(p.numel() for p in build_model("hapt").heads[i].parameters())
                   for i in range(3)]
    fp32 = {(f["kind"], f["index"]): f for f in m["files"] if f["precision"] == "fp32"}
    for k in (1, 2, 3):
        tier = build_model("hapt", depth=k)
        e = fp32["exit", k]
        assert e["params"] == param_count(tier) - sum(head_params[: k - 1])
        assert e["macs"] == macs_per_sample(tier) - sum(heads[: k - 1])
    # the segments add up to the deepest exit plus the heads of exits 1 and 2
    assert (sum(fp32["segment", k]["macs"] for k in (1, 2, 3))
            == fp32["exit", 3]["macs"] + heads[0] + heads[1])
    assert (sum(fp32["segment", k]["params"] for k in (1, 2, 3))
            == fp32["exit", 3]["params"] + head_params[0] + head_params[1])


def test_every_graph_passes_the_onnx_checker_and_exit_k_holds_only_blocks_up_to_k(exported):
    out, m, _ = exported
    for f in m["files"]:
        model = onnx.load(str(out / f["file"]))
        onnx.checker.check_model(model, full_check=True)
        assert all(not t.external_data for t in model.graph.initializer)
        convs = sum(n.op_type in ("Conv", "QLinearConv") for n in model.graph.node)
        blocks = f["index"] + 1 if f["kind"] == "exit" else 1 + (f["index"] == 1)
        assert convs == 2 * blocks, f["file"]  # 2 convs in the stem and in each block
        if f["precision"] == "int8":
            ops = {n.op_type for n in model.graph.node}
            assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "ConvInteger" not in ops


@pytest.mark.parametrize("batch", [1, 7])
def test_exit_graphs_match_torch_on_real_windows(exported, trained, windows, batch):
    out, _, _ = exported
    x = windows[0][:batch]
    ref = torch_logits("hapt", trained, x)
    for k in (1, 2, 3):
        (got,) = run(out / f"exit_{k}.onnx", x)
        assert got.shape == (batch, 6)
        assert np.abs(got - ref[k - 1]).max() <= TOL
        np.testing.assert_array_equal(got.argmax(1), ref[k - 1].argmax(1))


def test_chained_segments_give_the_exit_graphs_logits(exported, trained, windows):
    out, _, _ = exported
    x, feats = windows[0], windows[0]
    ref = torch_logits("hapt", trained, x)
    shapes = {1: (128, 4, 6), 2: (256, 2, 3), 3: (512, 1, 1)}
    for k in (1, 2, 3):
        feats, logits = run(out / f"segment_{k}.onnx", feats)
        assert feats.shape == (len(x), *shapes[k])
        (exit_logits,) = run(out / f"exit_{k}.onnx", x)
        assert np.abs(logits - exit_logits).max() <= TOL
        assert np.abs(logits - ref[k - 1]).max() <= TOL


def test_manifest_check_records_the_measured_agreement(exported):
    _, m, _ = exported
    c = m["check"]
    assert c["passed"] and c["samples"] == 64 and "test volunteers" in c["source"]
    for k in ("1", "2", "3"):
        assert c["exits"][k]["max_abs_diff_vs_torch"] <= TOL
        assert c["exits"][k]["argmax_agreement"] == 1.0


def test_int8_verdicts_are_measured_on_test_windows_and_hold(exported, trained):
    """Every int8 graph that ships agrees with fp32 and keeps its accuracy within the bounds on
    this CPU, recomputed here; one that does not ship says why and its file is gone. Holds on
    any CPU: which graphs ship may differ, the bound may not."""
    out, m, _ = exported
    q = m["quantization"]
    assert q["method"]["format"] == "QDQ" and q["calibration"]["samples"] == 128
    assert q["method"]["scheme"] == "u8s8-rr" and q["measured_on"]["int8_isa"]
    assert str(list(HAPT_TEST_SUBJECTS)) in q["evaluation"]["source"]
    assert q["bounds"] == {"min_agreement": 0.97, "max_accuracy_drop": 0.02,
                           "on_failure": "fp32"}
    ev = export_data("hapt", None, calibration=128, evaluation=300).evaluation
    ref = torch_logits("hapt", trained, ev.x)
    for k in (1, 2, 3):
        fp32 = float((ref[k - 1].argmax(1) == ev.y).mean())
        assert fp32 > 0.3  # trained: well above the 1/6 of chance
        assert q["accuracy"]["fp32"][str(k)] == pytest.approx(fp32, abs=1e-9)
        v = q["graphs"][f"exit_{k}"]
        path = out / f"exit_{k}.int8.onnx"
        if v["reason"] is not None:
            assert not path.exists() and f"exit_{k}" in q["kept_fp32"]
            continue
        (int8,) = run(path, ev.x)
        agree = float((int8.argmax(1) == run(out / f"exit_{k}.onnx", ev.x)[0].argmax(1)).mean())
        acc8 = float((int8.argmax(1) == ev.y).mean())
        assert v["agreement_with_fp32"] == pytest.approx(agree, abs=1e-9) and agree >= 0.97
        assert q["accuracy"]["int8"][str(k)] == pytest.approx(acc8, abs=1e-9)
        assert fp32 - acc8 <= 0.02


def test_segments_are_judged_as_the_cascade_runs_them(exported):
    """Segment k's verdict compares the int8 chain (each segment int8 where it ships) with the
    fp32 chain: recomputed here from the files that shipped."""
    out, m, _ = exported
    q = m["quantization"]
    ev = export_data("hapt", None, calibration=128, evaluation=300).evaluation
    x8, x32 = ev.x, ev.x
    for k in (1, 2, 3):
        f32, l32 = run(out / f"segment_{k}.onnx", x32)
        shipped = (out / f"segment_{k}.int8.onnx").exists()
        f8, l8 = run(out / f"segment_{k}{'.int8' if shipped else ''}.onnx", x8)
        if shipped:
            v = q["graphs"][f"segment_{k}"]
            assert v["agreement_with_fp32"] == pytest.approx(
                float((l8.argmax(1) == l32.argmax(1)).mean()), abs=1e-9)
            assert v["agreement_with_fp32"] >= 0.97
        x8, x32 = f8, f32


def _narrow_calibration(n: int = 64) -> ExportData:
    """Calibration windows shrunk 1000-fold: every int8 range is far too narrow for real
    windows, so int8 saturates on any CPU. Deterministic failure of the bounds."""
    data = export_data("hapt", None, calibration=n, evaluation=100)
    cal = data.calibration
    return ExportData(Samples(cal.x * 1e-3, cal.y, cal.source), data.evaluation)


def test_int8_over_the_bounds_is_kept_in_fp32_with_the_reason(tmp_path, trained):
    """Every graph that takes the raw windows (the exits, segment 1) quantises them with the
    narrowed ranges and fails; deeper segments take features and may pass. Whatever ships is
    within the bounds, whatever does not has no file and says why."""
    m = export_onnx("hapt", trained, tmp_path, _narrow_calibration(), quantize="int8",
                    tiers=[1, 2])
    q = m["quantization"]
    assert {"exit_1", "exit_2", "segment_1"} <= set(q["kept_fp32"])
    for name, v in q["graphs"].items():
        drop = v["accuracy_fp32"] - v["accuracy_int8"]
        fails = v["agreement_with_fp32"] < 0.97 or drop > 0.02
        assert (name in q["kept_fp32"]) == fails == (v["precision"] == "fp32")
        assert (tmp_path / f"{name}.int8.onnx").exists() == (not fails)
        if fails:
            assert v["reason"].startswith("agrees with fp32 on"
                                          if v["agreement_with_fp32"] < 0.97 else "loses")
    int8 = {f["file"] for f in m["files"] if f["precision"] == "int8"}
    assert int8 == {f"{n}.int8.onnx" for n in q["graphs"] if n not in q["kept_fp32"]}
    assert ("int8" in m["precisions"]) == bool(int8)


def test_int8_over_the_bounds_refused_leaves_no_manifest(tmp_path, trained):
    (tmp_path / "manifest.json").write_text("{}")  # a stale one from an earlier export
    with pytest.raises(ExportCheckError, match=r"int8 refused: exit_1 agrees with fp32 on"):
        export_onnx("hapt", trained, tmp_path, _narrow_calibration(), quantize="int8",
                    tiers=[1], int8=Int8Policy(on_failure="refuse"))
    assert not (tmp_path / "manifest.json").exists()


def test_loose_bounds_ship_every_int8_graph_even_badly_calibrated(tmp_path, trained):
    m = export_onnx("hapt", trained, tmp_path, _narrow_calibration(16), quantize="int8",
                    tiers=[1], int8=Int8Policy(min_agreement=0.0, max_drop=1.0))
    assert m["quantization"]["kept_fp32"] == [] and m["precisions"] == ["fp32", "int8"]
    assert {f["file"] for f in m["files"] if f["precision"] == "int8"} == {
        "exit_1.int8.onnx", "segment_1.int8.onnx"}


def test_cli_prints_each_int8_verdict(tmp_path, trained):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tensorfile.save(run_dir / "checkpoint.hmf", {f"global.{k}": v for k, v in trained.items()},
                    {"format": "hmf-checkpoint/1", "model": "hapt", "round": 1})
    res = CliRunner().invoke(hmf, ["export", "onnx", "--checkpoint", str(run_dir), "--out",
                                   str(tmp_path / "o"), "--quantize", "int8", "--tiers", "1",
                                   "--calibration-samples", "32", "--eval-samples", "64",
                                   "--int8-scheme", "u8u8", "--int8-min-agreement", "0",
                                   "--int8-max-drop", "1"])
    assert res.exit_code == 0, res.output
    q = json.loads((tmp_path / "o" / "manifest.json").read_text())["quantization"]
    assert q["method"]["scheme"] == "u8u8" and "int8 (u8u8), measured on" in res.output
    for name in ("exit_1", "segment_1"):
        v = q["graphs"][name]
        assert (f"{name:<10} accuracy {v['accuracy_fp32']:.4f} -> {v['accuracy_int8']:.4f}, "
                f"agrees with fp32 on {v['agreement_with_fp32']:.1%}: ships") in res.output


def test_the_check_fails_on_graphs_that_disagree_with_torch(exported, windows):
    out, m, _ = exported
    other = perturbed_state("hapt", seed=1)  # not the weights that were exported
    samples = export_data("hapt", None, calibration=8, evaluation=16).evaluation
    with pytest.raises(ExportCheckError, match="exit 1"):
        check_fp32("hapt", other, out, [f for f in m["files"] if f["precision"] == "fp32"],
                   samples)


def test_image_model_without_data_subset_of_tiers(tmp_path):
    """mnist (an image model), tiers 1 and 2 only, int8 calibrated on synthetic inputs: accuracy
    is n/a and says why; the preprocessing is the image normalisation."""
    from export.data import export_data as data_for

    state = perturbed_state("mnist")
    m = export_onnx("mnist", state, tmp_path, data_for("mnist", None, calibration=16),
                    tiers=[1, 2], quantize="int8")
    assert m["tiers"] == [1, 2]
    assert sorted(f["file"] for f in m["files"] if f["precision"] == "fp32") == [
        "exit_1.onnx", "exit_2.onnx", "segment_1.onnx", "segment_2.onnx"]
    assert m["input"]["preprocessing"]["normalize"] == {"scale": 255.0, "mean": 0.5, "std": 0.5}
    assert m["quantization"]["accuracy"]["int8"] == {"1": "n/a", "2": "n/a"}
    assert "synthetic" in m["quantization"]["note"]
    x = np.random.default_rng(3).standard_normal((5, 1, 28, 28)).astype(np.float32)
    ref = torch_logits("mnist", state, x)
    (got,) = run(tmp_path / "exit_2.onnx", x)
    assert np.abs(got - ref[1]).max() <= TOL


def test_cli_refuses_bad_arguments(tmp_path):
    runner = CliRunner()
    both = runner.invoke(hmf, ["export", "onnx", "--model", "hapt", "--checkpoint",
                               str(tmp_path), "--out", str(tmp_path / "o")])
    assert both.exit_code != 0 and "exactly one" in both.output
    tiers = runner.invoke(hmf, ["export", "onnx", "--model", "hapt", "--tiers", "0,4",
                                "--out", str(tmp_path / "o")])
    assert tiers.exit_code != 0 and "tiers" in tiers.output
    missing = runner.invoke(hmf, ["export", "onnx", "--checkpoint", str(tmp_path),
                                  "--out", str(tmp_path / "o")])
    assert missing.exit_code != 0 and "no checkpoint" in missing.output


def test_a_failing_check_leaves_no_manifest(tmp_path, monkeypatch):
    """If torch and the graphs disagree (here: the reference gets other weights), the export
    raises and writes no manifest.json, so no device can load the graphs."""
    import export.exporter as exporter

    other = perturbed_state("mnist", seed=1)
    real_tier_model = exporter.tier_model
    monkeypatch.setattr(exporter, "tier_model",
                        lambda name, state, tier: real_tier_model(name, other, tier))
    (tmp_path / "manifest.json").write_text("{}")  # a stale one from an earlier export
    with pytest.raises(ExportCheckError):
        export_onnx("mnist", perturbed_state("mnist"), tmp_path,
                    export_data("mnist", None, calibration=4), tiers=[1])
    assert not (tmp_path / "manifest.json").exists()


def test_onnx_checker_failures_are_export_check_errors(tmp_path):
    from onnx import TensorProto, helper

    from export.exporter import onnx_check

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])
    bad = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["nowhere"], ["y"])], "bad", [x], [y]))
    onnx.save(bad, str(tmp_path / "bad.onnx"))
    with pytest.raises(ExportCheckError, match="bad.onnx"):
        onnx_check(tmp_path / "bad.onnx")


def test_tolerance_scales_with_the_logits_so_large_trained_logits_pass(tmp_path, trained):
    """float32 rounding is relative: heads scaled 2000x give logits in the hundreds whose ORT
    vs torch gap exceeds 1e-4 from summation order alone. The check scales its tolerance with
    the largest logit, records it, and still refuses graphs of other weights at that scale."""
    big = {k: v * 2000 if k.startswith("heads.") else v for k, v in trained.items()}
    data = export_data("hapt", None, calibration=8, evaluation=64)
    m = export_onnx("hapt", big, tmp_path, data, tiers=[1, 2, 3])
    ref = torch_logits("hapt", big, data.evaluation.x)
    for k in (1, 2, 3):
        entry = m["check"]["exits"][str(k)]
        assert entry["tolerance"] == pytest.approx(TOL * np.abs(ref[k - 1]).max(), rel=1e-6)
        assert entry["tolerance"] > 100 * TOL
        assert entry["max_abs_diff_vs_torch"] <= entry["tolerance"]
    other = {k: v * 2000 if k.startswith("heads.") else v
             for k, v in perturbed_state("hapt", seed=1).items()}
    with pytest.raises(ExportCheckError, match="exit 1"):
        check_fp32("hapt", other, tmp_path, [f for f in m["files"] if f["precision"] == "fp32"],
                   data.evaluation)
