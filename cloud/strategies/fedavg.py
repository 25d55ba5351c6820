"""FedAvg of the full model: only participants able to hold it (the deepest tier) take part,
which is what a homogeneous FL system forces on a mixed fleet."""

from __future__ import annotations

from dataclasses import dataclass, field

from cloud.strategies.base import ClientTask, Strategy
from common.models import NUM_BLOCKS


def full_model_tasks(participants: list[tuple[int, int]]) -> list[ClientTask]:
    return [ClientTask(c, t, NUM_BLOCKS) for c, t in participants if t >= NUM_BLOCKS]


@dataclass
class FedAvg(Strategy):
    name: str = field(default="fedavg", init=False)

    def tasks(self, participants: list[tuple[int, int]]) -> list[ClientTask]:
        return full_model_tasks(participants)
