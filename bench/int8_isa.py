"""int8 per instruction set: which quantisation scheme keeps fp32's answers on which CPU, and
how much faster int8 runs here.

    .venv/bin/python bench/int8_isa.py                       # every target, 300 test windows
    .venv/bin/python bench/int8_isa.py --targets native,x86-avx2 --windows 200

ONNX Runtime picks its int8 kernels by CPU: VNNI on recent x86, AVX2's saturating
``vpmaddubsw`` on x86 without VNNI, NEON or the dot-product instructions on ARM. One machine has
one of them, so the others are emulated with qemu in user mode (``-cpu`` picks what CPUID or the
ARM hwcaps report, and ONNX Runtime dispatches on that):

* ``native``: this machine (its CPU is named in the output);
* ``x86-avx2``: ``qemu-x86_64 -cpu Haswell-noTSX`` (AVX2, no AVX-512, no VNNI), running this
  checkout's virtual environment;
* ``arm-a72`` / ``arm-a76``: ``qemu-aarch64 -cpu cortex-a72`` (Raspberry Pi 4: NEON only) and
  ``cortex-a76`` (Pi 5: with dot product), running Debian's arm64 Python with the aarch64 ONNX
  Runtime wheel (the root that bench/arm64_check.py builds and caches).

For every scheme of export/quantize.py the int8 exit graphs of one HAPT model (trained
centrally on the UCI training volunteers, cached by bench/arm64_check.py) are run on the test
volunteers' windows on every target; agreement with fp32 (on the same target) and accuracy are
reported per exit. Emulated timings mean nothing: speed (median latency at batch 1 and 64,
fp32 and each scheme interleaved run by run) is measured natively only.

Writes bench/results/int8_isa.json and prints a table for docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
CACHE = ROOT / ".cache" / "int8_isa"
RESULT = ROOT / "bench" / "results" / "int8_isa.json"
TARGETS = {"native": None, "x86-avx2": "Haswell-noTSX", "arm-a72": "cortex-a72",
           "arm-a76": "cortex-a76"}
EXITS = (1, 2, 3)


def log(msg: str) -> None:
    print(f"[int8_isa] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# The probe: runs on every target with numpy and onnxruntime alone


def _labels(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + 64]})[0].argmax(1)
                           for i in range(0, len(x), 64)])


def probe(graphs: Path, windows: Path, out: Path) -> None:
    """Labels of every graph under ``graphs`` (``<scheme>/exit_k.onnx``) on the windows."""
    x = np.load(windows)["x"]
    labels = {f"{p.parent.name}/{p.stem}": _labels(p, x) for p in sorted(graphs.glob("*/*.onnx"))}
    np.savez(out, **labels)


# ---------------------------------------------------------------------------------------------
# Graphs (on this machine, with the dev environment)


def make_graphs(checkpoint: Path, out: Path, calibration: int) -> list[str]:
    """fp32 exit graphs under ``out/fp32`` and each scheme's int8 ones under ``out/<scheme>``,
    calibrated as the export calibrates them."""
    from export.data import export_data
    from export.exporter import export_onnx, load_global_state
    from export.quantize import SCHEMES, quantize_int8

    state, _, _ = load_global_state(checkpoint)
    data = export_data("hapt", None, calibration=calibration, evaluation=64)
    export_onnx("hapt", state, out / "fp32", data, tiers=EXITS)
    for name in SCHEMES:
        (out / name).mkdir(parents=True, exist_ok=True)
        for k in EXITS:
            quantize_int8(out / "fp32" / f"exit_{k}.onnx", out / name / f"exit_{k}.onnx",
                          "input", data.calibration.x, name)
    for extra in ("manifest.json", "calibration.npz", *[f"segment_{k}.onnx" for k in EXITS]):
        (out / "fp32" / extra).unlink(missing_ok=True)
    return list(SCHEMES)


def run_target(target: str, graphs: Path, windows: Path, out: Path) -> dict[str, np.ndarray]:
    args = [Path(__file__), "probe", "--graphs", graphs, "--windows", windows, "--out", out]
    cpu = TARGETS[target]
    t = time.perf_counter()
    if target.startswith("arm"):
        from arm64_check import CACHE as ARM_CACHE
        from arm64_check import ensure_root, ensure_wheels, guest

        guest(ensure_root(ARM_CACHE), ensure_wheels(ARM_CACHE), cpu, *args, timeout=6 * 3600)
    else:
        qemu = [] if cpu is None else ["qemu-x86_64-static", "-cpu", cpu]
        res = subprocess.run([*qemu, sys.executable, *map(str, args)], capture_output=True,
                             text=True, cwd=ROOT)
        if res.returncode != 0:
            raise SystemExit(f"{target} failed:\n{res.stderr[-3000:]}")
    log(f"{target}: {time.perf_counter() - t:.0f} s")
    with np.load(out) as z:
        return {k: z[k] for k in z.files}


def agreement(labels: dict[str, np.ndarray], y: np.ndarray, schemes: list[str]
              ) -> dict[str, Any]:
    """Per scheme and exit: int8's agreement with fp32 on the same target, both accuracies."""
    rows: dict[str, Any] = {}
    for s in schemes:
        rows[s] = {}
        for k in EXITS:
            ref, got = labels[f"fp32/exit_{k}"], labels[f"{s}/exit_{k}"]
            rows[s][str(k)] = {"agreement": float((got == ref).mean()),
                               "accuracy_fp32": float((ref == y).mean()),
                               "accuracy_int8": float((got == y).mean())}
    return rows


# ---------------------------------------------------------------------------------------------
# Speed, natively


def speed(graphs: Path, schemes: list[str], runs: int, batches: tuple[int, ...] = (1, 64)
          ) -> dict[str, Any]:
    """Median latency per exit and batch, fp32 and every scheme interleaved run by run, so that
    drift on a shared machine hits them alike; ratios fp32 / int8 from the same runs."""
    import onnxruntime as ort

    from device.runtime import session_options

    result: dict[str, Any] = {}
    for batch in batches:
        x = np.random.default_rng(0).standard_normal((batch, 3, 151)).astype(np.float32)
        for k in EXITS:
            names = ["fp32", *schemes]
            sess = {n: ort.InferenceSession(str(graphs / n / f"exit_{k}.onnx"),
                                            session_options(1), providers=["CPUExecutionProvider"])
                    for n in names}
            times: dict[str, list[float]] = {n: [] for n in names}
            for i in range(runs + 3):
                for n in names:
                    t = time.perf_counter()
                    sess[n].run(None, {"input": x})
                    if i >= 3:
                        times[n].append(time.perf_counter() - t)
            med = {n: float(np.median(v)) * 1e3 for n, v in times.items()}
            result[f"exit {k}, batch {batch}"] = {
                "median_ms": med, "speedup": {s: med["fp32"] / med[s] for s in schemes}}
    return result


# ---------------------------------------------------------------------------------------------
# Report


def table(result: dict[str, Any]) -> str:
    lines = ["| target | scheme | agreement with fp32, exit 1 / 2 / 3 | accuracy fp32 -> int8, "
             "exit 3 |", "|---|---|---|---|"]
    for target, rows in result["agreement"].items():
        for s, r in rows.items():
            agree = " / ".join(f"{100 * r[k]['agreement']:.1f}" for k in ("1", "2", "3"))
            acc = f"{100 * r['3']['accuracy_fp32']:.1f} -> {100 * r['3']['accuracy_int8']:.1f}"
            lines.append(f"| {target} | {s} | {agree} | {acc} |")
    lines += ["", f"Speed on {result['native_cpu']['cpu']} ({result['native_cpu']['int8_isa']}), "
              "1 thread, median of interleaved runs, fp32 ms and fp32/int8 speed-up:", "",
              "| exit, batch | fp32 ms | " + " | ".join(result["schemes"]) + " |",
              "|---|---|" + "---|" * len(result["schemes"])]
    for key, r in result["speed"].items():
        ups = " | ".join(f"{r['speedup'][s]:.2f}x" for s in result["schemes"])
        lines.append(f"| {key} | {r['median_ms']['fp32']:.3f} | {ups} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    pr = sub.add_parser("probe")
    pr.add_argument("--graphs", type=Path, required=True)
    pr.add_argument("--windows", type=Path, required=True)
    pr.add_argument("--out", type=Path, required=True)
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--windows", type=int, default=300, help="UCI test windows per target")
    ap.add_argument("--epochs", type=int, default=2, help="of the centrally trained model")
    ap.add_argument("--calibration", type=int, default=256)
    ap.add_argument("--runs", type=int, default=100, help="timed runs per graph (native)")
    ap.add_argument("--out", type=Path, default=RESULT)
    args = ap.parse_args()
    if args.cmd == "probe":
        probe(args.graphs, args.windows, args.out)
        return 0
    from arm64_check import CACHE as ARM_CACHE
    from arm64_check import ensure_checkpoint, test_windows

    from common import cpu

    CACHE.mkdir(parents=True, exist_ok=True)
    checkpoint = ensure_checkpoint(ARM_CACHE, args.epochs)
    graphs = CACHE / "graphs"
    schemes = make_graphs(checkpoint, graphs, args.calibration)
    windows = CACHE / "windows.npz"
    y = test_windows(windows, args.windows)
    result: dict[str, Any] = {
        "model": f"hapt, trained centrally for {args.epochs} epoch(s) on the UCI training "
                 "volunteers", "windows": int(len(y)), "schemes": schemes,
        "native_cpu": cpu.describe(), "python": platform.python_version(), "agreement": {},
        "emulation": {t: TARGETS[t] for t in TARGETS if TARGETS[t]}}
    for target in args.targets.split(","):
        labels = run_target(target, graphs, windows, CACHE / f"labels-{target}.npz")
        result["agreement"][target] = agreement(labels, y, schemes)
    result["speed"] = speed(graphs, schemes, args.runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
