"""HypeMeFed as the authors' public release computes it (docs/METHOD.md, "The release's
defects"): its generated weights never reach the model, so the aggregate is the average of every
participant's full state dict, in which a shallow client's deep blocks (convs, BatchNorm
weights and statistics, heads) are the global model's, unchanged. Not the method: a reference
for what the paper's HypeMeFed numbers measured. The stale copies damp the deep blocks: block k
moves by (its trainers / participants) of its trainers' mean update, and its BatchNorm
statistics become a running average across rounds instead of the last round's trainers'."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cloud.aggregation import average_states
from cloud.strategies.base import ClientUpdate, Strategy
from common.models import State


def with_stale_tensors(global_state: State, trained: State) -> State:
    """A client's update as the release averages it: what it trained, the global rest."""
    return {**global_state, **trained}


@dataclass
class HypeMeFedRelease(Strategy):
    name: str = field(default="hypemefed-release", init=False)

    def aggregate(self, global_state: State, updates: list[ClientUpdate], server_round: int
                  ) -> tuple[State, dict[str, Any]]:
        contributions = [(with_stale_tensors(global_state, u.state), self.weight(u))
                         for u in updates]
        return average_states(global_state, contributions), {}
