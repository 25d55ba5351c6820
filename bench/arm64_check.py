"""The serving path on aarch64, for real: Debian's arm64 Python and the aarch64 ONNX Runtime wheel
run `hmf-device profile`, `predict` and every exit graph under qemu-aarch64-static (user-mode
emulation: no board, no root, no binfmt_misc), on an export made on this x86-64 machine.

    .venv/bin/python bench/arm64_check.py          # rerun after any change to export or int8
    .venv/bin/python bench/arm64_check.py --cpus cortex-a72 --windows 100   # quicker

1. An arm64 root from Debian's packages (python3.11 and what it needs, `apt-get download` with a
   private apt configuration, unpacked with `dpkg-deb -x`), and the aarch64 wheels of
   requirements-device-serve.txt at the versions installed here (`pip install --target
   --platform manylinux_2_28_aarch64`). Both are cached under .cache/arm64 (git-ignored).
2. A HAPT model trained centrally on the UCI training volunteers (cached), exported afresh on
   every run with `hmf export onnx --quantize int8` (the current export code and int8 settings).
3. The same probe, here and under qemu for each emulated CPU (cortex-a72: Raspberry Pi 4, NEON
   only; cortex-a76: Pi 5, with the dot-product instructions that ONNX Runtime's int8 kernels
   use): the logits of every exit graph, fp32 and int8, on the UCI test volunteers' windows.
4. fp32 on ARM must match x86 within export/exporter.py's tolerance (1e-4, scaled by the logits'
   magnitude) with the same argmax; int8's agreement with fp32 is reported per exit for each CPU.

Writes bench/results/arm64_check.json and prints a table for docs/DEVICE.md; exits 1 if a fp32
check fails. Timings under emulation mean nothing and are not reported.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "arm64"
RESULT = ROOT / "bench" / "results" / "arm64_check.json"
QEMU = "qemu-aarch64-static"
PACKAGES = ["python3.11", "libstdc++6", "libgcc-s1"]  # onnxruntime is C++
DEBIAN = [("http://deb.debian.org/debian", "bookworm"),
          ("http://deb.debian.org/debian", "bookworm-updates"),
          ("http://deb.debian.org/debian-security", "bookworm-security")]
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
WHEEL_PLATFORM = ["--platform", "manylinux_2_28_aarch64", "--python-version", "3.11",
                  "--implementation", "cp", "--abi", "cp311", "--only-binary=:all:"]
HWCAP_ASIMDDP, HWCAP2_I8MM = 1 << 20, 1 << 13  # Linux arm64 hwcap bits: dot product, int8 matmul
# What a board's kernel shows in /proc/cpuinfo for each emulated core (MIDR fields, features).
# qemu 7.2 passes this machine's x86 /proc/cpuinfo through, on which ONNX Runtime's CPU detection
# (pytorch/cpuinfo) dereferences NULL while importing; qemu -L serves ROOT/proc/cpuinfo instead.
CORES = {
    "cortex-a72": ("0x0", "0xd08", "3", "fp asimd evtstrm crc32 cpuid"),  # Raspberry Pi 4
    "cortex-a76": ("0x4", "0xd0b", "1", "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics "
                   "fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"),  # Raspberry Pi 5
    "neoverse-n1": ("0x3", "0xd0c", "1", "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics "
                    "fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs"),
}
GENERIC_CORE = ("0x1", "0xd07", "1", "fp asimd evtstrm crc32 cpuid")  # Cortex-A57, for others


def log(msg: str) -> None:
    print(f"[arm64_check] {msg}", flush=True)


def sh(cmd: list[Any], **kw: Any) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if res.returncode != 0:
        raise SystemExit(f"failed: {' '.join(map(str, cmd))}\n{res.stdout[-3000:]}\n"
                         f"{res.stderr[-3000:]}")
    return res


def digest(*parts: str | bytes) -> str:
    return hashlib.sha256(b"\0".join(p if isinstance(p, bytes) else p.encode()
                                     for p in parts)).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# The probe: runs here and under qemu, with only the device's packages (numpy, onnxruntime)


def hwcaps() -> dict[str, Any]:
    """What the (emulated) CPU offers ONNX Runtime, from the process's auxiliary vector."""
    if platform.machine() != "aarch64":
        return {}
    words = np.frombuffer(Path("/proc/self/auxv").read_bytes(), dtype=np.uint64).reshape(-1, 2)
    aux = {int(k): int(v) for k, v in words}
    return {"dotprod": bool(aux.get(16, 0) & HWCAP_ASIMDDP),
            "i8mm": bool(aux.get(26, 0) & HWCAP2_I8MM)}


def probe(model_dir: Path, windows: Path, out: Path, threads: int) -> None:
    """The logits of every exit graph at every precision, through the device runtime."""
    import onnxruntime

    from device.runtime import DeviceModel, Manifest

    x = np.load(windows)["x"]
    logits: dict[str, np.ndarray] = {}
    kept_fp32 = []  # int8 exits the export left in fp32: an int8 device runs fp32 there
    for precision in Manifest.load(model_dir).precisions:
        model = DeviceModel(model_dir, precision=precision, threads=threads)
        for k in model.exits:
            if model.precision_of("exit", k) != precision:
                kept_fp32.append(k)
                continue
            logits[f"{precision}/{k}"] = np.concatenate(
                [model.logits(x[i:i + 256], exit=k) for i in range(0, len(x), 256)])
    info = {"machine": platform.machine(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
            "int8_kept_fp32_by_export": kept_fp32, **hwcaps()}
    np.savez(out, info=json.dumps(info), **logits)


# ---------------------------------------------------------------------------------------------
# The arm64 root and its wheels


def _apt_options(apt: Path) -> list[str]:
    return [f"-oDir::Etc={apt}/etc", f"-oDir::State={apt}/state", f"-oDir::Cache={apt}/cache",
            f"-oDir::State::status={apt}/state/status", "-oAPT::Architecture=arm64",
            "-oAPT::Architectures::=arm64", "-oDebug::NoLocking=1", "-oAPT::Sandbox::User=root"]


def _apt_setup(apt: Path) -> list[str]:
    """A private apt configuration that knows only Debian's arm64 packages (the system's apt
    configuration and dpkg database are not touched)."""
    for d in ("etc/apt.conf.d", "etc/preferences.d", "etc/sources.list.d",
              "state/lists/partial", "cache/archives/partial"):
        (apt / d).mkdir(parents=True, exist_ok=True)
    (apt / "state" / "status").touch()
    (apt / "etc" / "sources.list").write_text("".join(
        f"deb [arch=arm64 signed-by={KEYRING}] {url} {suite} main\n" for url, suite in DEBIAN))
    opts = _apt_options(apt)
    sh(["apt-get", *opts, "update"])
    return opts


def _closure(opts: list[str]) -> list[str]:
    """PACKAGES and everything they depend on (recommends left out)."""
    out = sh(["apt-cache", *opts, "depends", "--recurse", "--no-recommends", "--no-suggests",
              "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances", *PACKAGES])
    return sorted({line for line in out.stdout.splitlines()
                   if line and not line.startswith((" ", "<"))})


def _relative_symlinks(root: Path) -> None:
    """Absolute links inside the root would point at this machine's files under qemu -L."""
    for link in root.rglob("*"):
        if link.is_symlink() and os.readlink(link).startswith("/"):
            target = root / os.readlink(link).lstrip("/")
            link.unlink()
            link.symlink_to(os.path.relpath(target, link.parent))


def write_cpuinfo(root: Path, cpu: str) -> None:
    """ROOT/proc/cpuinfo as the emulated core's kernel would write it, one entry per CPU that
    this machine's /sys lists (ONNX Runtime's detection reads both and matches them up)."""
    variant, part, revision, features = CORES.get(cpu, GENERIC_CORE)
    last = Path("/sys/devices/system/cpu/present").read_text().strip().split("-")[-1]
    entry = ("processor\t: {}\nBogoMIPS\t: 108.00\nFeatures\t: " + features +
             "\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: " + variant +
             "\nCPU part\t: " + part + "\nCPU revision\t: " + revision + "\n\n")
    (root / "proc").mkdir(exist_ok=True)
    tmp = root / "proc" / f".cpuinfo.{os.getpid()}"
    tmp.write_text("".join(entry.format(i) for i in range(int(last) + 1)))
    tmp.replace(root / "proc" / "cpuinfo")  # atomic: another check may be starting a guest


def ensure_root(cache: Path) -> Path:
    root, stamp = cache / "root", cache / "root.stamp"
    key = digest(json.dumps([PACKAGES, DEBIAN]))
    if stamp.exists() and stamp.read_text() == key:
        return root
    log("building the arm64 root from Debian's packages")
    opts = _apt_setup(cache / "apt")
    debs = cache / "debs"
    shutil.rmtree(debs, ignore_errors=True)
    debs.mkdir(parents=True)
    sh(["apt-get", *opts, "download", *_closure(opts)], cwd=debs)
    shutil.rmtree(root, ignore_errors=True)
    for deb in sorted(debs.glob("*.deb")):
        sh(["dpkg-deb", "-x", deb, root])
    _relative_symlinks(root)
    stamp.write_text(key)
    return root


def host_pins() -> list[str]:
    """The device packages at the versions installed here: ARM's kernels against x86's, not one
    release against another."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("numpy", "onnxruntime", "click",
                                                    "paho-mqtt")]


def ensure_wheels(cache: Path) -> Path:
    site, stamp = cache / "site", cache / "site.stamp"
    reqs = ROOT / "requirements-device-serve.txt"
    pins = host_pins()
    key = digest(reqs.read_bytes(), *pins)
    if stamp.exists() and stamp.read_text() == key:
        return site
    log(f"installing the aarch64 wheels of {reqs.name} ({', '.join(pins)})")
    shutil.rmtree(site, ignore_errors=True)
    constraints = cache / "pins.txt"
    constraints.write_text("\n".join(pins) + "\n")
    sh([sys.executable, "-m", "pip", "install", "-q", "--target", site, *WHEEL_PLATFORM,
        "-r", reqs, "-c", constraints])
    stamp.write_text(key)
    return site


# ---------------------------------------------------------------------------------------------
# The model and its export (on this machine, with the dev environment)


def ensure_checkpoint(cache: Path, epochs: int) -> Path:
    """A HAPT model trained centrally on the UCI training volunteers: trained well enough that
    int8's agreement with fp32 says something (a 2-round federated run is near chance at exits
    2 and 3)."""
    run = cache / f"hapt-central-{epochs}ep"
    if (run / "checkpoint.hmf").exists():
        return run
    import torch

    from common import tensorfile
    from common.models import build_model
    from common.training import TrainConfig, train_local
    from export.data import hapt_split

    log(f"training a HAPT model for {epochs} epoch(s) on the UCI training volunteers")
    torch.manual_seed(0)
    (tx, ty), _ = hapt_split()
    model = build_model("hapt")
    train_local(model, torch.from_numpy(tx), torch.from_numpy(ty),
                TrainConfig(epochs=epochs, batch_size=64, lr=2e-3),
                torch.Generator().manual_seed(0))
    run.mkdir(parents=True, exist_ok=True)
    tensorfile.save(run / "checkpoint.hmf",
                    {f"global.{k}": v for k, v in model.state_dict().items()},
                    {"format": "hmf-checkpoint/1", "model": "hapt", "round": 0,
                     "strategy": f"central, {epochs} epoch(s) on all training windows"})
    return run


def export(checkpoint: Path, out: Path) -> str:
    """`hmf export onnx --quantize int8` as a user runs it; returns what it printed."""
    shutil.rmtree(out, ignore_errors=True)
    hmf = Path(sys.executable).parent / "hmf"
    res = sh([hmf, "export", "onnx", "--checkpoint", checkpoint, "--out", out,
              "--quantize", "int8"])
    return res.stdout + res.stderr


def test_windows(path: Path, n: int | None, cli_path: Path | None = None) -> np.ndarray:
    """``n`` windows of the UCI test volunteers drawn with a fixed seed (all for 0 or None),
    and the first 32 of them for the CLI runs. (bench/int8_isa.py uses it too.)"""
    from export.data import hapt_split

    _, (x, y) = hapt_split()
    if n and 0 < n < len(y):
        keep = np.sort(np.random.default_rng(0).choice(len(y), n, replace=False))
        x, y = x[keep], y[keep]
    np.savez(path, x=x, y=y)
    if cli_path is not None:
        np.savez(cli_path, x=x[:32], y=y[:32])
    return y


# ---------------------------------------------------------------------------------------------
# Running things under qemu


def guest(root: Path, site: Path, cpu: str, *args: Any, timeout: int = 3600
          ) -> subprocess.CompletedProcess:
    """Debian's arm64 Python under qemu with the aarch64 wheels and this checkout on its path."""
    write_cpuinfo(root, cpu)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": f"{site}:{ROOT}",
           "PYTHONNOUSERSITE": "1", "HOME": os.environ.get("HOME", "/tmp"), "LC_ALL": "C.UTF-8"}
    return sh([QEMU, "-cpu", cpu, "-L", root, root / "usr/bin/python3.11", *args], env=env,
              timeout=timeout, cwd=ROOT)


HMF_DEVICE = "import sys; from device.cli import hmf_device; hmf_device(prog_name='hmf-device')"
# Each start under qemu costs a minute of imports here: one predict per precision and mode.
PREDICTS = [("fp32", ["--exit", "3"]), ("int8", ["--threshold", "0.9"])]


def guest_cli(root: Path, site: Path, cpu: str, model_dir: Path, windows: Path
              ) -> dict[str, Any]:
    """`hmf-device profile` and `predict` (fp32 at exit 3, int8 in the cascade) under qemu."""
    prof = json.loads(guest(root, site, cpu, "-c", HMF_DEVICE, "profile", "--model-dir",
                            model_dir, "--runs", "3", "--json").stdout)
    preds = {}
    for precision, args in PREDICTS:
        out = guest(root, site, cpu, "-c", HMF_DEVICE, "predict", "--model-dir", model_dir,
                    "--input", windows, "--precision", precision, *args, "--json").stdout
        preds[f"{precision} {' '.join(args)}"] = json.loads(out)
    system = prof.get("system") or {}
    return {"profile_exits": [e["exit"] for e in prof["exits"]],
            "profile_system": {k: system.get(k) for k in ("cpu", "machine", "os")},
            "predict": preds}


def host_cli(model_dir: Path, windows: Path) -> dict[str, Any]:
    cli = Path(sys.executable).parent / "hmf-device"
    preds = {}
    for precision, args in PREDICTS:
        out = sh([cli, "predict", "--model-dir", model_dir, "--input", windows,
                  "--precision", precision, *args, "--json"]).stdout
        preds[f"{precision} {' '.join(args)}"] = json.loads(out)
    return preds


def run_probe(where: str, out: Path, model_dir: Path, windows: Path, threads: int,
              root: Path | None = None, site: Path | None = None) -> dict[str, np.ndarray]:
    args = [Path(__file__), "probe", "--model-dir", model_dir, "--windows", windows,
            "--out", out, "--threads", threads]
    if root is None:
        sh([sys.executable, *args], cwd=ROOT)
    else:
        assert site is not None
        guest(root, site, where, *args)
    with np.load(out) as z:
        return {k: z[k] for k in z.files}


# ---------------------------------------------------------------------------------------------
# Comparison


def _labels(pred: dict[str, Any]) -> list[int]:
    return [p.get("label") for p in pred["predictions"]]


def compare(x86: dict[str, np.ndarray], arm: dict[str, np.ndarray], y: np.ndarray
            ) -> dict[str, Any]:
    """Per exit: ARM's fp32 against x86's, and int8's agreement with fp32 on each."""
    from export.exporter import tolerance_for

    exits: dict[str, Any] = {}
    for key in sorted(k for k in x86 if k.startswith("fp32/")):
        k = key.split("/")[1]
        ref, got = x86[key], arm[key]
        tol = tolerance_for(ref)
        row = {"fp32_max_abs_diff_arm_vs_x86": float(np.abs(got - ref).max()),
               "tolerance": tol,
               "fp32_argmax_agreement_arm_vs_x86": float((got.argmax(1) == ref.argmax(1)).mean()),
               "fp32_accuracy": {"x86": float((ref.argmax(1) == y).mean()),
                                 "arm": float((got.argmax(1) == y).mean())}}
        row["fp32_passed"] = (row["fp32_max_abs_diff_arm_vs_x86"] <= tol
                              and row["fp32_argmax_agreement_arm_vs_x86"] == 1.0)
        q = f"int8/{k}"
        if q in x86 and q in arm:
            row["int8_agreement_with_fp32"] = {
                "x86": float((x86[q].argmax(1) == ref.argmax(1)).mean()),
                "arm": float((arm[q].argmax(1) == got.argmax(1)).mean())}
            row["int8_accuracy"] = {"x86": float((x86[q].argmax(1) == y).mean()),
                                    "arm": float((arm[q].argmax(1) == y).mean())}
            row["int8_argmax_agreement_arm_vs_x86"] = float(
                (arm[q].argmax(1) == x86[q].argmax(1)).mean())
            row["int8_max_abs_diff_arm_vs_x86"] = float(np.abs(arm[q] - x86[q]).max())
        else:
            row["int8"] = "not exported for this exit (the export kept it in fp32)"
        exits[k] = row
    return exits


def host_cpu() -> dict[str, Any]:
    text = Path("/proc/cpuinfo").read_text()
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines()
                  if ln.startswith("model name")), platform.processor())
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines()
                  if ln.startswith("flags")), [])
    return {"model": model, "avx2": "avx2" in flags,
            "vnni": bool({"avx512_vnni", "avx_vnni"} & set(flags))}


def table(result: dict[str, Any]) -> str:
    """The Markdown table for docs/DEVICE.md."""
    cpus = list(result["arm"])
    head = ["exit", "fp32: max \\|ARM - x86\\| (tolerance)", "fp32: same argmax",
            "int8 agrees with fp32: x86", *(f"int8 agrees: {c}" for c in cpus),
            "int8: max \\|ARM - x86\\|",
            "accuracy fp32 / int8 x86 / int8 " + " / ".join(cpus)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    first = result["arm"][cpus[0]]["exits"]
    for k in sorted(first, key=int):
        rows = [result["arm"][c]["exits"][k] for c in cpus]
        worst = max(r["fp32_max_abs_diff_arm_vs_x86"] for r in rows)
        same = min(r["fp32_argmax_agreement_arm_vs_x86"] for r in rows)
        row = [k, f"{worst:.1e} ({first[k]['tolerance']:.1e})", f"{same:.0%}"]
        accs = [first[k]["fp32_accuracy"]["x86"]]
        if "int8_agreement_with_fp32" in first[k]:
            row.append(f"{first[k]['int8_agreement_with_fp32']['x86']:.1%}")
            row += [f"{r['int8_agreement_with_fp32']['arm']:.1%}" for r in rows]
            row.append(f"{max(r['int8_max_abs_diff_arm_vs_x86'] for r in rows):.1e}")
            accs += [first[k]["int8_accuracy"]["x86"], *(r["int8_accuracy"]["arm"] for r in rows)]
        else:
            row += ["fp32 only"] * (2 + len(cpus))
        row.append(" / ".join(f"{a:.1%}" for a in accs))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def check(args: argparse.Namespace) -> int:
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    started = time.time()
    root, site = ensure_root(cache), ensure_wheels(cache)
    checkpoint = Path(args.checkpoint) if args.checkpoint else ensure_checkpoint(cache,
                                                                                 args.epochs)
    model_dir, windows, cli_windows = (cache / "export", cache / "windows.npz",
                                       cache / "cli_windows.npz")
    log(f"exporting {checkpoint} with int8")
    export_log = export(checkpoint, model_dir)
    y = test_windows(windows, args.windows, cli_windows)
    log(f"x86 reference on {len(y)} test windows")
    x86 = run_probe("x86", cache / "x86.npz", model_dir, windows, args.threads)
    x86_preds = host_cli(model_dir, cli_windows)
    result: dict[str, Any] = {
        "what": "hmf-device's serving path on aarch64 under qemu-aarch64-static (user-mode "
                "emulation) against this x86-64 machine: same export, same windows",
        "windows": {"count": len(y), "source": "HAPT, UCI test volunteers (export/data.py), "
                    "drawn with seed 0", "cli_predict": 32},
        "model": str(checkpoint.relative_to(ROOT) if checkpoint.is_relative_to(ROOT)
                     else checkpoint.name),
        "export_int8_summary": [ln.strip() for ln in export_log.splitlines()
                                if "agrees with fp32" in ln or ln.startswith("int8")],
        "x86": {"cpu": host_cpu(), **json.loads(str(x86.pop("info")))},
        "qemu": sh([QEMU, "--version"]).stdout.splitlines()[0],
        "arm": {}}
    failed = False
    for cpu in args.cpus.split(","):
        log(f"aarch64 ({cpu}) under qemu: the probe, then hmf-device profile and predict")
        arm = run_probe(cpu, cache / f"arm-{cpu}.npz", model_dir, windows, args.threads,
                        root, site)
        info = json.loads(str(arm.pop("info")))
        cli = guest_cli(root, site, cpu, model_dir, cli_windows)
        same = {name: _labels(pred) == _labels(x86_preds[name])
                for name, pred in cli.pop("predict").items()}
        exits = compare(x86, arm, y)
        failed |= not all(e["fp32_passed"] for e in exits.values())
        result["arm"][cpu] = {**info, **cli, "exits": exits,
                              "predict_labels_same_as_x86": same}
    result["fp32_passed"] = not failed
    result["table"] = table(result)
    result["seconds"] = round(time.time() - started)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(result["table"])
    log(f"wrote {RESULT.relative_to(ROOT)} ({result['seconds']} s); fp32 "
        f"{'passed' if not failed else 'FAILED'}")
    return 1 if failed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    p = sub.add_parser("probe", help="(internal) logits of every exit graph, here or in qemu")
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--windows", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cpus", default="cortex-a72,cortex-a76",
                    help=f"qemu CPU models, of {', '.join(CORES)} (cortex-a72: Pi 4; "
                         "cortex-a76: Pi 5)")
    ap.add_argument("--windows", type=int, default=300,
                    help="test windows, drawn with a fixed seed (0: all 2,502; emulation runs "
                         "about 2 windows a second for all six graphs here)")
    ap.add_argument("--checkpoint", default=None,
                    help="a run directory or checkpoint to export [default: a HAPT model "
                         "trained centrally, cached]")
    ap.add_argument("--epochs", type=int, default=2, help="of that central training")
    ap.add_argument("--threads", type=int, default=1,
                    help="ONNX Runtime threads, both sides (more only compete under emulation)")
    ap.add_argument("--cache", default=str(CACHE))
    ap.add_argument("--table", action="store_true",
                    help=f"print the table of {RESULT.relative_to(ROOT)} and stop")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(RESULT.read_text())))
        return 0
    if args.cmd != "probe" and (unknown := set(args.cpus.split(",")) - set(CORES)):
        ap.error(f"--cpus: unknown {', '.join(sorted(unknown))} (known: {', '.join(CORES)})")
    if args.cmd == "probe":
        probe(args.model_dir, args.windows, args.out, args.threads)
        return 0
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
