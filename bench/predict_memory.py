"""Peak memory of ``hmf-device predict`` against the size of its input file (issue 18).

A board with 1-2 GB must classify a file of any length: predict reads the samples a batch at a
time and runs bounded batches, so its peak resident memory should not grow with the file. This
makes ``.npz`` files (``np.savez``, as a user would write them) of 2,502, 10,008 and 40,032
HAPT windows (the shipped windows, repeated as needed), runs ``hmf-device predict --json`` on
each in a fresh process, exit mode (the deepest exit) and cascade mode, and reports that
process's peak RSS (``VmHWM``, read by the process itself as it exits: Linux) as the median of
``--repeats`` runs, with the wall time.

    .venv/bin/python bench/predict_memory.py                      # ~2 min on 2 busy cores
    git archive fd58781 | tar -x -C /tmp/hmf-old                  # the code before the change
    .venv/bin/python bench/predict_memory.py --sizes 2502,10008 --code /tmp/hmf-old \\
        --label before                                            # added to the same JSON

``--code DIR`` runs the device code of another checkout, e.g. the commit before this change,
which ran the whole file as one batch; ``--label`` names the result in the JSON, which keeps the
results of other labels. The model: ``--model-dir`` (an ``hmf export onnx`` directory), by
default an untrained hapt export made here (memory does not depend on the weights).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.cpu import cpu_name  # noqa: E402
from common.data import load_dataset  # noqa: E402

SIZES = (2502, 10008, 40032)
MODES = {"exit": [], "cascade": ["--threshold", "0.9"]}


def make_input(n: int, out: Path) -> Path:
    """``n`` HAPT windows (the shipped ones, repeated) and their labels, as ``np.savez``."""
    data = load_dataset("hapt")
    idx = np.arange(n) % len(data.x)
    path = out / f"windows_{n}.npz"
    if not path.exists():
        np.savez(path, x=data.x[idx], y=data.y[idx].astype(np.int64))
    return path


def export_model(out: Path) -> Path:
    d = out / "hapt_onnx"
    if not (d / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "cloud.cli", "export", "onnx", "--model", "hapt",
                        "--out", str(d)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return d


# Runs the device CLI and, when it exits (click always ends in sys.exit), writes the process's
# peak RSS (VmHWM) to the file named by HMF_PEAK_FILE. Measured inside the child on purpose:
# the rusage of a child (os.wait4, RUSAGE_CHILDREN) also counts the memory of the parent it was
# forked from until its exec, i.e. this benchmark's own.
_CHILD = """
import atexit, os, sys
def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            open(os.environ["HMF_PEAK_FILE"], "w").write(line.split()[1])
atexit.register(peak)
from device.cli import hmf_device
sys.argv[0] = "hmf-device"
hmf_device()
"""


def run_predict(code: Path, model_dir: Path, path: Path, mode: list[str]
                ) -> tuple[float, float, int]:
    """(peak RSS in MiB, wall seconds, exit status) of one ``predict`` process."""
    with tempfile.TemporaryDirectory() as tmp:
        peak_file = Path(tmp) / "peak"
        env = {**os.environ, "PYTHONPATH": str(code), "HMF_PEAK_FILE": str(peak_file)}
        cmd = [sys.executable, "-c", _CHILD, "predict", "--model-dir", str(model_dir),
               "--input", str(path), "--json", "--threads", "1", *mode]
        start = time.perf_counter()
        done = subprocess.run(cmd, cwd=code, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            sys.stderr.write(done.stderr.decode(errors="replace")[-2000:])
        return int(peak_file.read_text()) / 1024, wall, done.returncode  # VmHWM is in KiB


def measure(code: Path, model_dir: Path, inputs: dict[int, Path], repeats: int
            ) -> list[dict[str, Any]]:
    rows = []
    for mode, args in MODES.items():
        for n, path in inputs.items():
            runs = [run_predict(code, model_dir, path, args) for _ in range(repeats)]
            peaks, walls = [r[0] for r in runs], [r[1] for r in runs]
            row = {"mode": mode, "windows": n, "file_mb": path.stat().st_size / 2**20,
                   "peak_rss_mb": statistics.median(peaks), "peak_rss_mb_runs": peaks,
                   "wall_s": statistics.median(walls), "exit_status": [r[2] for r in runs]}
            rows.append(row)
            print(f"{mode:>8} {n:>7} windows ({row['file_mb']:6.1f} MB file): peak RSS "
                  f"{row['peak_rss_mb']:7.1f} MiB (median of {repeats}: "
                  f"{', '.join(f'{p:.0f}' for p in peaks)}), {row['wall_s']:.1f} s", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--code", type=Path, default=ROOT, help="checkout whose device code runs")
    ap.add_argument("--label", default="after", help="name of this result in --out")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "hmf-predmem")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" /
                    "predict_memory.json")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    model_dir = args.model_dir or export_model(args.workdir)
    inputs = {n: make_input(n, args.workdir) for n in map(int, args.sizes.split(","))}
    print(f"hmf-device predict ({args.label}: {args.code}), model {model_dir}, 1 thread")
    rows = measure(args.code.resolve(), model_dir, inputs, args.repeats)
    code = "this checkout" if args.code.resolve() == ROOT else str(args.code)
    save(args.out, args.label, {"code": code, "rows": rows})


def save(out: Path, label: str, result: dict[str, Any]) -> None:
    """Adds ``result`` under ``label`` to ``out``, keeping the other labels' results (the code
    before a change and after it, measured by separate runs of this script)."""
    report = json.loads(out.read_text()) if out.exists() else {}
    report.update({
        "what": "peak RSS of one hmf-device predict --json process per input file (np.savez "
                "of HAPT windows), median of repeats (VmHWM of that process as it exits)",
        "model": "hapt (untrained: memory does not depend on the weights), 1 thread",
        "environment": {"cpu": cpu_name(), "machine": platform.machine(),
                        "cores": os.cpu_count(), "python": platform.python_version(),
                        "numpy": np.__version__}})
    report.setdefault("results", {})[label] = result
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out} ({label})")


if __name__ == "__main__":
    main()
