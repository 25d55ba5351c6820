"""How fast each exit runs on this device, and which tier fits a latency budget.

Latency on small boards depends on temperature and throttling (a Raspberry Pi 4 without a
heatsink halves its clock), so a profile records them before and after the runs, and reports
medians and tails (p95, p99) rather than a single run. ``deepest_tier_within`` is what
``hmf-device join --tier auto`` uses to choose the tier a device can afford.
"""

from __future__ import annotations

import gc
import math
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from common.cpu import cpu_name, int8_isa
from device.runtime import DeviceModel, Manifest, ManifestError

STATS = ("median_ms", "p95_ms", "p99_ms", "mean_ms")


# ---------------------------------------------------------------------------------------------
# The machine


def _read(path: str | Path) -> str | None:
    try:
        return Path(path).read_text().strip().rstrip("\x00")
    except OSError:
        return None


def temperatures() -> dict[str, float]:
    """Celsius per thermal zone where the kernel exposes them (Pi, Jetson, most laptops)."""
    temps = {}
    for zone in sorted(Path("/sys/class/thermal").glob("thermal_zone*")):
        raw, kind = _read(zone / "temp"), _read(zone / "type") or zone.name
        if raw and raw.lstrip("-").isdigit():
            temps[f"{zone.name}:{kind}"] = int(raw) / 1000.0
    return temps


_PI_FLAGS = {0: "under-voltage", 1: "frequency capped", 2: "throttled", 3: "soft temperature limit"}


def _pi_throttled() -> dict[str, Any] | None:
    """Raspberry Pi firmware's throttle bits (sysfs on recent kernels, else vcgencmd)."""
    raw = _read("/sys/devices/platform/soc/soc:firmware/get_throttled")
    if raw is None:
        try:
            out = subprocess.run(["vcgencmd", "get_throttled"], capture_output=True, text=True,
                                 timeout=2, check=True).stdout
            raw = out.strip().split("=")[-1]
        except (OSError, subprocess.SubprocessError):
            return None
    try:
        bits = int(raw, 16)
    except ValueError:
        return None
    return {"raw": hex(bits), "now": [f for b, f in _PI_FLAGS.items() if bits >> b & 1],
            "since_boot": [f for b, f in _PI_FLAGS.items() if bits >> (b + 16) & 1]}


def _cpufreq() -> dict[str, int] | None:
    """Current and maximum clock of CPU 0 in kHz: current well below max under load means
    throttling (or a power-saving governor)."""
    base = Path("/sys/devices/system/cpu/cpu0/cpufreq")
    cur, top = _read(base / "scaling_cur_freq"), _read(base / "cpuinfo_max_freq")
    if not (cur and top and cur.isdigit() and top.isdigit()):
        return None
    return {"cur_khz": int(cur), "max_khz": int(top), "governor": _read(base / "scaling_governor")}


def _throttle_count() -> int | None:
    """Intel's thermal-throttle event count, summed over cores."""
    counts = [_read(p) for p in
              Path("/sys/devices/system/cpu").glob("cpu*/thermal_throttle/core_throttle_count")]
    counts = [int(c) for c in counts if c and c.isdigit()]
    return sum(counts) if counts else None


def thermal_state() -> dict[str, Any]:
    """Temperatures and throttling as far as this system exposes them (None where it doesn't)."""
    return {"temperatures_c": temperatures() or None, "cpufreq": _cpufreq(),
            "pi_throttled": _pi_throttled(), "throttle_events": _throttle_count()}


def system_info() -> dict[str, Any]:
    return {"cpu": cpu_name(), "int8_isa": int8_isa(), "machine": platform.machine(),
            "cores": os.cpu_count(),
            "os": platform.platform(), "python": platform.python_version(),
            "onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
            "numpy": np.__version__}


# ---------------------------------------------------------------------------------------------
# Memory


def _status_kb(field: str) -> int | None:
    for line in (_read("/proc/self/status") or "").splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS mark of this process (Linux >= 4.0), so that the next
    ``peak_rss_mb`` is the peak of one exit's runs, not of everything before."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_mb() -> float | None:
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024


def peak_rss_mb() -> float:
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


# ---------------------------------------------------------------------------------------------
# Profiling


def summarize(times_s: list[float], batch: int) -> dict[str, float]:
    """Median, tails and throughput of repeated runs."""
    ms = np.asarray(times_s) * 1e3
    median = float(np.median(ms))
    return {"median_ms": median, "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()),
            "min_ms": float(ms.min()), "throughput_per_s": batch / (median / 1e3)}


def interleaved_schedule(exits: list[int], runs: int) -> list[int]:
    """The order in which the exits are timed: round after round, every exit once per round,
    each round starting one exit later than the one before. Drift (a board heating up, a
    governor changing the clock, a neighbour's load) then falls on every exit alike instead of
    on whichever was measured last, and no exit always runs right after the same one."""
    n = len(exits)
    return [exits[(r + i) % n] for r in range(runs) for i in range(n)]


def time_interleaved(fns: dict[int, Callable[[], Any]], runs: int, warmup: int,
                     clock: Callable[[], float] = time.perf_counter) -> dict[int, list[float]]:
    """Seconds per call of each ``fns[k]``, ``runs`` calls each in ``interleaved_schedule``
    order, after ``warmup`` untimed rounds."""
    order = interleaved_schedule(sorted(fns), runs)
    for k in order[:warmup * len(fns)]:
        fns[k]()
    times: dict[int, list[float]] = {k: [] for k in fns}
    for k in order:
        t = clock()
        fns[k]()
        times[k].append(clock() - t)
    return times


def _random_input(model: DeviceModel, batch: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((batch, *model.manifest.input_shape))
    return x.astype(np.float32)


def exit_memory(model: DeviceModel, k: int, *, batch: int, warmup: int) -> dict[str, Any]:
    """Memory of exit ``k`` alone: the process's peak RSS while its session is built and run
    ``warmup`` times (ONNX Runtime allocates its buffers on the first runs), and that peak
    minus the RSS before (what this exit's session costs). Every other session is closed."""
    model.close()
    gc.collect()
    exact = reset_peak_rss()
    before = rss_mb()
    sess = model.session("exit", k)
    feed = {sess.get_inputs()[0].name: _random_input(model, batch)}
    for _ in range(max(warmup, 1)):
        sess.run(None, feed)
    peak = peak_rss_mb()
    model.close()
    return {"peak_rss_mb": peak, "session_mb": None if before is None or not exact
            else peak - before}


def exit_latencies(model: DeviceModel, exits: list[int], *, runs: int, batch: int,
                   warmup: int) -> dict[int, list[float]]:
    """Seconds per run of each exit's graph on random input (its cost does not depend on the
    values), the exits interleaved (``interleaved_schedule``)."""
    x = _random_input(model, batch)
    fns = {}
    for k in exits:
        sess = model.session("exit", k)
        feed = {sess.get_inputs()[0].name: x}
        fns[k] = lambda sess=sess, feed=feed: sess.run(None, feed)
    return time_interleaved(fns, runs, warmup)


def profile(model_dir: str | Path, *, runs: int = 100, batch: int = 1,
            threads: int | None = None, precision: str = "fp32", warmup: int = 3,
            exits: list[int] | None = None, providers: list[str] | None = None
            ) -> dict[str, Any]:
    """Per exit: median/p95/p99 latency over ``runs`` interleaved runs, throughput and peak
    memory, with the machine, ONNX Runtime's version and the thermal state before and after."""
    if runs < 1 or batch < 1 or warmup < 0:
        raise ValueError("runs and batch must be at least 1, warmup at least 0")
    if precision == "auto":
        return profile_auto(model_dir, runs=runs, batch=batch, threads=threads, warmup=warmup,
                            exits=exits, providers=providers)
    model = DeviceModel(model_dir, precision=precision, threads=threads, providers=providers)
    exits = sorted(exits or model.exits)
    if not exits:  # e.g. every int8 exit left out by the export: nothing to time
        raise ManifestError(f"{model_dir} has no {precision} exit graphs to profile (has "
                            f"{model.manifest.precisions}); try another --precision")
    before = thermal_state()
    memory = {k: exit_memory(model, k, batch=batch, warmup=warmup) for k in exits}
    times = exit_latencies(model, exits, runs=runs, batch=batch, warmup=warmup)
    model.close()
    rows = []
    for k in exits:
        entry = model.graph("exit", k)
        rows.append({"exit": k, "precision": entry["precision"], **summarize(times[k], batch),
                     "runs": runs, "macs": entry.get("macs"), "params": entry.get("params"),
                     **memory[k]})
    return {"model": model.manifest.model, "model_dir": str(Path(model_dir).resolve()),
            "precision": precision, "batch": batch, "threads": threads, "runs": runs,
            "timing": "interleaved: every exit once per round, rounds rotated",
            "providers": model.providers,
            "system": system_info(), "thermal_before": before, "thermal_after": thermal_state(),
            "exits": rows}


def profile_auto(model_dir: str | Path, *, exits: list[int] | None = None, **kw: Any
                 ) -> dict[str, Any]:
    """``profile`` with each exit at the precision that suits this board: int8 where this CPU's
    int8 kernels agree with fp32 on the export's calibration windows (device/precision.py) and
    int8 is faster (p95) than fp32 here, else fp32. Both precisions are timed; each row says
    which was chosen and why, with the other's latency."""
    from device.precision import choose_precisions, unchecked_reason

    manifest = Manifest.load(model_dir, verify=False)
    if "int8" not in manifest.precisions:
        return _as_auto(profile(model_dir, precision="fp32", exits=exits, **kw),
                        "no int8 graphs in this export")
    reason = unchecked_reason(manifest)
    if reason:  # e.g. a model served over MQTT at int8: run what is there, say it is unchecked
        return _as_auto(profile(model_dir, precision="int8", exits=exits, **kw),
                        f"int8 not checked against fp32 here: {reason}")
    fp32 = profile(model_dir, precision="fp32", exits=exits, **kw)
    verdicts = {v.exit: v for v in choose_precisions(model_dir, threads=kw.get("threads"),
                                                     providers=kw.get("providers"))}
    int8 = {row["exit"]: row for row in profile(model_dir, precision="int8", exits=exits,
                                                **kw)["exits"]}
    rows = []
    for row in fp32["exits"]:
        k, v = row["exit"], verdicts[row["exit"]]
        q = int8[k]
        faster = q["precision"] == "int8" and q["p95_ms"] < row["p95_ms"]
        use_int8 = v.precision == "int8" and faster
        why = v.why if v.precision != "int8" or faster else (
            f"{v.why}, but int8 is not faster here (p95 {q['p95_ms']:.3f} ms against "
            f"{row['p95_ms']:.3f} ms)")
        chosen = q if use_int8 else row
        rows.append({**chosen, "int8_agreement": v.agreement, "why": why,
                     "latency_by_precision": {"fp32": _latency(row), "int8": _latency(q)}})
    return {**fp32, "precision": "auto", "exits": rows}


def _as_auto(report: dict[str, Any], why: str) -> dict[str, Any]:
    for row in report["exits"]:
        row["why"] = why
    return {**report, "precision": "auto"}


def _latency(row: dict[str, Any]) -> dict[str, float]:
    return {k: row[k] for k in ("median_ms", "p95_ms")}


def check_budget(budget_ms: float) -> float:
    """A latency budget must be a positive, finite number of milliseconds."""
    if not (isinstance(budget_ms, (int, float)) and math.isfinite(budget_ms) and budget_ms > 0):
        raise ValueError(f"the latency budget must be a positive number of milliseconds "
                         f"(got {budget_ms})")
    return float(budget_ms)


def tier_within(report: dict[str, Any], budget_ms: float, stat: str = "p95_ms") -> int:
    """The deepest tier k whose exits 1..k ALL have their ``stat`` latency within
    ``budget_ms``; 0 if exit 1 does not. Exits are taken in order and the first one over budget
    ends the search: a deeper exit that happens to measure faster than a shallower one (noise:
    exit k+1 computes everything exit k does, and more) never raises the tier."""
    if stat not in STATS:
        raise ValueError(f"stat must be one of {', '.join(STATS)}")
    check_budget(budget_ms)
    tier = 0
    for row in sorted(report["exits"], key=lambda r: r["exit"]):
        if not row[stat] <= budget_ms:
            break
        tier = row["exit"]
    return tier


def deepest_tier_within(model_dir: str | Path, budget_ms: float, *, runs: int = 100,
                        batch: int = 1, threads: int | None = None, precision: str = "fp32",
                        stat: str = "p95_ms", report: dict[str, Any] | None = None) -> int:
    """The deepest tier whose exits all answer within ``budget_ms`` on this device
    (``tier_within``; by p95 latency by default, so that the budget holds for nearly every
    call); 0 if none does.

    Profiles ``model_dir`` unless a ``report`` of ``profile`` is given.
    """
    check_budget(budget_ms)
    if report is None:
        report = profile(model_dir, runs=runs, batch=batch, threads=threads,
                         precision=precision)
    return tier_within(report, budget_ms, stat)
