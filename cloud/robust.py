"""What no single participant may do to the global model, shared by ``hmf simulate`` and the
fleet's cloud so that both compute the same thing (docs/METHOD.md, "Bounded influence").

Three defences, each on by default or chosen by a flag:

- **Bounded influence** (``InfluenceBound``, ``--clip-factor``, default 3): each update's
  deviation from the global model it started from is clipped, tensor by tensor, to
  ``clip_factor`` times the median root-mean-square deviation of that tensor in the updates
  accepted over the last ``clip_window`` rounds. RMS (norm / sqrt(elements)) rather than the
  norm, so that HeteroFL's width slices of one tensor compare. A tensor with fewer than
  ``MIN_HISTORY`` past values (round 1, or a block no participant has trained yet) is bounded by
  the same rule over its past values plus this round's: the cloud holds such updates until the
  round closes, the only time its memory grows with the participants. A clipped tensor is
  ``global + s (update - global)`` with ``s <= 1``: a convex combination, so a non-negative
  BatchNorm variance stays non-negative.
- **Robust aggregation** (``cloud.aggregation.RobustAccumulator``, ``--aggregation
  median|trimmed-mean``, ``--trim``): the coordinate-wise median, or the mean of what is left
  once the ``trim`` fraction of the largest and of the smallest values of each coordinate are
  dropped, instead of the weighted mean. Unweighted; they keep every contribution until the
  round closes.
- **A safety net** (``verdict``): a round whose new global model holds a non-finite value, or
  whose evaluation has collapsed (every evaluated exit that was ``MIN_MARGIN`` above chance,
  1 / classes, keeps less than ``COLLAPSE`` of that margin) is not committed: the global model,
  the strategy's server state and the bound's history stay as they were.
"""

from __future__ import annotations

import copy
import math
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from cloud.aggregation import leading_slice
from cloud.strategies.base import ClientUpdate, Strategy
from common.models import State

MIN_HISTORY = 3  # past values a tensor needs before its bound is fixed at the round's start
COLLAPSE = 0.25  # a round collapses when every exit keeps under this share of its margin
# above chance (honest rounds on small data lose half of it: 0.51 -> 0.32 with 6 classes)
MIN_MARGIN = 0.05  # an exit less than this above chance tells nothing: it is not judged


def lower_median(values: list[float]) -> float:
    """The lower of the two middle values: with two values, one of them hostile, the smaller."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def deviations(global_state: State, state: State) -> dict[str, float]:
    """Root-mean-square deviation of every floating tensor of ``state`` from the global
    model's (its leading slice for width-scaled submodels), in float64."""
    out = {}
    for name, t in state.items():
        if not t.is_floating_point() or t.numel() == 0:
            continue
        ref = global_state[name][leading_slice(t.shape)]
        out[name] = float((t.double() - ref.double()).square().mean().sqrt())
    return out


def screen(state: State) -> str | None:
    """Why a decoded update cannot be aggregated at all, or None. The fleet's decoder already
    refuses non-finite values; the simulator's updates come here unchecked."""
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return "non-finite values"
        if name.endswith(".running_var") and bool((t < 0).any()):
            return "bad statistics"
    return None


@dataclass
class InfluenceBound:
    """The clipping rule and its history: per round, each tensor's RMS deviations in the
    updates accepted that round (checkpointed, so a resumed run clips as an uninterrupted one)."""

    factor: float = 3.0  # 0: no clipping
    window: int = 5
    history: deque[dict[str, list[float]]] = field(default_factory=deque)

    def bounds(self, current: dict[str, list[float]] | None = None) -> dict[str, float]:
        """Per tensor, the RMS bound: ``factor`` times the lower median of its values over the
        window; with ``current`` (this round's values) for tensors short of history."""
        pooled: dict[str, list[float]] = {}
        for past in self.history:
            for name, values in past.items():
                pooled.setdefault(name, []).extend(values)
        out = {k: self.factor * lower_median(v) for k, v in pooled.items()
               if len(v) >= MIN_HISTORY}
        for name, values in (current or {}).items():
            if name not in out:
                every = pooled.get(name, []) + values
                out[name] = self.factor * lower_median(every)
        return out

    def record(self, values: dict[str, list[float]]) -> None:
        """A committed round's values join the history; the oldest round leaves the window."""
        self.history.append({k: list(v) for k, v in values.items()})
        while len(self.history) > self.window:
            self.history.popleft()

    def to_json(self) -> dict[str, Any]:
        return {"factor": self.factor, "window": self.window, "history": list(self.history)}

    def load_json(self, obj: dict[str, Any]) -> None:
        self.history = deque(obj.get("history", []))


def clip(global_state: State, update: ClientUpdate, devs: dict[str, float],
         bounds: dict[str, float]) -> tuple[ClientUpdate, list[float]]:
    """``update`` with every tensor whose deviation exceeds its bound pulled back onto it;
    also the ratios deviation / bound of the clipped tensors."""
    state, ratios = dict(update.state), []
    for name, dev in devs.items():
        bound = bounds.get(name, math.inf)
        if dev <= bound:
            continue
        ref = global_state[name][leading_slice(state[name].shape)].double()
        scale = bound / dev
        state[name] = (ref + (state[name].double() - ref) * scale).to(state[name].dtype)
        ratios.append(dev / bound if bound > 0 else math.inf)
    return (replace(update, state=state) if ratios else update), ratios


class RoundGuard:
    """One round's screening and clipping, the same for both callers: the simulator hands it
    the round's updates at once (``apply``); the cloud streams (``arrive`` as each update is
    verified, then ``release`` the held ones when the round closes)."""

    def __init__(self, bound: InfluenceBound, global_state: State) -> None:
        self.bound, self.global_state = bound, global_state
        self.fixed = bound.bounds() if bound.factor > 0 else {}
        self.values: dict[str, list[float]] = {}  # this round's deviations, for the history
        self.held: list[tuple[ClientUpdate, dict[str, float]]] = []
        self.clipped_updates, self.clipped_tensors, self.max_ratio = 0, 0, 0.0

    def _observe(self, update: ClientUpdate) -> dict[str, float]:
        devs = deviations(self.global_state, update.state)
        for name, dev in devs.items():
            self.values.setdefault(name, []).append(dev)
        return devs

    def _clip(self, update: ClientUpdate, devs: dict[str, float], bounds: dict[str, float]
              ) -> ClientUpdate:
        if self.bound.factor <= 0:
            return update
        clipped, ratios = clip(self.global_state, update, devs, bounds)
        if ratios:
            self.clipped_updates += 1
            self.clipped_tensors += len(ratios)
            self.max_ratio = max(self.max_ratio, *ratios)
        return clipped

    def arrive(self, update: ClientUpdate) -> ClientUpdate | None:
        """The clipped update if every tensor of it has a fixed bound; else None: it is held
        until ``release``."""
        devs = self._observe(update)
        if self.bound.factor <= 0 or all(name in self.fixed for name in devs):
            return self._clip(update, devs, self.fixed)
        self.held.append((update, devs))
        return None

    def release(self) -> list[ClientUpdate]:
        """The held updates, clipped with bounds that include this round's values."""
        bounds = self.bound.bounds(self.values)
        held, self.held = self.held, []
        return [self._clip(u, devs, bounds) for u, devs in held]

    def apply(self, updates: list[ClientUpdate]) -> list[ClientUpdate]:
        """Every update of a round at once, clipped exactly as ``arrive``/``release`` would."""
        ready = [self.arrive(u) for u in updates]
        released = iter(self.release())
        return [u if u is not None else next(released) for u in ready]

    def commit(self) -> None:
        """The round was committed: its deviations join the history."""
        if self.values:
            self.bound.record(self.values)

    def metrics(self) -> dict[str, Any]:
        return {"updates": self.clipped_updates, "tensors": self.clipped_tensors,
                "max_ratio": self.max_ratio}


def non_finite(state: State) -> list[str]:
    """Names of the floating tensors of ``state`` holding NaN or Inf."""
    return [k for k, v in state.items()
            if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def collapsed(acc: dict[str, float | None], last: dict[str, float | None] | None,
              chance: float) -> bool:
    """Every exit evaluated both now and in the last committed round keeps less than
    ``COLLAPSE`` of its margin above ``chance`` (a poisoned model predicts one class: chance
    or the share of that class). An exit that was not ``MIN_MARGIN`` above chance then is not
    judged (HypeMeFed's deep exits sit at chance for the first rounds)."""
    if not last:
        return False
    pairs = [(acc[k] - chance, last[k] - chance) for k in acc
             if acc.get(k) is not None and last.get(k) is not None
             and last[k] >= chance + MIN_MARGIN]
    return bool(pairs) and all(now < COLLAPSE * before for now, before in pairs)


def verdict(state: State, acc: dict[str, float | None] | None,
            last: dict[str, float | None] | None, chance: float = 0.0) -> str | None:
    """Why a round's new global model must not be committed, or None."""
    bad = non_finite(state)
    if bad:
        return f"non-finite aggregate ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})"
    if acc is not None and collapsed(acc, last, chance):
        shown = " ".join(f"{k}:{v:.3f}" for k, v in acc.items() if v is not None)
        return f"evaluation collapsed (global {shown})"
    return None


def server_snapshot(strategy: Strategy) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A copy of the strategy's server state (HypeMeFed's hypernetworks and their optimizers),
    taken before a round's aggregation so that a round not committed can be undone."""
    tensors, meta = strategy.state_tensors()
    return {k: v.detach().clone() for k, v in tensors.items()}, copy.deepcopy(meta)


def restore_snapshot(strategy: Strategy, snapshot: tuple[dict[str, torch.Tensor],
                                                          dict[str, Any]]) -> None:
    tensors, meta = snapshot
    if tensors or meta:
        strategy.load_state_tensors(tensors, meta)


class ServerGuard:
    """The run-long side of the defences: the influence bound's history and the last committed
    round's global accuracy (both checkpointed), and the commit-or-keep decision of a round."""

    def __init__(self, clip_factor: float, clip_window: int, classes: int = 0) -> None:
        """``classes``: of the model, for the chance level of the collapse test (0: none)."""
        self.bound = InfluenceBound(clip_factor, clip_window)
        self.chance = 1.0 / classes if classes else 0.0
        self.last_acc: dict[str, float | None] | None = None

    def round(self, global_state: State) -> RoundGuard:
        return RoundGuard(self.bound, global_state)

    def settle(self, guard: RoundGuard, strategy: Strategy,
               snapshot: tuple[dict[str, torch.Tensor], dict[str, Any]],
               old: State, new: State, acc: dict[str, float | None] | None
               ) -> tuple[State, str | None]:
        """(the global model to keep, why the round was not committed or None). Not committed:
        ``old`` stays, the strategy's server state is restored from ``snapshot``, and neither
        the round's deviations nor its accuracy are remembered."""
        why = verdict(new, acc, self.last_acc, self.chance)
        if why is not None:
            restore_snapshot(strategy, snapshot)
            return old, why
        guard.commit()
        if acc is not None:
            self.last_acc = dict(acc)
        return new, None

    def to_json(self) -> dict[str, Any]:
        return {"bound": self.bound.to_json(), "last_acc": self.last_acc}

    def load_json(self, obj: dict[str, Any] | None) -> None:
        """From a checkpoint's meta; one written before the guard existed starts afresh."""
        if obj:
            self.bound.load_json(obj.get("bound", {}))
            self.last_acc = obj.get("last_acc")


__all__ = ["InfluenceBound", "RoundGuard", "ServerGuard", "clip", "collapsed", "deviations",
           "restore_snapshot", "screen", "server_snapshot", "verdict"]
