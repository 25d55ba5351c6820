"""ScaleFL (Ilhan, Su, Liu, "ScaleFL: Resource-Adaptive Federated Learning with Heterogeneous
Clients", CVPR 2023): submodels scaled in both width and depth, every one ending in the early
exits it holds, trained with self-distillation from its deepest exit to its earlier ones.

Split. The paper pairs k exits with a reduced width per complexity level (its release: 4 levels
of 1..4 exits at widths 0.7 / 0.7 / 0.75 / 1). Here each tier gets one block more than its
depth-wise tier, thinned so that its parameter count is as close as possible to the depth-wise
tier's (``tier_splits``, same budget as ``depthwise`` and ``heterofl``): tier 1 = 2 blocks,
tier 2 = 3 blocks, both at a reduced width; tier 3 = the full model. Parameters (trainable, BN
buffers excluded) against the depth-wise tier:

| model | tier 1: depth 2, width: params | tier 2: depth 3 | tier 3 |
|---|---|---|---|
| svhn, cifar10 | 0.504: 107,470 (depth-wise 106,922) | 0.516: 350,418 (349,364) | 1.0: 1,245,886 |
| stl10 | 0.564: 1,000,910 (998,218) | 0.568: 2,256,651 (2,253,140) | 1.0: 5,979,486 |
| unimib | 0.479: 284,737 (284,360) | 0.498: 1,188,339 (1,182,928) | 1.0: 4,729,048 |
| hapt | 0.479: 280,281 (278,214) | 0.496: 1,172,271 (1,173,708) | 1.0: 4,718,802 |

(within 0.8 % of the depth-wise budget everywhere; widths step by one channel of the last
block, 1/256 for svhn and cifar10, 1/512 for the others, and every layer rounds its channels
up).

Tier 2's split coincides with HeteroFL's tier 2 (three blocks is all there is); tier 1 differs
(HeteroFL: 3 blocks at about a quarter width).

Local loss (``common.training.deepest_exit_distillation_loss``), over the n exits a client
holds, as the authors' release computes it (git-disl/scale-fl, train.py and KDLoss; the
paper's text could not be read here):

    L = sum_k k * l_k / sum_k k,   l_k = CE(z_k, y) + g * T^2 KL(softmax(z_n/T) || softmax(z_k/T))
    for k < n,  l_n = CE(z_n, y),

with T = 3 (the release's default) and g = 1. Our choices where the release differs: the
teacher z_n is detached (the release lets the KL's gradient reach the deepest exit too); the KL
is averaged over the batch, a true KL (the release's nn.KLDivLoss() default also divides by the
number of classes); g = 1 from the first round (the release switches KD on after a quarter of
the rounds and sets g = 0 for its vision runs, 0.05 for BERT: with g = 0 ScaleFL has no
distillation at all).

Aggregation: each element is averaged over the clients whose slice covers it (leading-slice
averaging by name, ``cloud.aggregation.RunningMean``), as HeteroFL. BatchNorm: static BN by
default, as ``heterofl``: running statistics averaged across widths do not fit the full model
(measured on HAPT: HeteroFL at 49 % with them, 82 % with static BN), so the server recomputes
them from the round's participants' data (``Strategy.calibrate``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cache

import torch

from cloud.strategies.base import ClientTask, Strategy
from cloud.strategies.heterofl import closest_width_fraction, submodel_params, width_sliced_submodel
from common.models import NUM_BLOCKS, State
from common.training import TrainConfig


@cache
def tier_splits(model: str) -> tuple[tuple[int, float], ...]:
    """Per tier, (depth, width fraction): one block deeper than the depth-wise tier, at the width
    whose parameter count is closest to that tier's; the deepest tier is the full model."""
    splits = []
    for tier in range(1, NUM_BLOCKS + 1):
        depth = min(tier + 1, NUM_BLOCKS)
        budget = submodel_params(model, tier, 1.0)
        width = 1.0 if tier == NUM_BLOCKS else closest_width_fraction(model, depth, budget)
        splits.append((depth, width))
    return tuple(splits)


@dataclass
class ScaleFL(Strategy):
    static_bn: bool = True
    distill_weight: float = 1.0
    temperature: float = 3.0
    name: str = field(default="scalefl", init=False)

    def tasks(self, participants: list[tuple[int, int]]) -> list[ClientTask]:
        splits = tier_splits(self.model)
        return [ClientTask(c, t, *splits[t - 1]) for c, t in participants]

    def submodel(self, global_state: State, task: ClientTask) -> tuple[torch.nn.Module, State]:
        return width_sliced_submodel(self.model, global_state, task)

    def train_config(self, base: TrainConfig) -> TrainConfig:
        return replace(base, distill="deepest", distill_weight=self.distill_weight,
                       temperature=self.temperature)
