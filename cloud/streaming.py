"""Streaming aggregation for the MQTT cloud: each accepted update is added to a running sum the
moment it is verified, so the cloud never holds a round's updates as a list.

What must be kept until the round closes is only what the server step needs after the last
update: HypeMeFed's hypernetworks train on (block k, block k+1) conv pairs and then generate
from each client's deepest conv weights, so for each update the conv weights of its blocks are
kept (not its BatchNorm, biases or heads). Strategies that average by name (depthwise, fedavg,
fedavg-small, heterofl, hypemefed-release with its ``contribution``) keep nothing. A strategy
with a custom ``aggregate`` this module does not know is given the full list, as the simulator
does.

The result equals ``strategy.aggregate`` on the same updates (float64 sums in another order:
differences far below 1e-6), which ``tests/test_mqtt_fleet.py`` checks against ``hmf
simulate``.
"""

from __future__ import annotations

from typing import Any

from cloud.distillation import TeacherEnsemble
from cloud.robust import RoundGuard
from cloud.strategies.base import ClientUpdate, Strategy
from cloud.strategies.hypemefed import HypeMeFed
from common.models import State


class StreamingAggregate:
    def __init__(self, strategy: Strategy, global_state: State, order: list[int],
                 guard: RoundGuard | None = None,
                 ensemble: TeacherEnsemble | None = None) -> None:
        """``order``: the clients of the round's tasks in task order; the hypernetworks see
        their training pairs in this order whatever the order of arrival, as in the simulator.
        ``guard``: the round's clipping (cloud/robust.py); an update it holds (no bound yet for
        one of its tensors) is folded in when the round closes. ``ensemble``: the round's
        distillation teacher (cloud/distillation.py), which sees every update folded in."""
        self.strategy, self.global_state, self.order = strategy, global_state, order
        self.guard, self.ensemble = guard, ensemble
        self.acc = strategy.accumulator(global_state)
        self.hyper = isinstance(strategy, HypeMeFed)
        self.custom = not self.hyper and type(strategy).aggregate is not Strategy.aggregate
        self.kept: dict[int, ClientUpdate] = {}
        self.full: list[ClientUpdate] = []
        # what the hypernetworks read (convs, and BatchNorm vectors or heads if they generate
        # them): the rest of an update is folded into the mean on arrival and dropped
        self.needed = strategy.needed_tensors() if self.hyper else set()  # type: ignore[attr-defined]

    def add(self, update: ClientUpdate) -> None:
        ready = self.guard.arrive(update) if self.guard is not None else update
        if ready is not None:
            self._fold(ready)

    def _fold(self, update: ClientUpdate) -> None:
        if self.ensemble is not None:
            self.ensemble.add(update, self.strategy.weight(update))
        if self.custom:
            self.full.append(update)
            return
        self.acc.add(self.strategy.contribution(self.global_state, update),
                     self.strategy.weight(update))
        if self.hyper:
            light = {k: v for k, v in update.state.items() if k in self.needed}
            self.kept[update.task.client] = ClientUpdate(update.task, update.num_samples, light,
                                                         update.train_loss)

    def finish(self, server_round: int) -> tuple[State, dict[str, Any]]:
        for update in self.guard.release() if self.guard is not None else []:
            self._fold(update)
        if self.custom:
            rank = {c: i for i, c in enumerate(self.order)}
            updates = sorted(self.full, key=lambda u: rank.get(u.task.client, len(rank)))
            return self.strategy.aggregate(self.global_state, updates, server_round)
        if not self.hyper:
            return self.acc.result(), {}
        return self._finish_hypemefed(server_round)

    def _finish_hypemefed(self, server_round: int) -> tuple[State, dict[str, Any]]:
        """HypeMeFed.aggregate's server step on the kept tensors."""
        strategy: HypeMeFed = self.strategy  # type: ignore[assignment]
        light = [self.kept[c] for c in self.order if c in self.kept]
        metrics = strategy.add_generated(self.acc, light, server_round)
        self.kept.clear()
        return self.acc.result(), metrics
