"""Server time per round (hypernetwork + aggregation) and peak memory against the number of
participants, on synthetic updates of the real models.

Each configuration (model, strategy, path, participants) runs in a fresh single-threaded child
process, so one run's memory never shows in another's. Participants are split into tiers in
equal thirds (client c is tier c % 3 + 1); ``strategy.tasks`` decides who trains what (fedavg:
only the tier-3 third), and each update is the global model's tensors of that depth plus a small
random perturbation. Two paths, both the project's own code:

- ``stream``: what the MQTT cloud does (``cloud/server.py``): every verified update goes into
  ``StreamingAggregate.add`` as it arrives and is dropped; the round ends with ``finish``. Timed:
  the adds plus ``finish`` (not the making of the synthetic updates).
- ``sim``: what ``hmf simulate`` does: the round's updates as a list into ``strategy.aggregate``
  (then ``calibrate``, a no-op for these strategies). The list is held by design, so memory grows
  by one whole update per participant here.

``--strategies distill`` adds HypeMeFed's server-side ensemble distillation
(``cloud/distillation.py``), what ``hmf simulate --generate distill --untrained global`` runs:
HypeMeFed with ``generate="distill"`` (no hypernetworks) and ``untrained="global"``, plus a
``Distiller`` whose ``TeacherEnsemble`` sees every update (on ``stream`` inside
``StreamingAggregate.add``, as the MQTT cloud; on ``sim`` after ``aggregate``, as
``Simulation.distill``): one forward pass of the participant's own submodel over the proxy, its
deepest exit kept. After aggregation ``Distiller.apply`` fine-tunes the deep blocks and heads.
Rows report ``teacher_s`` (the ensemble's adds, summed over the round's updates) and
``finetune_s`` (``Distiller.apply``: frozen features once, then the steps) apart; ``server_s``
holds both plus the aggregation. Each ``--distill`` token ``PROXY:STEPS[:SIZES]`` is one
setting (``--distill-batch`` for all; ``SIZES`` limits its participants, else
``--distill-sizes``). hapt uses its shipped proxy (``load_proxy("hapt", size=PROXY)``); a model
without one (svhn, unimib, stl10) uses standard-normal inputs of its input shape, as the cost
does not depend on the values (``proxy_source`` says which). A round at 100 participants and
proxy 1024 runs 100 forward passes of 1,024 windows: minutes, so one round per configuration
fits the default ``--budget-s``.

Timings are the median of up to ``--repeat`` consecutive rounds (fewer once a configuration has
run ``--budget-s``). Peak memory is the child's VmHWM minus its RSS once the model, the strategy
and the noise are built (the high-water mark is reset there through /proc/self/clear_refs).
Rows carry the machine and, for hypemefed, the hypernetwork settings: each combination is its
own series, so ``--update`` can add runs of other code or hosts to one file.

    OMP_NUM_THREADS=1 .venv/bin/python bench/server_round.py \
        --json bench/results/server_round.json --update     # about 9 minutes on 2 CPUs
    OMP_NUM_THREADS=1 .venv/bin/python bench/server_round.py --quick   # under a minute
    OMP_NUM_THREADS=1 .venv/bin/python bench/server_round.py --models unimib \
        --strategies hypemefed --paths stream --sizes 1000 --hypemefed-sizes 1000 --repeat 1 \
        --json bench/results/server_round.json --update     # 6 min, peak about 12 GB
    # distillation, the issue-20 grid (hapt: shipped proxy; svhn, unimib: random proxy inputs);
    # add 1000 to --distill-sizes only with time to spare (about 10x the 100 row's teacher)
    OMP_NUM_THREADS=1 .venv/bin/python bench/server_round.py --models hapt,svhn,unimib \
        --strategies distill --paths stream --distill "256:50 1024:50 1024:200:10" \
        --distill-batch 64 --distill-sizes 10,100 --repeat 3 --budget-s 300 \
        --json bench/results/server_round.json --update
    # the hypernetworks' cost on the same model, to set beside it
    OMP_NUM_THREADS=1 .venv/bin/python bench/server_round.py --models hapt \
        --strategies hypemefed --paths stream --sizes 10,100 --hypemefed-sizes 10,100 \
        --json bench/results/server_round.json --update
    OMP_NUM_THREADS=1 .venv/bin/python bench/server_round.py --models hapt \
        --strategies distill --paths stream --distill 256:10:10 --repeat 1  # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NOISE_POOL = 4  # distinct perturbations per tensor, mixed with a per-update scale
NOISE_SCALE = 0.01  # of each tensor's RMS: "small"


# ---------------------------------------------------------------- memory of this process
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> bool:
    """Start VmHWM again from the current RSS; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------- synthetic updates
def noise_pool(global_state: dict[str, Any]) -> dict[str, list[Any]]:
    """A few perturbations per floating tensor, made once: making fresh random numbers for every
    update would cost more than aggregating it and dominate the run."""
    import torch

    gen = torch.Generator().manual_seed(0)
    pool = {}
    for name, t in global_state.items():
        if t.is_floating_point():
            rms = float(t.pow(2).mean().sqrt()) or 1e-3
            pool[name] = [NOISE_SCALE * rms * torch.randn(t.shape, generator=gen)
                          for _ in range(NOISE_POOL)]
    return pool


def synthetic_update(global_state: dict[str, Any], pool: dict[str, list[Any]], task: Any,
                     index: int) -> Any:
    """The global tensors of ``task``'s submodel, each perturbed: fresh tensors, as a decoded
    upload is, so keeping one keeps only its own bytes."""
    from cloud.strategies import ClientUpdate
    from common.models import tier_state

    scale = 0.5 + (index * 0.618034) % 1.0  # differs per update without new random numbers
    state = {}
    for name, t in tier_state(global_state, task.depth).items():
        noise = pool.get(name)
        state[name] = t + scale * noise[index % NOISE_POOL] if noise else t.clone()
    return ClientUpdate(task, num_samples=100 + index % 50, state=state, train_loss=1.0)


def state_bytes(state: dict[str, Any], names: set[str] | None = None) -> int:
    return sum(t.numel() * t.element_size() for k, t in state.items()
               if names is None or k in names)


# ---------------------------------------------------------------- one round, two paths
def timed_ensemble(distiller: Any, order: list[int]) -> tuple[Any, list[float]]:
    """The round's ``TeacherEnsemble``, its ``add`` timed into the returned one-item list."""
    ensemble, clock = distiller.ensemble(order), [0.0]
    add = ensemble.add

    def timed_add(update: Any, weight: float) -> None:
        start = time.perf_counter()
        add(update, weight)
        clock[0] += time.perf_counter() - start

    ensemble.add = timed_add
    return ensemble, clock


def distill_step(distiller: Any, state: dict[str, Any], ensemble: Any, clock: list[float],
                 server_round: int, metrics: dict[str, Any]) -> float:
    """``Distiller.apply`` after aggregation; its seconds, and the teacher's, into ``metrics``."""
    start = time.perf_counter()
    _, distilled = distiller.apply(state, ensemble, server_round)
    seconds = time.perf_counter() - start
    metrics.update(distilled, teacher_s=clock[0], finetune_s=seconds)
    return seconds


def stream_round(strategy: Any, global_state: dict[str, Any], pool: dict[str, list[Any]],
                 tasks: list[Any], server_round: int, distiller: Any = None
                 ) -> tuple[float, dict[str, Any]]:
    """The MQTT cloud's path: seconds of adds plus finish (plus the distillation step), and the
    strategy's metrics."""
    from cloud.streaming import StreamingAggregate

    order = [t.client for t in tasks]
    ensemble, clock = timed_ensemble(distiller, order) if distiller else (None, [0.0])
    agg = StreamingAggregate(strategy, global_state, order, ensemble=ensemble)
    seconds = 0.0
    for i, task in enumerate(tasks):
        update = synthetic_update(global_state, pool, task, i)
        start = time.perf_counter()
        agg.add(update)
        seconds += time.perf_counter() - start
        del update  # as the cloud drops the decoded upload
    start = time.perf_counter()
    state, metrics = agg.finish(server_round)
    seconds += time.perf_counter() - start
    if distiller is not None:
        seconds += distill_step(distiller, state, ensemble, clock, server_round, metrics)
    return seconds, metrics


def sim_round(strategy: Any, global_state: dict[str, Any], pool: dict[str, list[Any]],
              tasks: list[Any], server_round: int, distiller: Any = None
              ) -> tuple[float, dict[str, Any]]:
    """The simulator's path: the whole list into ``aggregate`` (then, distilling, the teacher's
    adds and ``Distiller.apply``), then ``calibrate``."""
    updates = [synthetic_update(global_state, pool, t, i) for i, t in enumerate(tasks)]
    start = time.perf_counter()
    state, metrics = strategy.aggregate(global_state, updates, server_round)
    if distiller is not None:
        ensemble, clock = timed_ensemble(distiller, [u.task.client for u in updates])
        for u in updates:
            ensemble.add(u, strategy.weight(u))
        distill_step(distiller, state, ensemble, clock, server_round, metrics)
    strategy.calibrate(state, iter(()))
    return time.perf_counter() - start, metrics


def build_distiller(cfg: dict[str, Any]) -> tuple[Any, str]:
    """``cfg["distill"]``'s ``Distiller`` and where its proxy came from: the shipped proxy of
    the model, or (none ships) standard-normal inputs of its shape, seeded."""
    import torch

    from cloud.distillation import SHIPPED_PROXY, DistillConfig, Distiller, load_proxy
    from common.models import SPECS

    d, model = cfg["distill"], cfg["model"]
    if model in SHIPPED_PROXY:
        proxy, source = load_proxy(model, size=d["proxy"], seed=0), "shipped"
    else:
        gen = torch.Generator().manual_seed(0)
        proxy = torch.randn((d["proxy"], *SPECS[model].input_shape), generator=gen)
        source = "random"
    settings = DistillConfig(steps=d["steps"], batch=d["batch"])
    return Distiller(model, proxy, settings, seed=0, device=cfg["device"]), source


def child(cfg: dict[str, Any]) -> dict[str, Any]:
    """One configuration, in this (fresh) process."""
    import torch

    from cloud.strategies import build_strategy
    from cloud.strategies.hypemefed import transitions
    from common.models import build_model, tier_state

    torch.set_num_threads(1)
    torch.manual_seed(0)
    global_state = {k: v.clone() for k, v in build_model(cfg["model"]).state_dict().items()}
    distiller, source, options = None, "", {}
    if cfg.get("distill"):
        distiller, source = build_distiller(cfg)
        options = {"generate": "distill", "untrained": "global"}
    strategy = build_strategy(cfg["strategy"], cfg["model"], device=cfg["device"], **options)
    tasks = strategy.tasks([(c, c % 3 + 1) for c in range(cfg["participants"])])
    pool = noise_pool(global_state)
    convs = {name for pair in transitions() for name in pair}
    update_bytes = [state_bytes(tier_state(global_state, t.depth)) for t in tasks]
    conv_bytes = [state_bytes(tier_state(global_state, t.depth), convs) for t in tasks]
    one_round = stream_round if cfg["path"] == "stream" else sim_round
    base_kib = _status_kib("VmRSS")
    resettable = reset_peak()

    seconds, hyper, metrics, began = [], [], {}, time.perf_counter()
    teacher, finetune = [], []
    for r in range(1, cfg["repeat"] + 1):
        s, metrics = one_round(strategy, global_state, pool, tasks, r, distiller)
        seconds.append(s)
        hyper.append(float(metrics.get("hypernet_s", 0.0)))
        if distiller is not None:
            teacher.append(metrics["teacher_s"])
            finetune.append(metrics["finetune_s"])
        if time.perf_counter() - began >= cfg["budget_s"]:
            break
    peak_kib = _status_kib("VmHWM")
    n_updates = max(len(tasks), 1)
    extra: dict[str, Any] = {}
    if distiller is not None:  # medians of each part (their sum need not be server_s's median)
        extra = {"proxy_source": source, "proxy_size": len(distiller.proxy),
                 "teacher_s": statistics.median(teacher), "teacher_s_runs": teacher,
                 "finetune_s": statistics.median(finetune), "finetune_s_runs": finetune,
                 "distill_kl": metrics.get("distill_kl")}
    return {**cfg, **extra, "updates": len(tasks), "rounds_run": len(seconds),
            "server_s": statistics.median(seconds), "server_s_runs": seconds,
            "hypernet_s": statistics.median(hyper),
            "hypernet_pairs": metrics.get("hypernet_pairs", {}),
            "baseline_mib": base_kib / 1024,
            "peak_growth_mib": (peak_kib - base_kib) / 1024 if resettable else None,
            "update_bytes_mean": sum(update_bytes) / n_updates,
            "conv_bytes_mean": sum(conv_bytes) / n_updates,
            "wall_s": time.perf_counter() - began, "machine": machine(cfg["device"]),
            "variant": variant(strategy, cfg.get("distill")),
            "loadavg_1min": os.getloadavg()[0]}  # the machine is shared: how busy it was


def variant(strategy: Any, distill: dict[str, Any] | None = None) -> str:
    """The hypernetwork (or distillation) settings a hypemefed row was measured with: rows of
    other settings (or of earlier code) are another series."""
    if strategy.name != "hypemefed":
        return ""
    if distill:
        return (f"generate distill, untrained {strategy.untrained}, proxy {distill['proxy']}, "
                f"steps {distill['steps']}, batch {distill['batch']}")
    parts = [strategy.hypernet, f"epochs {strategy.epochs}"]
    for name in ("sweeps", "ridge", "generate"):  # settings of the closed-form fit, if any
        if hasattr(strategy, name):
            parts.append(f"{name} {getattr(strategy, name)}")
    return ", ".join(parts)


def machine(device: str) -> str:
    """Rows from different hosts or accelerators never share a fit."""
    import torch

    gpu = f", {torch.cuda.get_device_name()}" if device.startswith("cuda") else ""
    return f"{os.cpu_count()} CPUs{gpu}"


def run_child(cfg: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], cwd=ROOT,
                         env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"child {cfg} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- analysis
def series(r: dict[str, Any]) -> tuple[str, str, str, str]:
    """What a line is fitted over: one model, strategy (and hypernetwork settings), path,
    machine."""
    name = f"{r['strategy']} ({r['variant']})" if r.get("variant") else r["strategy"]
    return r["model"], name, r["path"], r["machine"]


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope)."""
    n, mx, my = len(xs), sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if n > 1 else 0.0
    return my - slope * mx, slope


def analyse(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, strategy, path): the time slope, the 1000-vs-extrapolation check, and the
    memory growth per participant against one participant's conv weights."""
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(series(r), []).append(r)
    out = []
    for (model, strategy, path, where), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["participants"])
        if len(rs) < 2:
            continue  # one point fixes no line
        xs = [float(r["participants"]) for r in rs]
        intercept, slope = fit_line(xs, [r["server_s"] for r in rs])
        ups = sum(r["updates"] for r in rs) / sum(r["participants"] for r in rs)
        item: dict[str, Any] = {
            "model": model, "strategy": strategy, "path": path, "machine": where,
            "participants": [r["participants"] for r in rs], "intercept_s": intercept,
            "slope_ms_per_participant": slope * 1e3,
            "slope_ms_per_update": slope * 1e3 / ups if ups else None,
            "conv_bytes_per_participant": rs[-1]["conv_bytes_mean"] * ups,
            "update_bytes_per_participant": rs[-1]["update_bytes_mean"] * ups}
        by_n = {r["participants"]: r for r in rs}
        if {10, 100, 1000} <= by_n.keys():
            t10, t100, t1000 = (by_n[n]["server_s"] for n in (10, 100, 1000))
            predicted = t10 + (t100 - t10) * (1000 - 10) / (100 - 10)
            item.update(predicted_1000_s=predicted, measured_over_predicted=t1000 / predicted,
                        linear_within_20pct=abs(t1000 / predicted - 1) <= 0.2)
        mem = [r for r in rs if r["peak_growth_mib"] is not None]
        if len(mem) >= 2:
            lo, hi = mem[0], mem[-1]
            growth = ((hi["peak_growth_mib"] - lo["peak_growth_mib"]) * 2**20
                      / (hi["participants"] - lo["participants"]))
            item.update(memory_bytes_per_participant=growth,
                        memory_over_conv_bytes=growth / item["conv_bytes_per_participant"],
                        memory_over_update_bytes=growth / item["update_bytes_per_participant"])
        out.append(item)
    return out


# ---------------------------------------------------------------- reporting
def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| machine | model | strategy | path | participants | updates | server s (median) "
             "| hypernet s | teacher s + fine-tune s | rounds | peak growth MiB "
             "| conv MiB kept / participant |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (*series(r), r["participants"])):
        peak = "n/a" if r["peak_growth_mib"] is None else f"{r['peak_growth_mib']:.0f}"
        _, name, _, _ = series(r)
        distilled = (f"{r['teacher_s']:.2f} + {r['finetune_s']:.2f}" if "teacher_s" in r
                     else "")
        lines.append(f"| {r['machine']} | {r['model']} | {name} | {r['path']} | "
                     f"{r['participants']} | "
                     f"{r['updates']} | {r['server_s']:.3f} | {r['hypernet_s']:.2f} | "
                     f"{distilled} | {r['rounds_run']} | {peak} | "
                     f"{r['conv_bytes_mean'] / 2**20:.2f} |")
    return "\n".join(lines)


def fit_table(fits: list[dict[str, Any]]) -> str:
    lines = ["| machine | model | strategy | path | ms / participant | ms / update | "
             "1000: measured / extrapolated from 10, 100 | memory growth / participant | "
             "... / its conv weights | ... / its whole update |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for f in fits:
        lin = "n/a"
        if "measured_over_predicted" in f:
            lin = (f"{f['measured_over_predicted']:.2f} "
                   f"({'linear' if f['linear_within_20pct'] else 'NOT linear'})")
        mem = f.get("memory_bytes_per_participant")
        conv, whole = f.get("memory_over_conv_bytes"), f.get("memory_over_update_bytes")
        per_update = f["slope_ms_per_update"]
        lines.append(
            f"| {f['machine']} | {f['model']} | {f['strategy']} | {f['path']} | "
            f"{f['slope_ms_per_participant']:.2f} | "
            f"{'n/a' if per_update is None else f'{per_update:.2f}'} | {lin} | "
            f"{'n/a' if mem is None else f'{mem / 1e6:.2f} MB'} | "
            f"{'n/a' if conv is None else f'{conv:.2f}'} | "
            f"{'n/a' if whole is None else f'{whole:.2f}'} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- plan
def sizes_for(spec: str, model: str) -> list[int]:
    """``"10,100 stl10:10"``: 10 and 100 for every model, 10 alone for stl10."""
    default, per_model = [], {}
    for token in spec.split():
        if ":" in token:
            name, sizes = token.split(":", 1)
            per_model[name] = [int(x) for x in sizes.split(",") if x]
        else:
            default = [int(x) for x in token.split(",") if x]
    return per_model.get(model, default)


def distill_settings(args: argparse.Namespace) -> list[tuple[dict[str, int], list[int]]]:
    """``--distill``'s ``PROXY:STEPS[:SIZES]`` tokens: each setting and its participants."""
    out = []
    for token in args.distill.split():
        proxy, steps, *sizes = token.split(":")
        spec = sizes[0] if sizes else args.distill_sizes
        out.append(({"proxy": int(proxy), "steps": int(steps), "batch": args.distill_batch},
                    [int(x) for x in spec.split(",") if x]))
    return out


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    configs = []
    for model in args.models.split(","):
        for strategy in args.strategies.split(","):
            if strategy == "distill":
                sim = sizes_for(args.hypemefed_sim_sizes, model)
                configs += [{"model": model, "strategy": "hypemefed", "path": path,
                             "participants": n, "repeat": args.repeat,
                             "budget_s": args.budget_s, "device": args.device, "distill": d}
                            for d, sizes in distill_settings(args)
                            for path in args.paths.split(",")
                            for n in sizes if path == "stream" or n in sim]
                continue
            sizes = [int(x) for x in args.sizes.split(",")]
            if strategy == "hypemefed":
                sizes = [n for n in sizes if n in sizes_for(args.hypemefed_sizes, model)]
            for path in args.paths.split(","):
                sim_spec = args.hypemefed_sim_sizes if strategy == "hypemefed" else args.sim_sizes
                limit = sizes if path == "stream" else [n for n in sizes
                                                        if n in sizes_for(sim_spec, model)]
                configs += [{"model": model, "strategy": strategy, "path": path,
                             "participants": n, "repeat": args.repeat,
                             "budget_s": args.budget_s, "device": args.device} for n in limit]
    return configs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="svhn,unimib,stl10")
    ap.add_argument("--strategies", default="fedavg,depthwise,hypemefed",
                    help="also 'distill': hypemefed with the server-side ensemble distillation")
    ap.add_argument("--paths", default="stream,sim")
    ap.add_argument("--sizes", default="10,100,1000", help="participants per round")
    ap.add_argument("--hypemefed-sizes", default="10,100,1000 unimib:10,100 stl10:10,100",
                    help="hypemefed's sizes; 'model:sizes' overrides one model. unimib and "
                         "stl10 (same block convs) at 1000 peak near 12 GB and take about 6 "
                         "min: ask for them explicitly")
    ap.add_argument("--sim-sizes", default="10,100 svhn:10,100,1000",
                    help="sizes for the simulator path, which holds every update in memory")
    ap.add_argument("--hypemefed-sim-sizes", default="svhn:10",
                    help="hypemefed on the simulator path: the stream path's compute (shown "
                         "once), and the list's memory is measured by fedavg and depthwise")
    ap.add_argument("--repeat", type=int, default=3, help="rounds per configuration (median)")
    ap.add_argument("--budget-s", type=float, default=60.0,
                    help="stop repeating a configuration once its rounds took this long")
    ap.add_argument("--device", default="cpu", help="where hypemefed's hypernetworks train")
    ap.add_argument("--distill", default="256:50 1024:50 1024:200:10",
                    help="distill settings, 'PROXY:STEPS[:SIZES]' each (proxy inputs, "
                         "fine-tuning steps, participants: else --distill-sizes)")
    ap.add_argument("--distill-batch", type=int, default=64, help="distillation batch")
    ap.add_argument("--distill-sizes", default="10,100",
                    help="distill's participants; 1000 is opt-in (one teacher pass each)")
    ap.add_argument("--quick", action="store_true",
                    help="svhn, 10 and 100 participants, hypemefed at 10: under a minute")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--update", action="store_true",
                    help="merge into --json's existing rows (same configuration: replaced)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return
    if args.quick:
        args.models, args.sizes, args.hypemefed_sizes = "svhn", "10,100", "10"
        args.sim_sizes, args.hypemefed_sim_sizes, args.budget_s = "10", "10", 10.0
        args.distill, args.distill_sizes = "256:10", "10"

    previous = None  # loaded once: the file is rewritten after every configuration
    if args.update and args.json and Path(args.json).exists():
        previous = json.loads(Path(args.json).read_text())
    start, rows = time.perf_counter(), []
    for cfg in plan(args):
        row = run_child(cfg)
        rows.append(row)
        peak = row["peak_growth_mib"]
        print(f"{row['model']:>7} {row['strategy']:>9} {row['path']:>6} "
              f"{row['participants']:>5} participants ({row['updates']:>4} updates): "
              f"{row['server_s']:8.3f} s (hypernet {row['hypernet_s']:7.2f} s, "
              + (f"teacher {row['teacher_s']:.2f} s, fine-tune {row['finetune_s']:.2f} s, "
                 if "teacher_s" in row else "") +
              f"{row['rounds_run']} rounds)  peak +{peak if peak is not None else float('nan'):.0f}"
              f" MiB", flush=True)
        if args.json:  # after every configuration: a long run cut short keeps what it measured
            write_report(args.json, build_report(rows, time.perf_counter() - start, previous))
    total = time.perf_counter() - start
    report = build_report(rows, total, previous)
    print()
    print(table(report["results"]))
    print()
    print(fit_table(report["fits"]))
    print(f"\ntotal {total:.0f} s")
    if args.json:
        write_report(args.json, report)


def write_report(path: str, report: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)


def build_report(rows: list[dict[str, Any]], total: float, previous: dict[str, Any] | None
                 ) -> dict[str, Any]:
    """This run's rows, merged into ``previous`` (same configuration: this run's row wins)."""
    key = ("model", "strategy", "variant", "path", "participants", "machine")
    runs = [{"argv": sys.argv[1:], "total_s": total, "loadavg_at_end": os.getloadavg()}]
    if previous is not None:
        fresh = {tuple(r[k] for k in key) for r in rows}
        rows = [r for r in previous["results"] if tuple(r[k] for k in key) not in fresh] + rows
        runs = previous.get("runs", []) + runs
    import torch

    return {"cpus": os.cpu_count(), "torch": torch.__version__, "threads": 1,
            "noise_scale": NOISE_SCALE, "runs": runs, "results": rows, "fits": analyse(rows)}


if __name__ == "__main__":
    main()
