"""How much of a finished run's accuracy is lost to its BatchNorm statistics? Out of sample, on
the run's final checkpoint.

The global model's BN running statistics are averages of the participants' own, and a block's
come only from the clients that trained it (at alpha 0.1 in the authors' HAPT setting, block 3's
from 2 tier-3 clients a round), while its conv weights may be averaged with other clients' or
generated ones. This re-evaluates the final global model with its weights unchanged and its BN
statistics recomputed (``common.calibration.bn_statistics``, train-mode forward passes):
- ``as_run``: the checkpoint as it is (what the run's last evaluation saw);
- ``federation``: from every client's train data (what no single round sees);
- ``round R``: from the participants of round R, for each of the last ``--rounds`` rounds:
  exactly what ``--static-bn`` computes after round R, here applied to the final weights.
Accuracies in %: global test accuracy per exit and the authors' mean local test accuracy.
Prints a table, writes JSON.

    python bench/bn_recalibration.py runs/accuracy/full/hapt-dir0.1/*/s0 \\
        --json bench/results/bn_recalibration_full-hapt-dir0.1.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from generation_error import run_config  # bench/ is on the path as a script's folder

from cloud.aggregation import static_bn_statistics
from cloud.checkpoint import load_checkpoint
from cloud.evaluation import evaluate
from cloud.simulation import Simulation
from common.calibration import batches
from common.models import State


def round_batches(sim: Simulation, server_round: int):
    """The batches static BN runs through the model after ``server_round``."""
    return sim.participant_batches(sim.tasks(server_round))


def federation_batches(sim: Simulation):
    for idx in sim.fed.train:
        yield from batches(sim.x[torch.from_numpy(idx)])


def recalibrated(sim: Simulation, state: State, data) -> State:
    return static_bn_statistics(sim.cfg.model, state, data)


def scores(sim: Simulation, state: State) -> dict[str, float | None]:
    r = evaluate(sim.cfg.model, state, sim.x, sim.y, sim.fed, sim.strategy.evaluated_exits(),
                 sim.test)
    out = {f"exit{e}": None if a is None else 100 * a for e, a in r["global"].items()}
    return {**out, "local_mean": 100 * r["local_mean"]}


def diagnose(run_dir: Path, rounds: int) -> dict:
    sim = Simulation(run_config(run_dir), run_dir, log=lambda _: None)
    done, state, _ = load_checkpoint(run_dir, sim.strategy)
    per_round = {r: scores(sim, recalibrated(sim, state, round_batches(sim, r)))
                 for r in range(max(1, done - rounds + 1), done + 1)}
    exit3 = [s["exit3"] for s in per_round.values()]
    return {"run": str(run_dir), "round": done, "as_run": scores(sim, state),
            "federation": scores(sim, recalibrated(sim, state, federation_batches(sim))),
            "per_round": per_round,
            "round_exit3": {"median": float(np.median(exit3)), "min": min(exit3),
                            "max": max(exit3)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+", help="run directories with a checkpoint")
    ap.add_argument("--rounds", type=int, default=10, help="last rounds' participants to try")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"{'run':<48}{'round':>6}  {'exits 1/2/3 and local mean: as run':<38}"
          f"{'BN from every client':<30}{'BN from one round: exit 3 median [min-max]'}")
    results = []
    for run_dir in args.runs:
        res = diagnose(run_dir, args.rounds)
        results.append(res)
        a, f, r = res["as_run"], res["federation"], res["round_exit3"]
        fmt = lambda s: " / ".join("-" if s[k] is None else f"{s[k]:.1f}"  # noqa: E731
                                   for k in ("exit1", "exit2", "exit3", "local_mean"))
        print(f"{str(run_dir):<48}{res['round']:>6}  {fmt(a):<38}{fmt(f):<30}"
              f"{r['median']:.1f} [{r['min']:.1f}-{r['max']:.1f}]", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
