"""HypeMeFed: depth-wise FL plus hypernetwork-generated weights for the blocks a client could
not train (method.md, steps 5-7).

One hypernetwork per conv position per block transition (block k conv j -> block k+1 conv j).
Each round it trains on (source, target) pairs of the *same* client, from every participant that
trained both blocks; it then generates the missing convs of shallower clients, chained (a tier-1
client's block 3 is generated from its generated block 2). Every tensor is averaged over the
clients that trained or generated it. The generated weights go into the averaged state itself
(the authors' release wrote them into copies that never reached the model).

What is generated (``generate``, an ablation; the paper generates convs only):
- ``convs``: the conv weights, as the paper. Conv bias, BatchNorm and exit heads are averaged
  over the clients that trained them.
- ``convs+bn``: also each conv's per-channel vectors (conv bias, BatchNorm weight, bias, running
  mean and running variance), by a small MLP per (transition, conv position) from block k's five
  vectors, concatenated, to block k+1's. Running variances are mapped as logarithms, so that a
  generated variance is positive. (BatchNorm's batch counter is an integer: never generated.)
- ``all``: also exit heads: head k+1's linear layer from head k's, one small MLP applied to
  every class's row (weights and bias), so its size does not grow with the number of classes.

``residual``: map deviations from the global model instead of weights: the hypernetwork learns
block k+1's deviation (client minus the global model it started from) from block k's, and a
generated tensor is the global one plus the predicted deviation. A hypernetwork that predicts
nothing then generates the global tensor (what a shallow client holds) instead of noise; it is
how to ask whether generation adds anything on top of the authors' release's stale averaging
(with ``untrained="global"``, the same aggregate whenever the predicted deviation is zero).
The paper maps weights; this is an ablation. Relative errors in the metrics are then of the
deviation.

``reset``: re-initialise the hypernetworks (same seed) at the start of every round instead of
keeping them, as the paper does, across rounds.

A hypernetwork that has not been trained (this round, with ``reset``) generates nothing: its
output would be noise.

``untrained``: what a shallow client adds to the average for a deep tensor it neither trained
nor got generated (an open choice of the paper, method.md): nothing (``skip``, the default: each
tensor is averaged over the clients that trained or generated it), or the global model's value
(``global``). With ``global`` and no tensor generated (the gate shut) the aggregate is
``hypemefed-release``'s, what the authors' release computes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from cloud.aggregation import RobustAccumulator, RunningMean
from cloud.config import GENERATE
from cloud.hypernet import RIDGE, SWEEPS, NaiveHypernet, build_hypernet, fit
from cloud.strategies.base import ClientUpdate, Strategy
from common.models import NUM_BLOCKS, State, build_model

CONVS = ("conv1", "conv2")
SMALL_HIDDEN = 64  # the MLPs for per-channel vectors and head rows
LOG_EPS = 1e-8  # running variances are mapped as log(var + eps)


def conv_name(block: int, conv: str) -> str:
    """State name of a conv weight in exit block ``block`` (1-based)."""
    return f"blocks.{block - 1}.{conv}.weight"


def vector_names(block: int, j: int) -> tuple[str, ...]:
    """The per-channel vectors of conv ``j`` (1-based) of exit block ``block``."""
    b = f"blocks.{block - 1}"
    return (f"{b}.conv{j}.bias", f"{b}.bn{j}.weight", f"{b}.bn{j}.bias",
            f"{b}.bn{j}.running_mean", f"{b}.bn{j}.running_var")


def head_names(block: int) -> tuple[str, str]:
    return f"heads.{block - 1}.fc.weight", f"heads.{block - 1}.fc.bias"


def transitions() -> list[tuple[str, str]]:
    """(source, target) conv names, shallow first: the hypernetworks' order of generation."""
    return [(conv_name(k, c), conv_name(k + 1, c)) for k in range(1, NUM_BLOCKS) for c in CONVS]


@dataclass(frozen=True)
class Mapping:
    """One hypernetwork: block k's tensors ``sources`` -> block k+1's ``targets``."""

    name: str  # in the metrics: the target conv's name, or e.g. blocks.1.bn1, heads.1
    kind: str  # "conv", "vectors" or "head"
    sources: tuple[str, ...]
    targets: tuple[str, ...]

    @property
    def key(self) -> str:
        """ModuleDict keys cannot contain dots."""
        return self.name.replace(".", "_")


def mappings(generate: str = "convs") -> list[Mapping]:
    """Every hypernetwork of a ``generate`` setting. Each kind is listed shallow first, so that
    chained generation (block 3 from a generated block 2) works; convs first, so their seeded
    initialisation does not depend on ``generate``."""
    if generate not in GENERATE:
        raise ValueError(f"unknown generate setting {generate!r}; choose one of "
                         f"{', '.join(GENERATE)}")
    if generate == "distill":  # no hypernetworks: cloud/distillation.py fills the deep exits
        return []
    steps = range(1, NUM_BLOCKS)
    out = [Mapping(t, "conv", (s,), (t,)) for s, t in transitions()]
    if generate != "convs":
        out += [Mapping(f"blocks.{k}.bn{j}", "vectors", vector_names(k, j), vector_names(k + 1, j))
                for k in steps for j in (1, 2)]
    if generate == "all":
        out += [Mapping(f"heads.{k}", "head", head_names(k), head_names(k + 1)) for k in steps]
    return out


def pack(mapping: Mapping, state: State, names: tuple[str, ...]) -> torch.Tensor:
    """The tensors ``names`` of ``state`` as one hypernetwork input or target."""
    if mapping.kind == "conv":
        return state[names[0]]
    if mapping.kind == "vectors":
        *plain, var = (state[n] for n in names)
        return torch.cat([*plain, torch.log(var.clamp_min(0) + LOG_EPS)], dim=-1)
    weight, bias = state[names[0]], state[names[1]]
    return torch.cat([weight, bias[..., None]], dim=-1)  # one row per class


def unpack(mapping: Mapping, out: torch.Tensor) -> State:
    """Inverse of ``pack`` for the mapping's targets."""
    if mapping.kind == "conv":
        return {mapping.targets[0]: out}
    if mapping.kind == "vectors":
        *plain, var = out.chunk(len(mapping.targets), dim=-1)
        return dict(zip(mapping.targets, [*plain, (var.exp() - LOG_EPS).clamp_min(0)],
                        strict=True))
    return {mapping.targets[0]: out[..., :-1], mapping.targets[1]: out[..., -1]}


def training_pairs(updates: list[ClientUpdate], mapping: Mapping, device: str = "cpu",
                   origin: State | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Packed source and target of every client that holds all of both; with ``origin``, their
    deviations from ``origin``'s."""
    both = [u for u in updates if all(n in u.state for n in mapping.sources + mapping.targets)]

    def packed(names: tuple[str, ...]) -> list[torch.Tensor]:
        base = 0.0 if origin is None else pack(mapping, origin, names)  # once, not per client
        return [(pack(mapping, u.state, names) - base).to(device) for u in both]

    return packed(mapping.sources), packed(mapping.targets)


@dataclass
class HypeMeFed(Strategy):
    hypernet: str = "lrf"
    rank: int = 100
    hidden: int | None = None
    epochs: int = 0  # full-batch Adam epochs after the closed-form solve (cloud/hypernet.py)
    lr: float = 5e-4
    ridge: float = RIDGE
    sweeps: int = SWEEPS  # 0: Adam only, no closed-form solve
    reset: bool = False  # re-initialise the hypernetworks every round
    gate: bool = False  # generate only where it beats the trainers' mean out of sample
    residual: bool = False  # map deviations from the global model, not weights
    generate: str = "convs"  # or "convs+bn", "all"
    untrained: str = "skip"  # or "global" (module docstring)
    seed: int = 0
    device: str = "cpu"  # where the hypernetworks train; states stay on the CPU
    name: str = field(default="hypemefed", init=False)

    def __post_init__(self) -> None:
        self.mappings = mappings(self.generate)
        self.generated_names = {n for m in self.mappings for n in m.targets}
        self.shapes = {k: tuple(v.shape) for k, v in build_model(self.model).state_dict().items()}
        self.initialise()

    def initialise(self) -> None:
        """Hypernetworks from the seed, fresh optimizers, nothing trained."""
        with torch.random.fork_rng(devices=[]):  # same seed, same initial hypernetworks
            torch.manual_seed(self.seed)
            self.hypernets = torch.nn.ModuleDict({m.key: self.build(m) for m in self.mappings})
        self.hypernets.to(self.device)
        self.optimizers = {k: torch.optim.Adam(h.parameters(), lr=self.lr)
                           for k, h in self.hypernets.items()}
        self.rounds_trained = {k: 0 for k in self.hypernets}
        self.gate_open: dict[str, bool] = {}  # this round's out-of-sample verdicts (``gate``)

    def build(self, m: Mapping) -> torch.nn.Module:
        if m.kind == "conv":
            return build_hypernet(self.hypernet, self.shapes[m.sources[0]],
                                  self.shapes[m.targets[0]], rank=self.rank, hidden=self.hidden)
        if m.kind == "vectors":
            channels = self.shapes[m.sources[0]][0], self.shapes[m.targets[0]][0]
            return NaiveHypernet((len(m.sources) * channels[0],),
                                 (len(m.targets) * channels[1],), hidden=SMALL_HIDDEN)
        rows = self.shapes[m.sources[0]][1] + 1, self.shapes[m.targets[0]][1] + 1
        return NaiveHypernet((rows[0],), (rows[1],), hidden=SMALL_HIDDEN)

    def generator_for(self, target: str) -> torch.nn.Module:
        """The hypernetwork generating conv weight ``target``."""
        return self.hypernets[target.replace(".", "_")]

    def needed_tensors(self) -> set[str]:
        """The names the server step reads from updates (a streaming cloud keeps only these)."""
        return {n for m in self.mappings for n in m.sources + m.targets}

    def train_hypernets(self, updates: list[ClientUpdate], server_round: int,
                        global_state: State) -> dict[str, Any]:
        if self.reset:
            self.initialise()
        pairs, losses, errors, gates = {}, {}, {}, {}
        self.gate_open = {}
        origin = global_state if self.residual else None
        for m in self.mappings:
            sources, targets = training_pairs(updates, m, self.device, origin)
            pairs[m.name] = len(sources)
            if self.gate:
                previous = pack(m, global_state, m.targets).to(self.device)
                gates[m.name] = self.out_of_sample_check(m, sources, targets, previous)
                self.gate_open[m.key] = gates[m.name]["open"]
            if sources:
                result = fit(self.hypernets[m.key], self.optimizers[m.key], sources, targets,
                             self.epochs, ridge=self.ridge, sweeps=self.sweeps)
                losses[m.name], errors[m.name] = result.loss, result.relative_error
                self.rounds_trained[m.key] += 1
        metrics = {"hypernet_pairs": pairs, "hypernet_loss": losses, "hypernet_rel_err": errors}
        if self.gate:
            metrics["hypernet_gate"] = gates
        return metrics

    @torch.no_grad()
    def out_of_sample_check(self, m: Mapping, sources: list[torch.Tensor],
                            targets: list[torch.Tensor], previous: torch.Tensor
                            ) -> dict[str, Any]:
        """Before it trains on them, this round's pairs are new clients to the hypernetwork:
        its relative error on them against those of the two trivial predictors of a client's
        target, the mean of the *other* trainers' targets (what the trained-only average gives
        a shallow client's block) and ``previous``, the global model's tensor (what the client
        holds). A generated tensor can only help the aggregate if it beats both; with fewer
        than two pairs, or never trained, the gate stays shut. ``sources`` and ``targets`` are
        as the hypernetwork sees them (deviations from ``previous``'s model with ``residual``);
        the errors are of the weights."""
        if len(targets) < 2 or not self.rounds_trained[m.key]:
            return {"open": False, "generated_err": None, "mean_err": None, "global_err": None}
        hnet = self.hypernets[m.key].eval()
        base = previous if self.residual else 0.0  # ``offset`` of the targets
        t = (torch.stack(targets) + base).flatten(1)
        gen = (torch.stack([hnet(s) for s in sources]) + base).flatten(1)
        others = (t.sum(0, keepdim=True) - t) / (len(t) - 1)
        norm = t.norm(dim=1)

        def err(pred: torch.Tensor) -> float:
            return float(((pred - t).norm(dim=1) / norm).mean())

        gen_err, mean_err = err(gen), err(others)
        global_err = err(previous.to(t).flatten().unsqueeze(0))
        return {"open": gen_err < min(mean_err, global_err), "generated_err": gen_err,
                "mean_err": mean_err, "global_err": global_err}

    def offset(self, m: Mapping, global_state: State, names: tuple[str, ...]
               ) -> torch.Tensor | float:
        """What the hypernetworks' inputs and outputs are relative to: with ``residual`` the
        global model's packed ``names``, else nothing."""
        return pack(m, global_state, names).to(self.device) if self.residual else 0.0

    @torch.no_grad()
    def generate_missing(self, state: State, global_state: State) -> State:
        """The tensors ``state`` lacks that the hypernetworks generate, chained from its deepest
        block (``global_state``: the model the round started from, for ``residual``)."""
        known, generated = dict(state), {}
        for m in self.mappings:
            if (m.targets[0] in known or not all(n in known for n in m.sources)
                    or not self.rounds_trained[m.key]
                    or (self.gate and not self.gate_open.get(m.key, False))):
                continue
            hnet = self.hypernets[m.key].eval()
            source = pack(m, known, m.sources).to(self.device)
            out = (hnet(source - self.offset(m, global_state, m.sources))
                   + self.offset(m, global_state, m.targets))
            for name, value in unpack(m, out).items():
                known[name] = generated[name] = value.cpu()  # chained inputs: one device
        return generated

    def contribution(self, global_state: State, update: ClientUpdate) -> State:
        """What it trained; with ``untrained="global"`` also the global value of every tensor it
        lacks that no hypernetwork generates (those are settled in ``add_generated``)."""
        if self.untrained == "skip":
            return update.state
        stale = {k: v for k, v in global_state.items()
                 if k not in update.state and k not in self.generated_names}
        return {**stale, **update.state}

    def aggregate(self, global_state: State, updates: list[ClientUpdate], server_round: int
                  ) -> tuple[State, dict[str, Any]]:
        acc = self.accumulator(global_state)
        for u in updates:
            acc.add(self.contribution(global_state, u), self.weight(u))
        metrics = self.add_generated(acc, updates, server_round)
        return acc.result(), metrics

    def add_generated(self, acc: RunningMean | RobustAccumulator, updates: list[ClientUpdate],
                      server_round: int) -> dict[str, Any]:
        """The server step: train the hypernetworks on ``updates`` (the tensors named by
        ``needed_tensors`` suffice), then add every client's generated tensors to ``acc``;
        returns the metrics."""
        start = time.perf_counter()
        metrics = self.train_hypernets(updates, server_round, acc.reference)
        generated = 0
        for u in updates:
            extra = self.generate_missing(u.state, acc.reference)
            generated += len(extra)
            if self.untrained == "global":  # what could have been generated but was not
                extra |= {k: acc.reference[k] for k in self.generated_names
                          if k not in u.state and k not in extra}
            acc.add(extra, self.weight(u))
        metrics["hypernet_s"] = time.perf_counter() - start
        metrics["generated_tensors"] = generated
        unpaired = [t for t, n in metrics["hypernet_pairs"].items() if n == 0]
        if unpaired:
            metrics["note"] = ("no participant trained both blocks for " + ", ".join(unpaired)
                               + ": those hypernetworks were not trained this round")
        return metrics

    # -- checkpointing: hypernetwork weights, Adam state, and how often each was trained --
    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"hypernet.{k}": v for k, v in self.hypernets.state_dict().items()}
        groups = {}
        for key, opt in self.optimizers.items():
            sd = opt.state_dict()
            groups[key] = sd["param_groups"]
            for idx, st in sd["state"].items():
                for name, value in st.items():
                    tensors[f"optim.{key}.{idx}.{name}"] = torch.as_tensor(value)
        return tensors, {"rounds_trained": self.rounds_trained, "param_groups": groups}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.hypernets.load_state_dict(
            {k[len("hypernet."):]: v for k, v in tensors.items() if k.startswith("hypernet.")})
        for key, opt in self.optimizers.items():
            state: dict[int, dict[str, torch.Tensor]] = {}
            prefix = f"optim.{key}."
            for name, value in tensors.items():
                if name.startswith(prefix):
                    idx, field_name = name[len(prefix):].split(".", 1)
                    state.setdefault(int(idx), {})[field_name] = value
            opt.load_state_dict({"state": state, "param_groups": meta["param_groups"][key]})
        self.rounds_trained = {k: int(v) for k, v in meta["rounds_trained"].items()}
