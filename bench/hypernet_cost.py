"""Hypernetwork cost: naive vs LRF, one round's training and generation, on real client weights.

For the svhn, stl10 and unimib models, four ways to do one round of HypeMeFed's server step
(train the 4 conv hypernetworks on the round's pairs, then generate the missing convs of the
round's 3 tier-1 and 4 tier-2 participants):
- naive: the authors' naive hypernetwork (hidden 64), 25 epochs of batch-1 Adam steps;
- lrf-reference: the straightforward LRF (rank 100, hidden 512), 25 epochs of batch-1 Adam
  steps with an SVD in every forward, as the authors' release;
- lrf-batch1: the same with each source factorised once per round and a factor's rows mapped
  as a batch (this repository before the change);
- lrf: the production step (cloud/hypernet.py ``fit``): all pairs at once, one SVD per source,
  closed-form output layers anchored to the previous round, hidden 128, no Adam epochs.
Measured per model and variant: parameters; peak memory; the median wall time of a round
(variants interleaved round by round in one process, so load from other processes hits all
alike); the generation error on held-out clients (mean over clients and the 4 transitions of
||generated - trained|| / ||trained||, each round's clients, after that round's training).

Training pairs: real local training (cached in runs/bench-hypernet/). From a seeded initial model
after one central epoch, ``--rounds`` rounds of depth-wise FL over 30 clients: each round 10
participants (tiers 3/4/3, so 7 pairs for block 1->2 and 3 for block 2->3, as the issue's
reference) and 3 held-out tier-3 clients, each trained 2 local epochs from the round's global
model; held-out clients never train a hypernetwork. Data: HAPT (shipped) for the unimib model,
one client per subject; real CIFAR-10 for the svhn model (32x32) and, upsampled to 96x96, for
the stl10 model (SVHN and STL-10 are not available offline), Dirichlet 0.5.

Peak memory: bytes of live torch tensors, which is all a hypernetwork step allocates beyond the
clients' weights it is given (the same for every variant): the persistent state counted
tensor by tensor (parameters, gradients, optimizer state) plus the peak of the allocations
during one warm round (torch.profiler's allocation trace, replayed in order), so the Python
runtime and libraries are not counted. Batch-1 variants run 1 epoch in that round (every step
allocates the same, so the peak does not depend on the epoch count).

Naive time: one epoch per round is timed and the round extrapolated to 25 epochs (epochs cost
the same; generation is timed as is). Its error needs all 25 epochs: measured for the models in
``--naive-error`` (default svhn; about 85 s a round for svhn, 380 s for unimib and stl10).

    .venv/bin/python bench/hypernet_cost.py          # ~21 min on 2 busy cores with the pairs
                                                     # cached; their first run adds ~15 min
    .venv/bin/python bench/hypernet_cost.py --quick  # svhn only, 1 repeat, ~4 min
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cloud.aggregation import average_states  # noqa: E402
from cloud.federation import seed_of  # noqa: E402
from cloud.hypernet import build_hypernet, conv_to_matrix  # noqa: E402
from cloud.strategies.base import ClientTask, ClientUpdate  # noqa: E402
from cloud.strategies.hypemefed import HypeMeFed, transitions  # noqa: E402
from common.data import load_dataset  # noqa: E402
from common.models import State, build_model, tier_state  # noqa: E402
from common.partition import partition  # noqa: E402
from common.training import TrainConfig, train_local, train_task  # noqa: E402

MODELS = ("svhn", "stl10", "unimib")
CIFAR_SMALL = ROOT.parent / "shared" / "data" / "cifar10" / "cifar10_small_uint8.npz"
CACHE = ROOT / "runs" / "bench-hypernet"
OUT = ROOT / "bench" / "results" / "hypernet_cost.json"
TIER_MIX = (3, 4, 3)  # participants per tier in a round, as the authors' svhn/stl10 setting
HELD_OUT = 3  # tier-3 clients per round whose pairs only measure the generation error
AUTHORS_EPOCHS = 25
RANK = 100
# The issue's reference, same machine, a straightforward implementation (s per round, params).
ISSUE = {"svhn": {"lrf-reference": (11.6, 3.3e6), "naive": (84.0, 89.6e6)},
         "unimib": {"lrf-reference": (25.9, 6.6e6), "naive": (379.0, 358.3e6)}}
TARGETS = {"memory_less": 0.99, "vs_naive": 20.0, "vs_reference": 5.0}


# ---------------------------------------------------------------------------------------------
# Training pairs from real local training

@dataclass(frozen=True)
class PairSource:
    """Where a model's client weights come from: the data it trains on and how."""

    data: str  # described in the report
    local_epochs: int
    batch_size: int
    lr: float
    samples_per_client: int  # cap, so the slow stl10 model stays affordable on a CPU
    warmup_samples: int  # one central epoch on this many samples before round 1
    upsample: int = 1  # CIFAR-10 32x32 -> 96x96 for the stl10 model


PAIR_SOURCES = {
    "svhn": PairSource("CIFAR-10 (real, 32x32; SVHN is not available offline), Dirichlet 0.5",
                       2, 32, 5e-4, 300, 4000),
    "stl10": PairSource("CIFAR-10 upsampled to 96x96 (STL-10 is not available offline), "
                        "Dirichlet 0.5", 2, 16, 5e-4, 48, 480, upsample=3),
    "unimib": PairSource("HAPT accelerometer windows (shipped), one client per subject",
                         2, 16, 5e-3, 10_000, 10_000),
}


def client_data(model: str) -> tuple[torch.Tensor, torch.Tensor, list[np.ndarray]]:
    """(x, y, each client's indices): 30 clients."""
    if model == "unimib":
        d = load_dataset("hapt")
        shares = partition(d.y, 30, "subject", groups=d.groups)
        return torch.from_numpy(d.x), torch.from_numpy(d.y), shares
    with np.load(CIFAR_SMALL) as f:
        x = torch.from_numpy(f["x_train"]).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        y = torch.from_numpy(f["y_train"].astype(np.int64))
    return x, y, partition(y.numpy(), 30, "dirichlet", alpha=0.5, seed=0, min_size=20)


def inputs(x: torch.Tensor, upsample: int) -> torch.Tensor:
    if upsample == 1:
        return x
    return F.interpolate(x, scale_factor=upsample, mode="bilinear", align_corners=False)


def conv_weights(state: State) -> State:
    """The exit blocks' conv weights: all the hypernetworks see of a client."""
    return {k: v for k, v in state.items() if k.startswith("blocks.") and "conv" in k
            and k.endswith(".weight")}


def warmed_up_global(model: str, src: PairSource, x: torch.Tensor, y: torch.Tensor) -> State:
    """The seeded initial model after one central epoch: a model some way into training."""
    torch.manual_seed(0)
    net = build_model(model)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))[:src.warmup_samples]
    cfg = TrainConfig(1, src.batch_size, src.lr)
    train_local(net, inputs(x[idx], src.upsample), y[idx], cfg, torch.Generator().manual_seed(2))
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def round_clients(seed: int, shares: list[np.ndarray]) -> list[tuple[int, int, bool]]:
    """(client, tier, held out) for one round: participants 3/4/3 and HELD_OUT tier-3 clients."""
    order = np.random.default_rng(seed).permutation(len(shares)).tolist()
    tiers = [1] * TIER_MIX[0] + [2] * TIER_MIX[1] + [3] * TIER_MIX[2] + [3] * HELD_OUT
    picked = zip(order[:len(tiers)], tiers, strict=True)
    return [(c, t, i >= sum(TIER_MIX)) for i, (c, t) in enumerate(picked)]


def simulate_rounds(model: str, rounds: int, log: Callable[[str], None] = print
                    ) -> list[dict[str, Any]]:
    """Depth-wise FL rounds; per round the global conv weights it started from and every
    client's conv weights, tier and held-out flag.

    The global model moves by plain depth-wise averaging of the participants (held-out clients
    excluded), so the pairs are the same for every hypernetwork variant measured on them.
    """
    src = PAIR_SOURCES[model]
    x, y, shares = client_data(model)
    state = warmed_up_global(model, src, x, y)
    cfg = TrainConfig(src.local_epochs, src.batch_size, src.lr)
    out = []
    for rnd in range(1, rounds + 1):
        clients, contributions = [], []
        start_convs = conv_weights(state)
        for client, tier, held_out in round_clients(seed_of(7, rnd), shares):
            idx = torch.from_numpy(shares[client][:src.samples_per_client])
            start = time.perf_counter()
            trained, _ = train_task(build_model(model, depth=tier), tier_state(state, tier),
                                    inputs(x[idx], src.upsample), y[idx], cfg,
                                    seed_of(7, rnd, client))
            log(f"  {model} round {rnd} client {client} tier {tier}: {len(idx)} samples, "
                f"{time.perf_counter() - start:.1f} s")
            clients.append({"tier": tier, "held_out": held_out, "convs": conv_weights(trained)})
            if not held_out:
                contributions.append((trained, 1.0))
        state = average_states(state, contributions)
        out.append({"global": start_convs, "clients": clients})
    return out


def cached_rounds(model: str, rounds: int, log: Callable[[str], None] = print
                  ) -> list[dict[str, Any]]:
    """The rounds of ``simulate_rounds``, from the cache when there."""
    path = CACHE / f"{model}_r{rounds}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    data = simulate_rounds(model, rounds, log)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, path)
    return data


# ---------------------------------------------------------------------------------------------
# The variants: one round = train on the participants' pairs, generate for every participant

def participant_updates(clients: list[dict[str, Any]]) -> list[ClientUpdate]:
    return [ClientUpdate(ClientTask(i, c["tier"], c["tier"]), 1, c["convs"])
            for i, c in enumerate(clients) if not c["held_out"]]


class AuthorsStep:
    """The authors' step: ``epochs`` epochs of batch-1 Adam (5e-4) over the shuffled pairs.
    LRF factorises in every forward (``svd_once`` False, as the release) or once per round."""

    def __init__(self, model: str, kind: str, hidden: int, epochs: int, svd_once: bool) -> None:
        shapes = {k: tuple(v.shape) for k, v in build_model(model).state_dict().items()}
        torch.manual_seed(0)
        self.hypernets = {t: build_hypernet(kind, shapes[s], shapes[t], rank=RANK, hidden=hidden)
                          for s, t in transitions()}
        self.optimizers = {t: torch.optim.Adam(h.parameters(), lr=5e-4)
                           for t, h in self.hypernets.items()}
        self.epochs, self.svd_once, self.trained = epochs, svd_once, set()

    def train(self, updates: list[ClientUpdate], server_round: int, start: State) -> None:
        order = torch.Generator().manual_seed(server_round)
        for s, t in transitions():
            both = [u.state for u in updates if s in u.state and t in u.state]
            if both:
                self.fit(self.hypernets[t], self.optimizers[t], [b[s] for b in both],
                         [b[t] for b in both], order)
                self.trained.add(t)

    def fit(self, h: torch.nn.Module, opt: torch.optim.Optimizer, sources: list[torch.Tensor],
            targets: list[torch.Tensor], order: torch.Generator) -> None:
        with torch.no_grad():
            factors = [h.factorize(x) for x in sources] if self.svd_once else None
        h.train()
        for _ in range(self.epochs):
            for i in torch.randperm(len(sources), generator=order).tolist():
                out = h.from_factors(*factors[i]) if factors else h(sources[i])
                loss = torch.mean((out - targets[i]) ** 2)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

    @torch.no_grad()
    def generate(self, state: State, start: State) -> State:
        known, out = dict(state), {}
        for s, t in transitions():
            if t not in known and s in known and t in self.trained:
                known[t] = out[t] = self.hypernets[t].eval()(known[s])
        return out

    def generator_for(self, target: str) -> torch.nn.Module:
        return self.hypernets[target]

    def modules(self) -> list[torch.nn.Module]:
        return list(self.hypernets.values())

    def optimizer_list(self) -> list[torch.optim.Optimizer]:
        return list(self.optimizers.values())


class ProductionStep:
    """HypeMeFed's own server step with its defaults (cloud/strategies/hypemefed.py)."""

    def __init__(self, model: str, **options: Any) -> None:
        self.strategy = HypeMeFed(model=model, **options)

    def train(self, updates: list[ClientUpdate], server_round: int, start: State) -> None:
        self.strategy.train_hypernets(updates, server_round, start)

    def generate(self, state: State, start: State) -> State:
        return self.strategy.generate_missing(state, start)

    def generator_for(self, target: str) -> torch.nn.Module:
        return self.strategy.generator_for(target)

    def modules(self) -> list[torch.nn.Module]:
        return [self.strategy.hypernets]

    def optimizer_list(self) -> list[torch.optim.Optimizer]:
        return list(self.strategy.optimizers.values())


@dataclass(frozen=True)
class Variant:
    name: str
    what: str
    make: Callable[[str, int], Any]  # (model, epochs) -> step; epochs ignored by production
    batch1: bool  # timed at fewer epochs and extrapolated when ``timed_epochs`` < 25

VARIANTS = {v.name: v for v in (
    Variant("naive", "naive, hidden 64, batch-1 Adam, 25 epochs",
            lambda m, e: AuthorsStep(m, "naive", 64, e, svd_once=True), True),
    Variant("lrf-reference", "LRF r100 h512, batch-1 Adam, 25 epochs, SVD every forward",
            lambda m, e: AuthorsStep(m, "lrf", 512, e, svd_once=False), True),
    Variant("lrf-batch1", "LRF r100 h512, batch-1 Adam, 25 epochs, SVD once a round",
            lambda m, e: AuthorsStep(m, "lrf", 512, e, svd_once=True), True),
    Variant("lrf", "production: LRF r100 h128, all pairs at once, closed-form output layers",
            lambda m, e: ProductionStep(m), False),
)}


def run_round(step: Any, rnd: dict[str, Any], server_round: int) -> tuple[float, float]:
    """(training s, generation s) of one round; ``start``: the round's global convs."""
    updates = participant_updates(rnd["clients"])
    start = time.perf_counter()
    step.train(updates, server_round, rnd["global"])
    trained = time.perf_counter()
    for u in updates:
        step.generate(u.state, rnd["global"])
    return trained - start, time.perf_counter() - trained


# ---------------------------------------------------------------------------------------------
# Generation error on held-out clients, and what to compare it with

def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def held_out_pairs(rnd: dict[str, Any], source: str, target: str
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(c["convs"][source], c["convs"][target]) for c in rnd["clients"] if c["held_out"]]


@torch.no_grad()
def generation_error(step: Any, rnd: dict[str, Any]) -> dict[str, float]:
    out = {}
    for s, t in transitions():
        h = step.generator_for(t).eval()
        out[t] = float(np.mean([rel(h(x), y) for x, y in held_out_pairs(rnd, s, t)]))
    return out


def best_rank_r(w: torch.Tensor, rank: int) -> torch.Tensor:
    u, sv, vh = torch.linalg.svd(conv_to_matrix(w), full_matrices=False)
    m = (u[:, :rank] * sv[:rank]) @ vh[:rank]
    co, ci, kh, kw = w.shape
    return m.reshape(co, kh, ci, kw).transpose(1, 2)


def references(rnd: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Errors of: the global block k+1 the round started from (what depth-wise FL keeps), the
    mean of the round's training targets, and the best rank-100 approximation of the held-out
    target itself (no LRF output can do better)."""
    out: dict[str, dict[str, float]] = {"global": {}, "mean_target": {}, "rank_floor": {}}
    for s, t in transitions():
        pairs = held_out_pairs(rnd, s, t)
        train = [c["convs"][t] for c in rnd["clients"] if not c["held_out"] and t in c["convs"]
                 and s in c["convs"]]
        mean = torch.stack(train).mean(0)
        out["global"][t] = float(np.mean([rel(rnd["global"][t], y) for _, y in pairs]))
        out["mean_target"][t] = float(np.mean([rel(mean, y) for _, y in pairs]))
        out["rank_floor"][t] = float(np.mean([rel(best_rank_r(y, RANK), y) for _, y in pairs]))
    return out


# ---------------------------------------------------------------------------------------------
# Measurements

def param_count(step: Any) -> int:
    return sum(p.numel() for m in step.modules() for p in m.parameters())


def state_bytes(step: Any) -> int:
    """Bytes the step keeps between rounds: parameters, gradients, optimizer state."""
    n = 0
    for m in step.modules():
        for p in m.parameters():
            n += p.numel() * p.element_size()
            if p.grad is not None:
                n += p.grad.numel() * p.grad.element_size()
    for opt in step.optimizer_list():
        for st in opt.state.values():
            n += sum(v.numel() * v.element_size() for v in st.values()
                     if isinstance(v, torch.Tensor))
    return n


def allocation_peak(prof: profile) -> int:
    """Peak, over the profiled region, of bytes allocated minus freed (CPU tensors)."""
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def peak_memory(variant: Variant, model: str, rounds: list[dict[str, Any]]) -> dict[str, int]:
    """Persistent state after a first round, plus the allocation peak of a second round."""
    step = variant.make(model, 1)
    run_round(step, rounds[0], 1)
    # Gradients left by the last step are freed by the next round's first zero_grad before
    # backward allocates new ones, and the profiler does not see frees of blocks allocated
    # before it started: drop them here, so that the round's allocations count them once.
    for m in step.modules():
        for p in m.parameters():
            p.grad = None
    persistent = state_bytes(step)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run_round(step, rounds[1 % len(rounds)], 2)
    transient = allocation_peak(prof)
    return {"persistent_bytes": persistent, "round_peak_bytes": transient,
            "peak_bytes": persistent + transient}


def time_and_error(model: str, epochs: dict[str, int], rounds: list[dict[str, Any]],
                   repeats: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Every variant (name -> epochs of its batch-1 steps) runs all rounds, hypernetworks kept
    across rounds, ``repeats`` times; the variants take turns round by round, in an order
    rotated every repeat. Batch-1 variants timed at fewer than 25 epochs are extrapolated."""
    names = list(epochs)
    out = {n: {"train_s": [], "generate_s": [], "round_s": [], "errors": [],
               "extrapolated": VARIANTS[n].batch1 and epochs[n] != AUTHORS_EPOCHS}
           for n in names}
    for rep in range(repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]
        steps = {n: VARIANTS[n].make(model, epochs[n]) for n in order}
        for r, rnd in enumerate(rounds, start=1):
            for n in order:
                train_s, gen_s = run_round(steps[n], rnd, r)
                row = out[n]
                scale = AUTHORS_EPOCHS / epochs[n] if row["extrapolated"] else 1.0
                row["train_s"].append(train_s)
                row["generate_s"].append(gen_s)
                row["round_s"].append(train_s * scale + gen_s)
                if rep == 0 and not row["extrapolated"]:
                    row["errors"].append(generation_error(steps[n], rnd))
                log(f"  {model} repeat {rep + 1} round {r} {n}: train {train_s:.2f} s, "
                    f"generate {gen_s:.2f} s")
    return out


def naive_full(model: str, rounds: list[dict[str, Any]], log: Callable[[str], None]
               ) -> tuple[list[dict[str, float]], list[float]]:
    """The naive variant's errors after all 25 epochs, and its measured round times (a check
    of the extrapolation, though not interleaved with the other variants)."""
    step = VARIANTS["naive"].make(model, AUTHORS_EPOCHS)
    errors, seconds = [], []
    for r, rnd in enumerate(rounds, start=1):
        seconds.append(sum(run_round(step, rnd, r)))
        errors.append(generation_error(step, rnd))
        log(f"  {model} naive, all 25 epochs, round {r}: {seconds[-1]:.0f} s")
    return errors, seconds


def where_time_goes(model: str, name: str, rounds: list[dict[str, Any]], epochs: int,
                    rows: int = 8) -> list[dict[str, Any]]:
    """torch.profiler's top operators (self CPU time) over one warm round."""
    step = VARIANTS[name].make(model, epochs)
    run_round(step, rounds[0], 1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_round(step, rounds[1 % len(rounds)], 2)
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops) or 1
    return [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6,
             "share": e.self_cpu_time_total / total, "calls": e.count} for e in ops[:rows]]


# ---------------------------------------------------------------------------------------------
# Report

def mean_error(errors: list[dict[str, float]]) -> float | None:
    return float(np.mean([np.mean(list(e.values())) for e in errors])) if errors else None


def summarise(model: str, timing: dict[str, Any], memory: dict[str, dict[str, int]],
              params: dict[str, int], naive_errors: list[dict[str, float]] | None
              ) -> dict[str, Any]:
    rows = {}
    for n, t in timing.items():
        errors = t["errors"] or (naive_errors if n == "naive" and naive_errors else [])
        rows[n] = {"what": VARIANTS[n].what, "params": params[n], **memory[n],
                   "round_s": statistics.median(t["round_s"]),
                   "train_s": statistics.median(t["train_s"]),
                   "generate_s": statistics.median(t["generate_s"]),
                   "round_s_runs": t["round_s"],
                   "extrapolated": t["extrapolated"],
                   "error": mean_error(errors), "error_per_round": errors}
    for r in rows.values():
        if "naive" in rows:
            r["memory_less_than_naive"] = 1 - r["peak_bytes"] / rows["naive"]["peak_bytes"]
            r["speedup_vs_naive"] = rows["naive"]["round_s"] / r["round_s"]
        if "lrf-reference" in rows:
            r["speedup_vs_reference"] = rows["lrf-reference"]["round_s"] / r["round_s"]
    return {"model": model, "variants": rows}


def judge(summary: dict[str, Any]) -> dict[str, Any]:
    rows = summary["variants"]
    if not {"lrf", "naive", "lrf-reference"} <= set(rows):
        return {}
    lrf, ref = rows["lrf"], rows["lrf-reference"]
    return {"memory_99pc_less_than_naive": lrf["memory_less_than_naive"] >= TARGETS["memory_less"],
            "20x_faster_than_naive": lrf["speedup_vs_naive"] >= TARGETS["vs_naive"],
            "5x_faster_than_reference": lrf["speedup_vs_reference"] >= TARGETS["vs_reference"],
            "error_not_above_reference": lrf["error"] <= ref["error"]}


def fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def print_table(summaries: list[dict[str, Any]], refs: dict[str, dict[str, float]]) -> None:
    print("\n| model | variant | params | peak MiB | round s (median) | vs naive | vs reference "
          "| held-out error |")
    print("|---|---|---|---|---|---|---|---|")
    for s in summaries:
        for n, r in s["variants"].items():
            star = "*" if r["extrapolated"] else ""
            print(f"| {s['model']} | {n} | {r['params'] / 1e6:.2f}M "
                  f"| {r['peak_bytes'] / 2**20:.1f} | {r['round_s']:.2f}{star} "
                  f"| {fmt(r.get('speedup_vs_naive'), '.0f')}x "
                  f"| {fmt(r.get('speedup_vs_reference'), '.1f')}x "
                  f"| {fmt(r['error'], '.3f')} |")
    print("* naive: 1 epoch timed per round, extrapolated to 25 (generation timed as is)")
    for s in summaries:
        if "naive_all_epochs_round_s" in s:
            print(f"  {s['model']}: naive with all 25 epochs, measured after the interleaved runs: "
                  f"{statistics.median(s['naive_all_epochs_round_s']):.1f} s a round (median)")
    print("\nReference errors (same held-out clients): global = the round's starting global block;"
          " mean = mean of the round's training targets; rank floor = best rank-100 "
          "approximation of the target itself")
    for model, r in refs.items():
        print(f"  {model}: global {r['global']:.3f}, mean target {r['mean_target']:.3f}, "
              f"rank floor {r['rank_floor']:.3f}")


def environment(threads: int) -> dict[str, Any]:
    return {"threads": threads, "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "load_average": os.getloadavg()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--naive-epochs", type=int, default=1,
                    help="epochs the naive variant is timed at (extrapolated to 25)")
    ap.add_argument("--naive-error", nargs="*", default=["svhn"], choices=MODELS,
                    help="models whose naive error is measured (all 25 epochs)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="svhn, 1 repeat, no naive error")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.repeats, args.naive_error = ["svhn"], 1, []
    torch.set_num_threads(args.threads)
    env = environment(args.threads)
    log = print
    summaries, refs, profiles = [], {}, {}
    for model in args.models:
        rounds = cached_rounds(model, args.rounds, log)
        per_round = [references(r) for r in rounds]
        refs[model] = {k: float(np.mean([np.mean(list(p[k].values())) for p in per_round]))
                       for k in per_round[0]}
        log(f"{model}: parameters and peak memory")
        params = {n: param_count(VARIANTS[n].make(model, 1)) for n in args.variants}
        memory = {n: peak_memory(VARIANTS[n], model, rounds) for n in args.variants}
        log(f"{model}: timing, {args.repeats} repeats x {len(rounds)} rounds")
        epochs = {n: args.naive_epochs if n == "naive" else AUTHORS_EPOCHS for n in args.variants}
        timing = time_and_error(model, epochs, rounds, args.repeats, log)
        naive_errors, naive_seconds = (naive_full(model, rounds, log)
                                       if model in args.naive_error else (None, None))
        summary = summarise(model, timing, memory, params, naive_errors)
        if naive_seconds:
            summary["naive_all_epochs_round_s"] = naive_seconds
        summary["targets_met"] = judge(summary)
        summary["references"] = refs[model]
        summaries.append(summary)
    slowest = max(summaries, key=lambda s: s["variants"].get("lrf", {}).get("round_s", 0))
    for name, epochs in (("lrf", AUTHORS_EPOCHS), ("lrf-reference", 2)):
        if name in args.variants:
            profiles[name] = where_time_goes(slowest["model"], name,
                                             cached_rounds(slowest["model"], args.rounds), epochs)
    print_table(summaries, refs)
    for s in summaries:
        print(f"targets, {s['model']}: {s['targets_met']}")
    for name, ops in profiles.items():
        print(f"\nwhere the time goes: {name}, {slowest['model']}, one warm round"
              + (" (2 epochs)" if name == "lrf-reference" else ""))
        for o in ops:
            print(f"  {o['op']:<32} {o['self_s']:8.3f} s {o['share']:6.1%} {o['calls']:>7} calls")
    env["load_average_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "environment": env, "rounds": args.rounds, "repeats": args.repeats,
        "naive_timed_epochs": args.naive_epochs, "issue_reference": ISSUE,
        "pairs": {m: PAIR_SOURCES[m].__dict__ for m in args.models},
        "models": summaries, "profile": {"model": slowest["model"], **profiles}}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
