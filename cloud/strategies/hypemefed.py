"""HypeMeFed: depth-wise FL plus hypernetwork-generated conv weights for the blocks a client
could not train (method.md, steps 5-7).

One hypernetwork per conv position per block transition (block k conv j -> block k+1 conv j).
Each round it trains on (source, target) pairs of the *same* client, from every participant that
trained both blocks; it then generates the missing convs of shallower clients, chained (a tier-1
client's block 3 is generated from its generated block 2). Every tensor is averaged over the
clients that trained or generated it; tensors nobody generates (conv bias, BatchNorm, heads) are
averaged over the clients that trained them. The generated weights go into the averaged state
itself (the authors' release wrote them into copies that never reached the model).

A hypernetwork that has never seen a training pair generates nothing: its output would be noise.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from cloud.aggregation import RunningMean
from cloud.hypernet import build_hypernet, fit, relative_error
from cloud.strategies.base import ClientUpdate, Strategy
from common.models import NUM_BLOCKS, State, build_model

CONVS = ("conv1", "conv2")


def conv_name(block: int, conv: str) -> str:
    """State name of a conv weight in exit block ``block`` (1-based)."""
    return f"blocks.{block - 1}.{conv}.weight"


def transitions() -> list[tuple[str, str]]:
    """(source, target) conv names, shallow first: the hypernetworks' order of generation."""
    return [(conv_name(k, c), conv_name(k + 1, c)) for k in range(1, NUM_BLOCKS) for c in CONVS]


def training_pairs(updates: list[ClientUpdate], source: str, target: str, device: str = "cpu"
                   ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Source and target weights of every client that trained both."""
    both = [u for u in updates if source in u.state and target in u.state]
    return [u.state[source].to(device) for u in both], [u.state[target].to(device) for u in both]


@dataclass
class HypeMeFed(Strategy):
    hypernet: str = "lrf"
    rank: int = 100
    hidden: int | None = None
    epochs: int = 25
    lr: float = 5e-4
    seed: int = 0
    device: str = "cpu"  # where the hypernetworks train; states stay on the CPU
    name: str = field(default="hypemefed", init=False)

    def __post_init__(self) -> None:
        shapes = {k: tuple(v.shape) for k, v in build_model(self.model).state_dict().items()}
        with torch.random.fork_rng(devices=[]):  # same seed, same initial hypernetworks
            torch.manual_seed(self.seed)
            self.hypernets = torch.nn.ModuleDict({
                _key(t): build_hypernet(self.hypernet, shapes[s], shapes[t], rank=self.rank,
                                        hidden=self.hidden) for s, t in transitions()})
        self.hypernets.to(self.device)
        self.optimizers = {k: torch.optim.Adam(h.parameters(), lr=self.lr)
                           for k, h in self.hypernets.items()}
        self.rounds_trained = {k: 0 for k in self.hypernets}

    def generator_for(self, target: str) -> torch.nn.Module:
        return self.hypernets[_key(target)]

    def train_hypernets(self, updates: list[ClientUpdate], server_round: int) -> dict[str, Any]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + server_round)
        pairs, losses, errors = {}, {}, {}
        for source, target in transitions():
            key = _key(target)
            sources, targets = training_pairs(updates, source, target, self.device)
            pairs[target] = len(sources)
            if sources:
                losses[target] = fit(self.hypernets[key], self.optimizers[key], sources, targets,
                                     self.epochs, gen)
                errors[target] = relative_error(self.hypernets[key], sources, targets)
                self.rounds_trained[key] += 1
        return {"hypernet_pairs": pairs, "hypernet_loss": losses, "hypernet_rel_err": errors}

    @torch.no_grad()
    def generate(self, state: State) -> State:
        """Conv weights for the blocks ``state`` lacks, chained from its deepest block."""
        known, generated = dict(state), {}
        for source, target in transitions():
            hnet = self.hypernets[_key(target)]
            if target in known or source not in known or not self.rounds_trained[_key(target)]:
                continue
            hnet.eval()
            known[target] = hnet(known[source].to(self.device))
            generated[target] = known[target].cpu()
        return generated

    def aggregate(self, global_state: State, updates: list[ClientUpdate], server_round: int
                  ) -> tuple[State, dict[str, Any]]:
        acc = RunningMean(global_state)
        for u in updates:
            acc.add(u.state, self.weight(u))
        metrics = self.add_generated(acc, updates, server_round)
        return acc.result(), metrics

    def add_generated(self, acc: RunningMean, updates: list[ClientUpdate], server_round: int
                      ) -> dict[str, Any]:
        """The server step: train the hypernetworks on ``updates`` (their conv weights suffice),
        then add every client's generated convs to ``acc``; returns the metrics."""
        start = time.perf_counter()
        metrics = self.train_hypernets(updates, server_round)
        generated = 0
        for u in updates:
            extra = self.generate(u.state)
            acc.add(extra, self.weight(u))
            generated += len(extra)
        metrics["hypernet_s"] = time.perf_counter() - start
        metrics["generated_tensors"] = generated
        untrained = [t for t, n in metrics["hypernet_pairs"].items() if n == 0]
        if untrained:
            metrics["note"] = ("no participant trained both blocks for " + ", ".join(untrained)
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


def _key(target: str) -> str:
    """ModuleDict keys cannot contain dots."""
    return target.replace(".", "_")
