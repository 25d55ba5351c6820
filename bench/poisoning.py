"""One malicious participant a round against each defence (issue 19), with ``hmf simulate`` on
the shipped HAPT data (by subject, 30 clients, 6 a round: the defaults), HypeMeFed.

Every round the first tier-1 participant drawn is malicious (a device with its own password
can do no more than send its own update); the other five train honestly. Attacks on that
participant's trained update (Delta = trained - global):
- ``scaled``: every floating weight multiplied by 1e30 (the issue's attack: finite, accepted
  by every check of the wire format);
- ``sign-flip``: global - 10 Delta on every weight (the update pushed ten times as hard the
  wrong way);
- ``noise``: global + N(0, 1) on every weight (honest updates move them by ~0.01);
- ``constant-label``: trains honestly, but on its data relabelled as class 0 (data poisoning:
  its update looks like any other).
``sign-flip`` and ``noise`` leave the BatchNorm running statistics as trained: an attacker who
knows the checks does not send a negative variance, which is refused as ``bad statistics``.
Defences (the run's settings; the rest are the defaults):
- ``undefended``: ``--clip-factor 0`` (the weighted mean, as before issue 19; the safety net
  stays, it cannot be turned off);
- ``default``: clipping at 3x the median deviation (``cloud/robust.py``), weighted mean;
- ``median``, ``trimmed-mean``: ``--aggregation`` (``--trim 0.2``: one of 6 dropped at each
  end), clipping on too.
``none`` is the clean run of each defence: the accuracy an attack is measured against.

    python bench/poisoning.py run --jobs 2         # 20 runs, ~15-20 min on 2 cores
    python bench/poisoning.py report               # the table, from the runs found

Writes ``bench/results/poisoning.json`` (per run: final global accuracy per exit, rounds not
committed, updates clipped) and prints the table of docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cloud.config import RunConfig
from cloud.federation import seed_of
from cloud.runlog import read_metrics
from cloud.simulation import Simulation
from cloud.strategies import ClientTask, ClientUpdate
from common.models import State
from common.training import train_task

ATTACKS = ("none", "scaled", "sign-flip", "noise", "constant-label")
DEFENCES: dict[str, dict[str, Any]] = {
    "undefended": {"clip_factor": 0.0},
    "default": {},
    "median": {"aggregation": "median"},
    "trimmed-mean": {"aggregation": "trimmed-mean", "trim": 0.2},
}
SETTING = dict(rounds=5, local_epochs=1, seed=0)  # the defaults otherwise: hapt by subject
RUNS = Path("runs/poisoning")
RESULT = Path("bench/results/poisoning.json")


class Poisoned(Simulation):
    """``hmf simulate`` with one malicious participant a round (module docstring)."""

    def __init__(self, cfg: RunConfig, out: Path, attack: str) -> None:
        super().__init__(cfg, out, log=lambda _: None)
        self.attack = attack

    def attacker(self, server_round: int) -> int | None:
        tier1 = [c for c, t in self.fed.participants(self.cfg.seed, server_round) if t == 1]
        return tier1[0] if tier1 and self.attack != "none" else None

    def train_client(self, global_state: State, task: ClientTask, server_round: int
                     ) -> ClientUpdate:
        if task.client != self.attacker(server_round):
            return super().train_client(global_state, task, server_round)
        if self.attack == "constant-label":
            return self._train_relabelled(global_state, task, server_round)
        update = super().train_client(global_state, task, server_round)
        update.state = poison(self.attack, update.state, global_state,
                              seed_of(self.cfg.seed, 99, server_round))
        return update

    def _train_relabelled(self, global_state: State, task: ClientTask, server_round: int
                          ) -> ClientUpdate:
        module, state = self.strategy.submodel(global_state, task)
        idx = torch.from_numpy(self.fed.train[task.client])
        trained, loss = train_task(module, state, self.x[idx], torch.zeros_like(self.y[idx]),
                                   self.train_cfg,
                                   seed_of(self.cfg.seed, 5, server_round, task.client))
        return ClientUpdate(task, len(idx), trained, loss)


def poison(attack: str, state: State, global_state: State, seed: int) -> State:
    """The malicious participant's update from its honestly trained ``state``."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in state.items():
        statistics = name.endswith((".running_mean", ".running_var"))
        if not t.is_floating_point() or (statistics and attack != "scaled"):
            out[name] = t
            continue
        g = global_state[name]
        if attack == "scaled":
            out[name] = t * 1e30
        elif attack == "sign-flip":
            out[name] = g - 10 * (t - g)
        elif attack == "noise":
            out[name] = g + torch.randn(t.shape, generator=gen)
        else:
            raise ValueError(f"unknown attack {attack!r}")
    return out


def one_run(defence: str, attack: str, runs: Path) -> dict[str, Any]:
    torch.set_num_threads(1)
    out = runs / f"{defence}-{attack}"
    if len(read_metrics(out)) == SETTING["rounds"]:  # done by an earlier, interrupted call
        return summarize(defence, attack, out)
    cfg = RunConfig(**SETTING, **DEFENCES[defence])
    start = time.perf_counter()
    Poisoned(cfg, out, attack).run()
    return summarize(defence, attack, out, time.perf_counter() - start)


def summarize(defence: str, attack: str, out: Path, seconds: float | None = None
              ) -> dict[str, Any]:
    rows = read_metrics(out)
    final = rows[-1]["acc"]["global"]
    exits = [v for v in final.values() if v is not None]
    return {"defence": defence, "attack": attack, "rounds": len(rows),
            "final": final, "final_mean": float(np.mean(exits)),
            "not_committed": [r["round"] for r in rows if r.get("committed") is False],
            "clipped_updates": [r.get("clipped", {}).get("updates", 0) for r in rows],
            "rejected": [r.get("rejected", {}) for r in rows], "seconds": seconds}


def run(jobs: int, runs: Path, result: Path) -> list[dict[str, Any]]:
    todo = [(d, a) for d in DEFENCES for a in ATTACKS]
    with ProcessPoolExecutor(jobs) as pool:
        found = list(pool.map(one_run, *zip(*todo, strict=True), [runs] * len(todo)))
    write(found, result)
    return found


def report(runs: Path, result: Path) -> list[dict[str, Any]]:
    found = [summarize(d, a, runs / f"{d}-{a}") for d in DEFENCES for a in ATTACKS
             if (runs / f"{d}-{a}" / "metrics.jsonl").exists()]
    old = {(r["defence"], r["attack"]): r for r in (json.loads(result.read_text())["runs"]
                                                    if result.exists() else [])}
    for r in found:  # keep the run times measured by ``run``
        r["seconds"] = r["seconds"] or old.get((r["defence"], r["attack"]), {}).get("seconds")
    write(found, result)
    return found


def write(found: list[dict[str, Any]], result: Path) -> None:
    result.parent.mkdir(parents=True, exist_ok=True)
    result.write_text(json.dumps({"setting": {**RunConfig(**SETTING).to_json()},
                                  "defences": DEFENCES, "runs": found}, indent=1) + "\n")
    print(table(found))


def table(found: list[dict[str, Any]]) -> str:
    """Final global accuracy (%) at exits 1/2/3, and the mean's change against the clean run of
    the same defence; a dagger: rounds not committed by the safety net."""
    by = {(r["defence"], r["attack"]): r for r in found}
    head = "| attack | " + " | ".join(DEFENCES) + " |"
    lines = [head, "|" + "---|" * (len(DEFENCES) + 1)]
    for attack in ATTACKS:
        cells = []
        for defence in DEFENCES:
            r, clean = by.get((defence, attack)), by.get((defence, "none"))
            if r is None:
                cells.append("-")
                continue
            acc = "/".join(f"{100 * v:.1f}" for v in r["final"].values() if v is not None)
            delta = ("" if clean is None or attack == "none"
                     else f" ({100 * (r['final_mean'] - clean['final_mean']):+.1f})")
            dagger = f" [{len(r['not_committed'])} refused]" if r["not_committed"] else ""
            cells.append(acc + delta + dagger)
        lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["run", "report"])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--runs", type=Path, default=RUNS)
    parser.add_argument("--json", type=Path, default=RESULT)
    args = parser.parse_args()
    if args.command == "run":
        run(args.jobs, args.runs, args.json)
    else:
        report(args.runs, args.json)


if __name__ == "__main__":
    main()
