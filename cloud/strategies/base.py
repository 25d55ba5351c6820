"""What every aggregation strategy provides, to the simulator and to the MQTT cloud alike."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from cloud.aggregation import RobustAccumulator, RunningMean, accumulator, static_bn_statistics
from common.models import NUM_BLOCKS, State, build_model, tier_state
from common.training import TrainConfig


@dataclass(frozen=True)
class ClientTask:
    """What one participant trains this round: a submodel of ``depth`` blocks at a width."""

    client: int
    tier: int
    depth: int
    width_fraction: float = 1.0


@dataclass
class ClientUpdate:
    """A trained submodel coming back; ``state`` uses the global model's tensor names."""

    task: ClientTask
    num_samples: int
    state: State
    train_loss: float = float("nan")


@dataclass
class Strategy:
    """Depth-wise averaging by name by default; subclasses change who trains what and how."""

    model: str
    weighting: str = "uniform"  # or "samples"
    static_bn: bool = False  # recompute BatchNorm statistics from participants' data (HeteroFL)
    server_lr: float = 1.0  # the global model moves this fraction of the way to the aggregate
    aggregation: str = "mean"  # or "median", "trimmed-mean" (cloud/aggregation.py)
    trim: float = 0.1  # trimmed-mean: share of each coordinate's values dropped at each end
    local_distill: bool = False  # clients add DepthFL's self-distillation between their exits
    name: str = field(default="base", init=False)

    def tasks(self, participants: list[tuple[int, int]]) -> list[ClientTask]:
        """(client, tier) pairs -> what each trains; the default: its own tier's depth."""
        return [ClientTask(c, t, t) for c, t in participants]

    def submodel(self, global_state: State, task: ClientTask) -> tuple[torch.nn.Module, State]:
        """The module a client builds and the state sent to it."""
        module = build_model(self.model, depth=task.depth, width_fraction=task.width_fraction)
        return module, tier_state(global_state, task.depth)

    def train_config(self, base: TrainConfig) -> TrainConfig:
        """The local training this strategy asks of every client, from the run's settings
        ``base`` (epochs, batch, lr); by default the joint cross-entropy, or with
        ``local_distill`` DepthFL's mutual self-distillation between the exits (its defaults)."""
        return replace(base, distill="mutual") if self.local_distill else base

    def weight(self, update: ClientUpdate) -> float:
        return float(update.num_samples) if self.weighting == "samples" else 1.0

    def contribution(self, global_state: State, update: ClientUpdate) -> State:
        """The tensors ``update`` adds to the average: by default what it trained."""
        return update.state

    def accumulator(self, global_state: State) -> RunningMean | RobustAccumulator:
        """What contributions are folded into: the weighted mean, or the robust rule chosen."""
        return accumulator(global_state, self.aggregation, self.trim)

    def aggregate(self, global_state: State, updates: list[ClientUpdate], server_round: int
                  ) -> tuple[State, dict[str, Any]]:
        """New global state from this round's updates, and metrics worth logging."""
        acc = self.accumulator(global_state)
        for u in updates:
            acc.add(self.contribution(global_state, u), self.weight(u))
        return acc.result(), {}

    def calibrate(self, state: State, batches: Iterable[torch.Tensor]) -> State:
        """Server-side fix-up of the aggregate from participants' data (HeteroFL's static BN);
        ``batches`` is lazy, so strategies that need nothing cost nothing."""
        return static_bn_statistics(self.model, state, batches) if self.static_bn else state

    def evaluated_exits(self) -> int:
        """How many exits of the global model this strategy trains."""
        return NUM_BLOCKS

    # Checkpointing of server-side state (hypernetworks); stateless strategies have none.
    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        pass
