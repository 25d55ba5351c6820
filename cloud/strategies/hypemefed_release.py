"""HypeMeFed as the authors' public release computes it (docs/METHOD.md, "The release's
defects"): its generated weights never reach the model, so the aggregate is the average of every
participant's full state dict, in which a shallow client's deep blocks (convs, BatchNorm
weights and statistics, heads) are the global model's, unchanged. Not the method: a reference
for what the paper's HypeMeFed numbers measured. The stale copies damp the deep blocks: block k
moves by (its trainers / participants) of its trainers' mean update, and its BatchNorm
statistics become a running average across rounds instead of the last round's trainers'."""

from __future__ import annotations

from dataclasses import dataclass, field

from cloud.strategies.base import ClientUpdate, Strategy
from common.models import State


@dataclass
class HypeMeFedRelease(Strategy):
    name: str = field(default="hypemefed-release", init=False)

    def contribution(self, global_state: State, update: ClientUpdate) -> State:
        """What it trained, and the global model's tensors for the rest (stale)."""
        return {**global_state, **update.state}
