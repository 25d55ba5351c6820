"""HeteroFL (Diao et al., ICLR 2021) on the multi-exit VGG: every client holds the full depth,
all exits, but only a leading fraction of the channels of every layer. Each element of a tensor
is averaged over the clients whose slice covers it.

Tier k's width fraction is chosen so that its parameter count is as close as possible to the
depth-wise tier k's (``tier_width_fractions``); for the svhn model that is about 0.28 / 0.52 / 1.0
(docs/METHOD.md lists them for every model).

BatchNorm: HeteroFL's static BN. A channel's statistics depend on how many input channels fed
it, so running statistics averaged across widths do not fit the full-width model (measured here:
HAPT accuracy stuck near 49 % with them, against 76 % for FedAvg). After aggregation the server
recomputes them for the full model from this round's participants' training data, as the
HeteroFL paper's server queries clients (``static_bn``, see ``Strategy.calibrate``). The
paper's scaler module is left out: every conv here is followed by BatchNorm, which cancels a
constant output scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

import torch

from cloud.strategies.base import ClientTask, Strategy
from common.models import NUM_BLOCKS, State, build_model, param_count


def submodel_params(model: str, depth: int, fraction: float) -> int:
    """Trainable parameters of ``model`` cut to ``depth`` blocks at a width fraction."""
    return param_count(build_model(model, depth=depth, width_fraction=fraction))


def closest_width_fraction(model: str, depth: int, budget: int) -> float:
    """The width fraction at which the depth-``depth`` model's parameter count is closest to
    ``budget``; fractions step by one channel of the global model's widest layer."""
    widest = build_model(model).spec.widths[-1]
    lo, hi = 1, widest  # search over channel counts of the last block: params grow with it
    while lo < hi:
        mid = (lo + hi) // 2
        small = submodel_params(model, depth, mid / widest) < budget
        lo, hi = (mid + 1, hi) if small else (lo, mid)
    below = max(lo - 1, 1)
    best = min((below, lo),
               key=lambda c: abs(submodel_params(model, depth, c / widest) - budget))
    return best / widest


@cache
def tier_width_fractions(model: str) -> tuple[float, ...]:
    """Per tier, the width fraction of the full-depth model closest in parameters to that tier."""
    return tuple(closest_width_fraction(model, NUM_BLOCKS, submodel_params(model, tier, 1.0))
                 for tier in range(1, NUM_BLOCKS + 1))


def slice_state(global_state: State, shapes: dict[str, torch.Size]) -> State:
    """The leading slice of every global tensor that fits the submodel's shapes."""
    return {k: global_state[k][tuple(slice(0, n) for n in s)].clone() for k, s in shapes.items()}


def width_sliced_submodel(model: str, global_state: State, task: ClientTask
                          ) -> tuple[torch.nn.Module, State]:
    """The task's width-scaled module and the leading slice of the global state that fits it."""
    module = build_model(model, depth=task.depth, width_fraction=task.width_fraction)
    shapes = {k: v.shape for k, v in module.state_dict().items()}
    return module, slice_state(global_state, shapes)


@dataclass
class HeteroFL(Strategy):
    static_bn: bool = True
    name: str = field(default="heterofl", init=False)

    def tasks(self, participants: list[tuple[int, int]]) -> list[ClientTask]:
        fractions = tier_width_fractions(self.model)
        return [ClientTask(c, t, NUM_BLOCKS, fractions[t - 1]) for c, t in participants]

    def submodel(self, global_state: State, task: ClientTask) -> tuple[torch.nn.Module, State]:
        return width_sliced_submodel(self.model, global_state, task)


