"""Every strategy side by side on real data: identical partitions, seeds and tier assignments.

Settings: CIFAR-10 with the svhn-sized model (model ``cifar10``, standing in for SVHN) and the
HAPT windows with the unimib-sized model (model ``hapt``, standing in for UniMiB SHAR), by
subject and Dirichlet alpha 0.1 and 1.0 (CIFAR-10: Dirichlet only, it has no subjects), and
both at alpha 0.1 with tiers following the clients' dominant label. Seeds 0-2 for hypemefed,
depthwise and fedavg, with and without static BatchNorm; seed 0 for the other strategies (with
``--extras`` seeds 0-2 for depthfl, scalefl and heterofl too, and depthfl with static BN); the
HypeMeFed ablations (rank, naive vs LRF, warm vs reset hypernetworks, which tensors are
generated, the gate) on HAPT by subject. Each run is an ordinary ``hmf simulate`` run
directory (config.json, metrics.jsonl, checkpoint), so an interrupted benchmark resumes where
it stopped; ``--only`` picks runs by name.

Scales (``--scale``):
  cpu   cut from the authors' setting: rounds (15 instead of 300, evaluated every 3; 30 at
        alpha 0.1, where 15 rounds leave every strategy's exit 3 at chance), local epochs
        (1 instead of 5), CIFAR-10 data (the 10,000/2,000 class-balanced subset, 20 clients
        of which 6 a round, batch 32 instead of 128). The issue's 72 runs (the default plan)
        took 102 minutes here, two at a time; ``--extras`` adds 282 analysis runs (static BN,
        label-tiered settings, the bar's baselines at every seed, fedavg with a server
        learning rate, the gate, Adam-trained hypernetworks, the ceiling of perfect
        generation, the release's aggregation, ``--untrained global``, residual
        hypernetworks). A 16-core GPU machine runs 16 at a time (``bench/accuracy_gpu.sh``:
        79 runs took 12.7 min on an H200).
  full  the authors' setting (method.md): CIFAR-10 as SVHN (all 60,000 images, 50 clients,
        10 a round, 300 rounds, 5 local epochs, batch 128, lr 5e-4) and HAPT as UniMiB
        (30 clients, 6 a round, batch 16, lr 5e-3); meant for ``--device cuda``: on an H200,
        six at a time, 8-42 minutes a run (hours on this CPU).

    .venv/bin/python bench/accuracy.py run --scale cpu --jobs 2 --only hapt-subject/
    .venv/bin/python bench/accuracy.py report --scale cpu              # JSON, table, plots
    ONLY=cifar10- bash bench/accuracy_gpu.sh                          # on a GPU machine

``run`` skips runs that bench/results/accuracy_<scale>.json records as complete (made on another
machine, or in a checkout whose run directories are gone; ``--rerun-recorded`` runs them again).
``report`` merges the runs it finds into that record (a run found replaces its recorded summary;
runs recorded from other machines are kept; ``--fresh`` starts over), judges the issue's bar
from the seeds each HypeMeFed run shares with its baselines, plots docs/img/accuracy_<scale>_*.png
and rewrites the sections of docs/RESULTS.md between its markers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED_CIFAR = ROOT.parent / "shared" / "data" / "cifar10"
MAIN = ("hypemefed", "depthwise", "fedavg")  # three seeds each
OTHERS = ("fedavg-small", "heterofl", "depthfl", "scalefl")  # seed 0
# the bar compares HypeMeFed with these at the deep exits, as mean and spread over seeds: the
# extras run them at every seed on the untiered settings (depthfl also with static BN, which
# scalefl and heterofl use by default, to face the static-BN HypeMeFed runs)
BAR_BASELINES = ("depthfl", "scalefl", "heterofl")
SEEDS = (0, 1, 2)
# BatchNorm statistics recomputed for the new global model from participants' data every round
# (HeteroFL's static BN, scalefl's default), given to the main strategies with every seed
STATIC_BN = dict(static_bn=True)

SETTINGS: dict[str, dict[str, Any]] = {
    "cifar10-dir0.1": dict(model="cifar10", partition="dirichlet", alpha=0.1),
    "cifar10-dir1.0": dict(model="cifar10", partition="dirichlet", alpha=1.0),
    "hapt-subject": dict(model="hapt", partition="subject"),
    "hapt-dir0.1": dict(model="hapt", partition="dirichlet", alpha=0.1),
    "hapt-dir1.0": dict(model="hapt", partition="dirichlet", alpha=1.0),
    # HypeMeFed's motivating case: tiers follow the clients' dominant label, so the deep tier
    # rarely sees the classes the weak devices hold (cloud/federation.py, TIER_BY)
    "cifar10-dir0.1-tiered": dict(model="cifar10", partition="dirichlet", alpha=0.1,
                                  tier_by="label"),
    "hapt-dir0.1-tiered": dict(model="hapt", partition="dirichlet", alpha=0.1, tier_by="label"),
}
TIERED_SETTINGS = ("cifar10-dir0.1-tiered", "hapt-dir0.1-tiered")  # + hypemefed gen-all, seeds
ABLATION_SETTING = "hapt-subject"  # the setting where 15 rounds train every exit
ABLATIONS: dict[str, dict[str, Any]] = {
    "rank1": dict(rank=1), "rank8": dict(rank=8), "rank32": dict(rank=32),
    "naive": dict(hypernet="naive"), "reset": dict(hypernet_reset=True),
    "gen-bn": dict(generate="convs+bn"), "gen-all": dict(generate="all"),
    # the authors' hypernetwork training (Adam epochs, hidden 512) instead of the closed form
    "adam25": dict(hypernet_sweeps=0, hypernet_epochs=25, hidden=512),
    # a fix the method allows: generate only where it beats the trainers' mean out of sample
    "gate": dict(hypernet_gate=True),
    # the gate with BatchNorm statistics recomputed for the new global model (see STATIC_BN)
    "gate-sbn": dict(hypernet_gate=True, static_bn=True),
}
# the paper's other answer to an open choice (method.md): a shallow client adds the global
# model's value for the deep tensors it neither trained nor got generated, as the release does
UNTRAINED_GLOBAL = dict(untrained="global")
# with the gate too, a conv the hypernetwork does not beat the global tensor on is the global
# tensor: the release's aggregate whenever the gate is shut; with static BN as the best runs
GATE_GLOBAL_SBN = dict(hypernet_gate=True, untrained="global", static_bn=True)
# does generation add anything on top of the release's stale averaging? Hypernetworks on the
# deviations from the global model: predicting no deviation gives the release's aggregate
RESIDUAL_GLOBAL = dict(hypernet_residual=True, untrained="global")
RESIDUAL_GLOBAL_SBN = dict(RESIDUAL_GLOBAL, static_bn=True)
# Is the release's gain just damping? fedavg's full model is trained by the round's 2 tier-3
# participants, exactly the trainers of the release's block 3, which moves by 1/3 of their mean
# update in a 2/2/2 round (docs/METHOD.md): fedavg with that server learning rate damps the
# same update the same way, without the other participants' shallow blocks
SERVER_LR = dict(server_lr=1 / 3)
SERVER_LR_SBN = dict(SERVER_LR, static_bn=True)
# What perfect generation could reach: every participant trains the full model (fedavg with all
# clients in tier 3), as if the hypernetworks produced exactly the deep blocks the shallow
# participants would have trained. Same partitions, participants per round and local training.
CEILING = dict(tier_mix=(0.0, 0.0, 1.0))
CEILING_SETTINGS = ("cifar10-dir0.1", "hapt-dir0.1", "hapt-subject")
SCALES: dict[str, dict[str, dict[str, Any]]] = {
    "cpu": {
        "cifar10": dict(clients=20, participants=6, rounds=15, local_epochs=1, batch_size=32,
                        lr=5e-4, min_size=10, eval_every=3),
        "hapt": dict(clients=30, participants=6, rounds=15, local_epochs=1, batch_size=16,
                     lr=5e-3, min_size=10, eval_every=3),
    },
    # issue 20: cpu's CIFAR-10 is too weak to separate methods (exit 3 about 35 % at alpha 1.0);
    # twice the rounds at twice the learning rate, on the same subset, 2 local epochs (1 epoch
    # reached 39.6 % for hypemefed-gate-global-sbn at alpha 1.0, seed 0); HAPT as cpu
    "mid": {
        "cifar10": dict(clients=20, participants=6, rounds=30, local_epochs=2, batch_size=32,
                        lr=1e-3, min_size=10, eval_every=3),
        "hapt": dict(clients=30, participants=6, rounds=15, local_epochs=1, batch_size=16,
                     lr=5e-3, min_size=10, eval_every=3),
    },
    "full": {
        "cifar10": dict(clients=50, participants=10, rounds=300, local_epochs=5, batch_size=128,
                        lr=5e-4, min_size=10, eval_every=5),
        "hapt": dict(clients=30, participants=6, rounds=300, local_epochs=5, batch_size=16,
                     lr=5e-3, min_size=10, eval_every=5),
    },
}
# the ablations: rank (100 is the default), naive vs LRF, warm vs reset, what is generated
CORE_ABLATIONS = ("rank1", "rank8", "rank32", "naive", "reset", "gen-bn", "gen-all")
SEEDED_ABLATIONS = ("gate", "gate-sbn")  # close to depthwise: every seed, not seed 0 only
CPU_ROUNDS_AT_ALPHA_01 = 30  # 15 left exit 3 at chance for every strategy (H200 log, session 2)
# "final" accuracy: the mean of the last 3 evaluations (rounds 9-15, or 24-30 at alpha 0.1), as
# the authors' release reports its last 3 rounds: at alpha 0.1 one round's value swings by 15
# points with the round's participants (cifar10 fedavg: 0.28 at round 6, 0.10 at round 12)
FINAL_EVALS = 3
# "late" accuracy is the mean of the last this many evaluations (50 rounds at the full scale),
# and plots of curves with at least twice as many evaluations draw the raw curve faintly and
# this trailing mean: at alpha 0.1 one evaluation's exit-3 accuracy swings between 15 % and
# 60 % with its round's participants (full HAPT runs)
SMOOTH_EVALS = 10
TARGET_FRACTION = 0.9  # "rounds to target": first round at 90 % of the setting's best exit-3


@dataclass(frozen=True)
class Run:
    setting: str
    strategy: str
    seed: int
    variant: str = ""  # an ablation's name, "" for the strategy's defaults
    overrides: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def name(self) -> str:
        variant = f"-{self.variant}" if self.variant else ""
        return f"{self.setting}/{self.strategy}{variant}/s{self.seed}"


def _strategies(seed: int, setting: str) -> list[Run]:
    """Every strategy with its defaults: MAIN at every seed, OTHERS at seed 0."""
    return [Run(setting, s, seed) for s in MAIN + (OTHERS if seed == 0 else ())]


def _core(seed: int, setting: str) -> list[Run]:
    """What the issue asks for: every strategy (MAIN at every seed, OTHERS at seed 0) on the
    untiered settings, and the ablations in CORE_ABLATIONS at seed 0."""
    if setting in TIERED_SETTINGS:
        return []
    runs = _strategies(seed, setting)
    if setting == ABLATION_SETTING and seed == 0:
        runs += [Run(setting, "hypemefed", seed, k, ABLATIONS[k]) for k in CORE_ABLATIONS]
    return runs


def _extras(seed: int, setting: str) -> list[Run]:
    """What the analysis of the shortfall added: static BN, the tiered settings, the bar's
    baselines at every seed, the gate, the authors' Adam-trained hypernetwork, the ceiling of
    perfect generation, the authors' release's effective aggregation, residual hypernetworks and
    fedavg with a server learning rate."""
    runs = _strategies(seed, setting) if setting in TIERED_SETTINGS else []
    if setting in CEILING_SETTINGS:
        runs.append(Run(setting, "fedavg", seed, "ceiling", CEILING))
    runs += [Run(setting, s, seed, "sbn", STATIC_BN) for s in MAIN]
    runs.append(Run(setting, "hypemefed-release", seed))  # what the paper's numbers measured
    if setting not in TIERED_SETTINGS:
        runs += [Run(setting, s, seed) for s in BAR_BASELINES if seed > 0]
        runs.append(Run(setting, "depthfl", seed, "sbn", STATIC_BN))
        # does the release's gain come from the stale BN statistics?
        runs.append(Run(setting, "hypemefed-release", seed, "sbn", STATIC_BN))
        runs.append(Run(setting, "hypemefed", seed, "untrained-global", UNTRAINED_GLOBAL))
        runs.append(Run(setting, "hypemefed", seed, "gate-global-sbn", GATE_GLOBAL_SBN))
        runs.append(Run(setting, "hypemefed", seed, "residual-global", RESIDUAL_GLOBAL))
        runs.append(Run(setting, "hypemefed", seed, "residual-global-sbn", RESIDUAL_GLOBAL_SBN))
        runs.append(Run(setting, "fedavg", seed, "slr", SERVER_LR))
        runs.append(Run(setting, "fedavg", seed, "slr-sbn", SERVER_LR_SBN))
    if setting in TIERED_SETTINGS:  # only generated heads can carry tier 1's classes
        runs.append(Run(setting, "hypemefed", seed, "gen-all", ABLATIONS["gen-all"]))
    if setting == ABLATION_SETTING:
        runs += [Run(setting, "hypemefed", seed, k, v) for k, v in ABLATIONS.items()
                 if k not in CORE_ABLATIONS and (seed == 0 or k in SEEDED_ABLATIONS)]
    return runs


def plan(only: str | None = None, extras: bool = False) -> list[Run]:
    """The core runs, then (``extras``) the rest; cheapest settings first within a seed so that
    partial results cover all strategies early."""
    parts = (_core, _extras) if extras else (_core,)
    runs = [r for part in parts for seed in SEEDS for setting in SETTINGS
            for r in part(seed, setting)]
    wanted = only.split(",") if only else None
    return [r for r in runs if wanted is None or any(w in r.name for w in wanted)]


def cifar_dir(scale: str, given: str | None, work: Path) -> str:
    """The CPU scale reads the 10,000-image subset even where the full JPEG set sits beside it."""
    src = Path(given) if given else SHARED_CIFAR
    if scale == "full":
        return str(src)
    target = (src / "cifar10_small_uint8.npz").resolve()
    if not target.is_file():
        sys.exit(f"{target} not found: pass --cifar-dir DIR holding cifar10_small_uint8.npz "
                 "(../shared/data/cifar10/ beside the project)")
    small = work / "cifar10-small"
    small.mkdir(parents=True, exist_ok=True)
    link = small / "cifar10_small_uint8.npz"
    link.unlink(missing_ok=True)
    link.symlink_to(target)
    return str(small)


def run_config(run: Run, scale: str, device: str, cifar: str) -> dict[str, Any]:
    setting = SETTINGS[run.setting]
    cfg = {**SCALES[scale][setting["model"]], **setting, "strategy": run.strategy,
           "seed": run.seed, "device": device, **run.overrides}
    if setting["model"] == "cifar10":
        cfg["data_dir"] = cifar
    if scale in ("cpu", "mid") and setting.get("alpha") == 0.1:
        cfg["rounds"] = max(cfg["rounds"], CPU_ROUNDS_AT_ALPHA_01)
    return cfg


# ---------------------------------------------------------------------------------------------
# Running


def run_one(config_path: Path, out: Path) -> None:
    """One run in this process (the subprocess entry point), resuming a checkpoint if any."""
    from cloud.config import RunConfig
    from cloud.simulation import Simulation

    cfg = RunConfig(**json.loads(config_path.read_text()))
    log = open(out / "log.txt", "a")
    sim = Simulation(cfg, out, log=lambda line: print(line, file=log, flush=True))
    sim.run(resume=True)


def finished(out: Path, rounds: int) -> bool:
    from cloud.runlog import read_metrics

    rows = read_metrics(out)
    return bool(rows) and rows[-1]["round"] >= rounds


def launch(run: Run, cfg: dict[str, Any], out: Path, threads: int) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_config.json").write_text(json.dumps(cfg, indent=1))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, __file__, "one", str(out / "bench_config.json"),
                             str(out)], env=env, stdout=subprocess.DEVNULL,
                            stderr=open(out / "stderr.txt", "a"))


def last_line(out: Path) -> str:
    try:
        return (out / "log.txt").read_text().strip().splitlines()[-1]
    except (FileNotFoundError, IndexError):
        return "(no round yet)"


def record_path(scale: str) -> Path:
    return ROOT / "bench" / "results" / f"accuracy_{scale}.json"


def recorded(scale: str) -> set[str]:
    """Runs the record holds complete: made on another machine or in a checkout whose run
    directories are gone."""
    path = record_path(scale)
    runs = json.loads(path.read_text())["runs"] if path.is_file() else {}
    return {n for n, r in runs.items() if r["rounds_done"] >= r["rounds_planned"]}


def run_all(args: argparse.Namespace) -> None:
    work = Path(args.runs) / args.scale
    cifar = cifar_dir(args.scale, args.cifar_dir, work)
    skip = set() if args.rerun_recorded else recorded(args.scale)
    todo, here, kept = [], 0, 0
    for run in plan(args.only, args.extras):
        cfg = run_config(run, args.scale, args.device, cifar)
        if finished(work / run.name, cfg["rounds"]):
            here += 1
        elif run.name in skip:
            kept += 1
        else:
            todo.append((run, cfg))
    print(f"{len(todo)} runs to do ({here} finished in {work}, {kept} more recorded in "
          f"{record_path(args.scale).relative_to(ROOT)}: --rerun-recorded runs them again), "
          f"{args.jobs} at a time, {args.threads} thread(s) each", flush=True)
    schedule(todo, work, args.jobs, args.threads, args.deadline_s)


def schedule(todo: list[tuple[Run, dict[str, Any]]], work: Path, jobs: int, threads: int,
             deadline_s: float | None = None) -> None:
    """Runs ``todo`` ``jobs`` at a time, each in its own process resuming its checkpoint,
    printing a line as each ends; past ``deadline_s`` every run still going is stopped."""
    todo = list(todo)
    start, active, done = time.time(), {}, 0
    deadline = start + deadline_s if deadline_s else None
    while todo or active:
        while todo and len(active) < jobs:
            run, cfg = todo.pop(0)
            active[run] = (launch(run, cfg, work / run.name, threads), time.time())
        time.sleep(2)
        for run, (proc, began) in list(active.items()):
            if proc.poll() is not None:
                del active[run]
                done += 1
                status = "done" if proc.returncode == 0 else f"FAILED rc={proc.returncode}"
                print(f"[{done}] {run.name} {status} in {time.time() - began:.0f} s: "
                      f"{last_line(work / run.name)}", flush=True)
        if deadline and time.time() > deadline:
            for run, (proc, _) in active.items():
                proc.kill()
                print(f"deadline: stopped {run.name} at {last_line(work / run.name)}", flush=True)
            print(f"deadline reached; {len(todo)} runs never started", flush=True)
            return
    print(f"all runs finished in {(time.time() - start) / 60:.1f} min", flush=True)


# ---------------------------------------------------------------------------------------------
# Reporting


def run_summary(rows: list[dict[str, Any]], planned_rounds: int) -> dict[str, Any]:
    """Final (mean of the last FINAL_EVALS evaluations), late (of the last SMOOTH_EVALS, the
    steadier figure where one evaluation swings with its round's participants) and best global
    accuracy per exit, per-tier accuracy at each tier's deepest exit, mean local test accuracy,
    server seconds per round and the accuracy curve."""
    evaluated = [r["acc"] for r in rows if r.get("acc")]

    def final(get, n: int = FINAL_EVALS) -> float | None:
        vals = [get(a) for a in evaluated[-n:]]
        return float(np.mean(vals)) if vals and None not in vals else None

    def best(get) -> float | None:
        vals = [v for v in map(get, evaluated) if v is not None]
        return max(vals) if vals else None

    exits = ("1", "2", "3")
    return {
        "rounds_done": rows[-1]["round"] if rows else 0, "rounds_planned": planned_rounds,
        "final_global": {e: final(lambda a, e=e: a["global"].get(e)) for e in exits},
        "best_global": {e: best(lambda a, e=e: a["global"].get(e)) for e in exits},
        "final_tier": {e: final(lambda a, e=e: a["tier"].get(e)) for e in exits},
        "late_global": {e: final(lambda a, e=e: a["global"].get(e), SMOOTH_EVALS) for e in exits},
        "late_local_mean": final(lambda a: a["local_mean"], SMOOTH_EVALS),
        "final_local_mean": final(lambda a: a["local_mean"]),
        "best_local_mean": best(lambda a: a["local_mean"]),
        "server_s": float(np.mean([r["server_s"] for r in rows])) if rows else None,
        "run_s": float(sum(r["elapsed_s"] for r in rows)),  # rounds only: no start-up
        "curve": [(r["round"], r["acc"]["global"]["3"], r["acc"]["local_mean"])
                  for r in rows if r.get("acc")],
    }


def rounds_to(curve: list[tuple[int, Any, Any]], target: float) -> int | None:
    return next((rnd for rnd, acc, _ in curve if acc is not None and acc >= target), None)


def mean_std(values: list[float | None]) -> dict[str, Any] | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "n": len(vals)}


def summarise_runs(work: Path) -> dict[str, dict[str, Any]]:
    """The summary of every run directory under ``work`` (planned runs and any extra seeds)."""
    from cloud.runlog import read_metrics

    per_run: dict[str, dict[str, Any]] = {}
    for metrics in sorted(work.glob("*/*/s*/metrics.jsonl")):
        out = metrics.parent
        rows = read_metrics(out)
        if rows and out.parent.parent.name in SETTINGS:
            cfg = json.loads((out / "config.json").read_text())
            per_run[str(out.relative_to(work))] = {**run_summary(rows, cfg["rounds"]),
                                                   "device": cfg["device"]}
    return per_run


def collect(per_run: dict[str, dict[str, Any]], scale: str) -> dict[str, Any]:
    """Targets, rounds to target, and mean ± std over seeds of every group of runs."""
    per_run = dict(sorted(per_run.items()))
    for setting in SETTINGS:
        runs = [s for n, s in per_run.items() if n.startswith(setting + "/")]
        peak = max((s["best_global"]["3"] or 0 for s in runs), default=0)
        for s in runs:
            s["target"] = TARGET_FRACTION * peak
            s["rounds_to_target"] = rounds_to(s["curve"], s["target"])
    groups: dict[str, dict[str, Any]] = {}
    for name, s in per_run.items():
        key = name.rsplit("/", 1)[0]
        groups.setdefault(key, {"runs": []})["runs"].append(s)
    for g in groups.values():
        runs = g.pop("runs")
        g["seeds"] = len(runs)
        g["complete"] = all(r["rounds_done"] >= r["rounds_planned"] for r in runs)
        g["rounds_done"] = min(r["rounds_done"] for r in runs)
        g["device"] = "+".join(sorted({r["device"] for r in runs}))
        for metric in ("final_local_mean", "late_local_mean", "best_local_mean", "server_s",
                       "rounds_to_target", "run_s"):
            g[metric] = mean_std([r.get(metric) for r in runs])  # records may predate a metric
        for metric in ("final_global", "late_global", "best_global", "final_tier"):
            g[metric] = {e: mean_std([r.get(metric, {}).get(e) for r in runs])
                         for e in ("1", "2", "3")}
    return {"scale": scale, "runs": per_run, "groups": groups}


def fmt(ms: dict[str, Any] | None, pct: bool = True) -> str:
    if ms is None:
        return "-"
    k = 100 if pct else 1
    spread = f" ± {k * ms['std']:.1f}" if ms["n"] > 1 else ""
    return f"{k * ms['mean']:.1f}{spread}"


def table(result: dict[str, Any], late: bool = False) -> str:
    """``late``: a column of exit 3's late accuracy, for runs long enough that it is not just
    the mean of the whole run."""
    head = ("| setting | strategy | seeds | rounds | global exit 1 | exit 2 | exit 3 (final) "
            + ("| exit 3 (late) " if late else "") +
            "| exit 3 (best) | tier 1 @1 | tier 2 @2 | tier 3 @3 | mean local | rounds to "
            "target | server s/round | ran on |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for key, g in sorted(result["groups"].items()):
        setting, strategy = key.split("/")
        rounds = f"{g['rounds_done']}" + ("" if g["complete"] else " (cut)")
        fg, t = g["final_global"], g["final_tier"]
        late_col = f"{fmt(g['late_global']['3'])} | " if late else ""
        lines.append(
            f"| {setting} | {strategy} | {g['seeds']} | {rounds} | {fmt(fg['1'])} | "
            f"{fmt(fg['2'])} | {fmt(fg['3'])} | {late_col}{fmt(g['best_global']['3'])} | "
            f"{fmt(t['1'])} "
            f"| {fmt(t['2'])} | {fmt(t['3'])} | {fmt(g['final_local_mean'])} | "
            f"{fmt(g['rounds_to_target'], pct=False)} | {fmt(g['server_s'], pct=False)} | "
            f"{g['device']} |")
    return "\n".join(lines)


# The bar: HypeMeFed's exit 3 at least BAR_POINTS above fedavg's at alpha 0.1, and above
# depthwise, depthfl and scalefl at the deepest exits tier-1 and tier-2 clients run (1 and 2).
# Each HypeMeFed run faces the baselines of its own BatchNorm regime: static BN against static BN.
BAR_POINTS = 5.0
BAR_FACES = {
    "hypemefed": ("fedavg", "depthwise", "depthfl", "scalefl"),
    "hypemefed-sbn": ("fedavg-sbn", "depthwise-sbn", "depthfl-sbn", "scalefl"),
    # the one configuration found to win: the gate shut, stale global convs (RESULTS.md); also
    # against fedavg damped as stale averaging damps block 3 (SERVER_LR)
    "hypemefed-gate-global-sbn": ("fedavg-sbn", "fedavg-slr-sbn", "depthwise-sbn",
                                  "depthfl-sbn", "scalefl"),
}
BAR_EXITS = ("1", "2")  # tier 1's and tier 2's deepest exits


def paired_points(runs: dict[str, dict[str, Any]], setting: str, a: str, b: str,
                  exit_: str, metric: str = "final_global") -> list[float]:
    """Per seed both strategies ran as far, a's global accuracy (``metric``: final or late) at
    ``exit_`` minus b's, in points (a run cut short is no match for a finished one:
    equal_round_rows compares it)."""
    seeds = sorted(n.rsplit("/", 1)[1] for n in runs if n.startswith(f"{setting}/{a}/"))
    pairs = [(runs[f"{setting}/{a}/{s}"], runs.get(f"{setting}/{b}/{s}")) for s in seeds]
    values = [(ra.get(metric, {}).get(exit_), rb.get(metric, {}).get(exit_)) for ra, rb in pairs
              if rb is not None and ra["rounds_done"] == rb["rounds_done"]]
    return [100 * (va - vb) for va, vb in values if va is not None and vb is not None]


def bar_verdict(baseline: str, setting: str, means: dict[str, float | None]) -> str:
    """Whether one HypeMeFed-vs-baseline row meets the issue's bar, from mean paired gaps."""
    def at_least(exit_: str, points: float) -> bool:
        return means[exit_] is not None and means[exit_] >= points

    if baseline.startswith("fedavg"):
        if SETTINGS[setting].get("alpha") != 0.1:
            return ""  # the bar asks for the 5 points at alpha 0.1
        return "met" if at_least("3", BAR_POINTS) else "not met"
    # "above" by at least what the table's one decimal can show
    return "met" if all(at_least(e, 0.05) for e in BAR_EXITS) else "not met"


def bar_rows(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every HypeMeFed-vs-baseline comparison the records allow, paired by seed."""
    rows = []
    for setting in SETTINGS:
        for hmf, baselines in BAR_FACES.items():
            for base in baselines:
                gaps = {e: paired_points(runs, setting, hmf, base, e) for e in ("1", "2", "3")}
                if not gaps["3"]:
                    continue
                means = {e: float(np.mean(g)) if g else None for e, g in gaps.items()}
                late = paired_points(runs, setting, hmf, base, "3", "late_global")
                rows.append({"setting": setting, "hypemefed": hmf, "baseline": base,
                             "seeds": len(gaps["3"]), "gap": means,
                             "late_gap_3": float(np.mean(late)) if late else None,
                             "gap_min": {e: min(g, default=None) for e, g in gaps.items()},
                             "gap_max": {e: max(g, default=None) for e, g in gaps.items()},
                             "bar": bar_verdict(base, setting, means)})
    return rows


def mean_up_to(curve: list[tuple[int, Any, Any]], rnd: int, column: int) -> float | None:
    """A curve's column (1: global exit 3, 2: mean local) over the last SMOOTH_EVALS
    evaluations up to round ``rnd``."""
    vals = [pt[column] for pt in curve if pt[0] <= rnd and pt[column] is not None]
    return float(np.mean(vals[-SMOOTH_EVALS:])) if vals else None


def equal_round_rows(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Where a setting holds a run cut short, every run of it at the last round all reached:
    final accuracies of runs cut at different rounds do not compare."""
    rows = []
    for setting in SETTINGS:
        named = {n: r for n, r in runs.items() if n.startswith(setting + "/")}
        if all(r["rounds_done"] >= r["rounds_planned"] for r in named.values()):
            continue
        common = min(r["rounds_done"] for r in named.values())
        rows += [{"run": n, "device": r["device"], "rounds_done": r["rounds_done"],
                  "round": common, "exit3": mean_up_to(r["curve"], common, 1),
                  "local_mean": mean_up_to(r["curve"], common, 2)}
                 for n, r in named.items()]
    return rows


def equal_round_table(rows: list[dict[str, Any]]) -> str:
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}"

    head = (f"| run | rounds done | at round | global exit 3, last {SMOOTH_EVALS} evaluations up "
            "to it | mean local, the same | ran on |")
    lines = [head, "|---|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['rounds_done']} | {r['round']} | {pct(r['exit3'])} | "
              f"{pct(r['local_mean'])} | {r['device']} |" for r in rows]
    return "\n".join(lines)


def bar_table(rows: list[dict[str, Any]], late: bool = False) -> str:
    """The bar's rows; ``late`` adds the exit-3 gap of the late means (the full scale's steadier
    figure: one evaluation there swings by tens of points with its round's participants)."""
    def cell(r: dict[str, Any], e: str) -> str:
        if r["gap"][e] is None:
            return "-"
        spread = f" [{r['gap_min'][e]:+.1f}, {r['gap_max'][e]:+.1f}]" if r["seeds"] > 1 else ""
        return f"{r['gap'][e]:+.1f}{spread}"

    def cells(r: dict[str, Any]) -> list[str]:
        late_gap = "-" if r.get("late_gap_3") is None else f"{r['late_gap_3']:+.1f}"
        return [r["setting"], r["hypemefed"], r["baseline"], str(r["seeds"]), cell(r, "1"),
                cell(r, "2"), cell(r, "3"), *([late_gap] if late else []), r["bar"]]

    head = ["setting", "HypeMeFed run", "baseline", "seeds", "exit 1", "exit 2", "exit 3",
            *(["exit 3 (late)"] if late else []), "bar"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def mean_curve(runs: list[dict[str, Any]], col: int) -> list[tuple[int, float]]:
    """Per round, the mean over seeds of column ``col`` of the runs' curves."""
    by_round: dict[int, list[float]] = {}
    for r in runs:
        for c in r["curve"]:
            if c[col] is not None:
                by_round.setdefault(c[0], []).append(c[col])
    return [(rnd, float(np.mean(v))) for rnd, v in sorted(by_round.items())]


def trailing_mean(pts: list[tuple[int, float]], k: int) -> list[tuple[int, float]]:
    """Per point, the mean of it and the k - 1 before it (fewer at the start)."""
    vals = [v for _, v in pts]
    return [(rnd, float(np.mean(vals[max(0, i - k + 1):i + 1]))) for i, (rnd, _) in enumerate(pts)]


def plot(result: dict[str, Any], scale: str, img_dir: Path) -> list[Path]:
    """Per setting: the strategies (top), HypeMeFed's variants with depthwise as reference, and
    every static-BN run (bottom), mean over the seeds each has; exit 3 on the global test set
    and mean local test."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for setting in SETTINGS:
        groups: dict[str, list[dict[str, Any]]] = {}
        for key, run in result["runs"].items():
            if key.startswith(setting + "/"):
                groups.setdefault(key.split("/")[1], []).append(run)
        if not groups:
            continue
        static = [g for g in groups if g.endswith("-sbn") or g in ("scalefl", "heterofl")]
        rows = {"strategies": sorted(g for g in groups if not g.startswith("hypemefed-")
                                     and not g.endswith("-sbn")),
                "HypeMeFed variants": sorted(g for g in groups if g not in static and
                                             (g.startswith("hypemefed") or g == "depthwise")),
                "static BN": sorted(static)}  # scalefl and heterofl have it by default
        rows = {k: r for k, r in rows.items() if r}
        fig, axes = plt.subplots(len(rows), 2, figsize=(11, 3.8 * len(rows)), squeeze=False)
        colors = plt.get_cmap("tab10").colors
        for row, (kind, names) in zip(axes, rows.items(), strict=True):
            for i, name in enumerate(names):
                for ax, col in zip(row, (1, 2), strict=True):
                    pts = mean_curve(groups[name], col)
                    if not pts:
                        continue
                    label = f"{name} ({len(groups[name])} seed(s))"
                    if len(pts) >= 2 * SMOOTH_EVALS:  # long, noisy curves: faint, plus a mean
                        ax.plot(*zip(*pts, strict=True), color=colors[i % 10], lw=0.7, alpha=0.3)
                        pts = trailing_mean(pts, SMOOTH_EVALS)
                        label += f", mean of last {SMOOTH_EVALS} evals"
                    ax.plot(*zip(*pts, strict=True), color=colors[i % 10],
                            ls="-" if i < 10 else "--", lw=2.2 if name == "hypemefed" else 1.2,
                            label=label)
            for ax, title in zip(row, ("global test, exit 3", "mean local test"), strict=True):
                ax.set_title(f"{setting} ({scale}), {kind}: {title}", fontsize=9)
                ax.set_xlabel("round")
                ax.grid(alpha=0.3)
            row[0].set_ylabel("accuracy (mean over seeds)")
            row[1].legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        path = img_dir / f"accuracy_{scale}_{setting}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def replace_section(doc: Path, marker: str, body: str) -> None:
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    text = doc.read_text()
    block = f"{begin}\n{body}\n{end}"
    if begin in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)


def compute_time(result: dict[str, Any]) -> str:
    """Per device the runs were made on: how many and the sum of their round times."""
    by_device: dict[str, list[float]] = {}
    for run in result["runs"].values():
        by_device.setdefault(run["device"], []).append(run["run_s"])
    parts = [f"{dev}: {len(t)} runs, {sum(t) / 3600:.2f} h" for dev, t in sorted(by_device.items())]
    return f"Run time (sum of the runs' round times, start-up excluded): {'; '.join(parts)}."


def report(args: argparse.Namespace) -> None:
    out = record_path(args.scale)
    found = summarise_runs(Path(args.runs) / args.scale)
    # runs made elsewhere (another machine, an earlier checkout) stay in the record; a run
    # found here replaces its recorded summary
    kept = {} if args.fresh or not out.is_file() else json.loads(out.read_text())["runs"]
    if not found and not kept:
        sys.exit(f"no runs under {Path(args.runs) / args.scale}: run `bench/accuracy.py run` first")
    print(f"{len(found)} runs found under {Path(args.runs) / args.scale}, "
          f"{len(set(kept) - set(found))} more kept from {out.relative_to(ROOT)}")
    result = collect({**kept, **found}, args.scale)
    result["bar"] = bar_rows(result["runs"])
    result["equal_rounds"] = equal_round_rows(result["runs"])
    out.write_text(json.dumps(result, indent=1) + "\n")
    late = args.scale == "full"  # the cpu scale's 5-10 evaluations make "late" the whole run
    text = table(result, late)
    print(text)
    bar = bar_table(result["bar"], late)
    print(bar)
    images = plot(result, args.scale, ROOT / "docs" / "img")
    cost = compute_time(result)
    print(cost)
    body = (f"Generated by `bench/accuracy.py report --scale {args.scale}` from "
            f"`{out.relative_to(ROOT)}`. Accuracies in %, mean ± std over seeds; tier k @k: "
            "that tier's clients on their local test splits at exit k; rounds to target: "
            f"first round whose global exit-3 accuracy reaches {TARGET_FRACTION:.0%} of the "
            "best any strategy reached in that setting"
            + (f"; exit 3 (late): the mean of the last {SMOOTH_EVALS} evaluations" if late else "")
            + ".\n\n" + text + "\n\n" + cost + "\n\n"
            + (f"Runs cut short, compared at the round every run of their setting reached:\n\n"
               f"{equal_round_table(result['equal_rounds'])}\n\n" if result["equal_rounds"]
               else "")
            + "\n".join(f"![{p.stem}](img/{p.name})" for p in images))
    replace_section(ROOT / "docs" / "RESULTS.md", f"accuracy-{args.scale}", body)
    replace_section(ROOT / "docs" / "RESULTS.md", f"accuracy-{args.scale}-bar", (
        f"Generated by `bench/accuracy.py report --scale {args.scale}`. Final global accuracy "
        "of the HypeMeFed run minus the baseline's, in points, mean over the seeds both ran "
        "[smallest, largest per-seed gap]"
        + (f"; exit 3 (late): the same for the mean of the last {SMOOTH_EVALS} evaluations, "
           "shown, not judged" if late else "") + ". Bar: at least "
        f"{BAR_POINTS:.0f} points above fedavg at exit 3 at alpha 0.1; above depthwise, "
        "depthfl and scalefl at exits 1 and 2, the deepest exits of tier-1 and tier-2 "
        "clients. Static-BN runs face static-BN baselines (scalefl's is on by default).\n\n"
        + bar))
    print(f"wrote {out} and {len(images)} plots; docs/RESULTS.md section accuracy-{args.scale}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run (or resume) every planned run")
    r.add_argument("--scale", choices=SCALES, default="cpu")
    r.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    r.add_argument("--jobs", type=int, default=2, help="runs at a time")
    r.add_argument("--threads", type=int, default=1, help="torch threads per run")
    r.add_argument("--only", help="only runs whose name contains one of these (comma-separated), "
                   "e.g. hapt-dir0.1/,cifar10-dir0.1/hypemefed/s0")
    r.add_argument("--extras", action="store_true", help="also the runs beyond the issue's: "
                   "static BN, the label-tiered settings, the gate, Adam-trained hypernetworks, "
                   "the ceiling of perfect generation")
    r.add_argument("--cifar-dir", help=f"CIFAR-10 files (default {SHARED_CIFAR})")
    r.add_argument("--runs", default=str(ROOT / "runs" / "accuracy"))
    r.add_argument("--rerun-recorded", action="store_true",
                   help="also the runs bench/results/accuracy_<scale>.json already holds")
    r.add_argument("--deadline-s", type=float, help="stop every run after this many seconds")
    rep = sub.add_parser("report", help="tables, JSON and plots from the runs so far")
    rep.add_argument("--scale", choices=SCALES, default="cpu")
    rep.add_argument("--runs", default=str(ROOT / "runs" / "accuracy"))
    rep.add_argument("--fresh", action="store_true",
                     help="only the runs found under --runs (default: merge them into the record)")
    one = sub.add_parser("one", help=argparse.SUPPRESS)
    one.add_argument("config", type=Path)
    one.add_argument("out", type=Path)
    args = p.parse_args()
    {"run": run_all, "report": report, "one": lambda a: run_one(a.config, a.out)}[args.cmd](args)


if __name__ == "__main__":
    main()
