"""Averaging of model states by tensor name, streaming: memory is one running sum per tensor,
whatever the number of updates.

Each tensor of the global model is averaged over exactly the contributions that carry it (a
client that trained it, or a weight the hypernetwork generated for a client); a tensor nobody
contributed keeps its previous global value. Contributions may cover only a leading slice of a
tensor (HeteroFL's width-scaled submodels): then each element is averaged over the contributions
that cover it.

``--aggregation median|trimmed-mean`` replaces the weighted mean by a robust rule per element
(``RobustAccumulator``), which must keep every contribution until the round closes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from cloud.config import AGGREGATIONS
from common.calibration import bn_statistics
from common.models import State


def leading_slice(shape: torch.Size | tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(0, n) for n in shape)


def fitting_reference(reference: State, name: str, t: torch.Tensor) -> torch.Tensor:
    """The global tensor a contribution ``t`` named ``name`` goes into: it must exist, and ``t``
    must fit its leading slice (a width-scaled submodel's tensor, or the whole)."""
    ref = reference.get(name)
    if ref is None:
        raise KeyError(f"contribution has tensor {name!r} that the global model lacks")
    if t.dim() != ref.dim() or any(a > b for a, b in zip(t.shape, ref.shape, strict=True)):
        raise ValueError(f"{name}: shape {tuple(t.shape)} does not fit {tuple(ref.shape)}")
    return ref


class RunningMean:
    """Weighted mean by name (and by element for leading slices) of streamed contributions."""

    def __init__(self, reference: State) -> None:
        self.reference = reference
        self.sums: dict[str, torch.Tensor] = {}
        self.weights: dict[str, torch.Tensor] = {}

    def add(self, state: State, weight: float = 1.0) -> None:
        for name, t in state.items():
            ref = fitting_reference(self.reference, name, t)
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


class RobustAccumulator:
    """``RunningMean``'s interface, with the coordinate-wise median or trimmed mean over the
    contributions that cover each element (weights are ignored: a robust rule cannot let one
    participant's claimed weight outvote the others)."""

    def __init__(self, reference: State, rule: str, trim: float = 0.1) -> None:
        if rule not in ("median", "trimmed-mean"):
            raise ValueError(f"unknown robust aggregation {rule!r}")
        if not 0 <= trim < 0.5:
            raise ValueError(f"trim must be in [0, 0.5), got {trim}")
        self.reference, self.rule, self.trim = reference, rule, trim
        self.kept: dict[str, list[torch.Tensor]] = {}

    def add(self, state: State, weight: float = 1.0) -> None:
        for name, t in state.items():
            fitting_reference(self.reference, name, t)  # refuses what does not fit
            self.kept.setdefault(name, []).append(t.detach())

    def contributors(self, name: str) -> float:
        return float(len(self.kept.get(name, [])))

    def result(self) -> State:
        out = {}
        for name, ref in self.reference.items():
            values = self.kept.get(name)
            out[name] = ref.clone() if not values else self._combine(ref, values)
        return out

    def _combine(self, ref: torch.Tensor, values: list[torch.Tensor]) -> torch.Tensor:
        """Per element over the contributions covering it (NaN marks the uncovered)."""
        stack = torch.full((len(values), *ref.shape), math.nan, dtype=torch.float64)
        for i, t in enumerate(values):
            stack[(i, *leading_slice(t.shape))] = t.double()
        combined = (robust_median(stack) if self.rule == "median"
                    else trimmed_mean(stack, self.trim))
        if not ref.is_floating_point():
            combined = combined.round()
        return torch.where(torch.isnan(combined), ref, combined.to(ref.dtype))


def robust_median(stack: torch.Tensor) -> torch.Tensor:
    """Median along dim 0 ignoring NaN (uncovered); the mean of the two middle values for an
    even count, so that two equal honest values and nothing else give that value."""
    ordered, _ = torch.sort(stack, dim=0)  # NaN sorts last
    count = (~torch.isnan(stack)).sum(0)
    lo = ((count - 1).clamp_min(0) // 2).unsqueeze(0)
    hi = (count // 2).clamp_max(stack.shape[0] - 1).unsqueeze(0)
    mid = (ordered.gather(0, lo) + ordered.gather(0, hi)) / 2
    return torch.where(count > 0, mid.squeeze(0), torch.tensor(math.nan, dtype=stack.dtype))


def trimmed_mean(stack: torch.Tensor, trim: float) -> torch.Tensor:
    """Mean along dim 0 of the values left once ``floor(trim * count)`` of the smallest and of
    the largest are dropped, per element (NaN: uncovered)."""
    ordered, _ = torch.sort(stack, dim=0)
    count = (~torch.isnan(stack)).sum(0)
    cut = torch.floor(count * trim).long()
    rank = torch.arange(stack.shape[0]).view(-1, *([1] * (stack.dim() - 1)))
    keep = (rank >= cut) & (rank < count - cut)
    total = torch.where(keep, ordered, torch.zeros((), dtype=stack.dtype)).sum(0)
    kept = keep.sum(0)
    return torch.where(kept > 0, total / kept.clamp_min(1),
                       torch.tensor(math.nan, dtype=stack.dtype))


def accumulator(reference: State, rule: str = "mean", trim: float = 0.1
                ) -> RunningMean | RobustAccumulator:
    """The running aggregate of ``rule`` (``AGGREGATIONS``): what every strategy, the simulator
    and the streaming cloud alike, folds its contributions into."""
    if rule not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {rule!r}")
    if rule == "mean":
        return RunningMean(reference)
    return RobustAccumulator(reference, rule, trim)


def average_states(global_state: State, contributions: list[tuple[State, float]],
                   rule: str = "mean", trim: float = 0.1) -> State:
    """Aggregate each tensor over the contributions that carry it (see module docstring)."""
    acc = accumulator(global_state, rule, trim)
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
