"""Averaging of model states by tensor name, streaming: memory is one running sum per tensor,
whatever the number of updates.

Each tensor of the global model is averaged over exactly the contributions that carry it (a
client that trained it, or a weight the hypernetwork generated for a client); a tensor nobody
contributed keeps its previous global value. Contributions may cover only a leading slice of a
tensor (HeteroFL's width-scaled submodels): then each element is averaged over the contributions
that cover it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from common.calibration import bn_statistics
from common.models import State


def leading_slice(shape: torch.Size | tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(0, n) for n in shape)


class RunningMean:
    """Weighted mean by name (and by element for leading slices) of streamed contributions."""

    def __init__(self, reference: State) -> None:
        self.reference = reference
        self.sums: dict[str, torch.Tensor] = {}
        self.weights: dict[str, torch.Tensor] = {}

    def add(self, state: State, weight: float = 1.0) -> None:
        for name, t in state.items():
            ref = self.reference.get(name)
            if ref is None:
                raise KeyError(f"contribution has tensor {name!r} that the global model lacks")
            if t.dim() != ref.dim() or any(a > b for a, b in zip(t.shape, ref.shape, strict=True)):
                raise ValueError(f"{name}: shape {tuple(t.shape)} does not fit {tuple(ref.shape)}")
            if name not in self.sums:
                self.sums[name] = torch.zeros_like(ref, dtype=torch.float64)
                self.weights[name] = torch.zeros_like(ref, dtype=torch.float64)
            region = leading_slice(t.shape)
            # in place, in float64: no float64 copies of the tensor (the cloud's hot path)
            self.sums[name][region].add_(t, alpha=weight)
            self.weights[name][region] += weight

    def contributors(self, name: str) -> float:
        """Total weight behind the first element of ``name`` (0 when nobody contributed)."""
        w = self.weights.get(name)
        return 0.0 if w is None else float(w.flatten()[0])

    def result(self) -> State:
        """The new global state: averaged where covered, the reference elsewhere."""
        out = {}
        for name, ref in self.reference.items():
            if name not in self.sums:
                out[name] = ref.clone()
                continue
            w = self.weights[name]
            mean = self.sums[name] / w.clamp_min(1e-300)
            if not ref.is_floating_point():
                mean = mean.round()
            out[name] = torch.where(w > 0, mean.to(ref.dtype), ref)
        return out


def average_states(global_state: State, contributions: list[tuple[State, float]]) -> State:
    """Average each tensor over the contributions that carry it (see module docstring)."""
    acc = RunningMean(global_state)
    for state, weight in contributions:
        acc.add(state, weight)
    return acc.result()


def server_step(global_state: State, aggregate: State, lr: float) -> State:
    """The new global model ``lr`` of the way from the old one to the aggregate: a server learning
    rate (FedOpt with plain SGD; 1 is the aggregate itself). The release's stale averaging moves
    a deep block by (its trainers / participants) of its trainers' mean update, a block-wise
    rate below 1; this gives any strategy such a rate to compare with. Integer buffers
    (BatchNorm's batch counts) take the aggregate's value."""
    if lr == 1.0:
        return aggregate
    return {k: torch.lerp(g, aggregate[k], lr) if g.is_floating_point() else aggregate[k]
            for k, g in global_state.items()}


def static_bn_statistics(model_name: str, state: State, batches: Iterable[torch.Tensor]) -> State:
    """``state`` with BatchNorm running statistics replaced by their average over ``batches``."""
    return {**state, **bn_statistics(model_name, state, batches)}
