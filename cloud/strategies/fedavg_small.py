"""FedAvg-S: every participant trains the smallest model (tier 1), so all can take part, but
the global model never grows beyond the first exit."""

from __future__ import annotations

from dataclasses import dataclass, field

from cloud.strategies.base import ClientTask, Strategy


@dataclass
class FedAvgSmall(Strategy):
    name: str = field(default="fedavg-small", init=False)

    def tasks(self, participants: list[tuple[int, int]]) -> list[ClientTask]:
        return [ClientTask(c, t, 1) for c, t in participants]

    def evaluated_exits(self) -> int:
        return 1
