"""Aggregation strategies, one per file, by name."""

from __future__ import annotations

from typing import Any

from cloud.strategies.base import ClientTask, ClientUpdate, Strategy
from cloud.strategies.depthfl import DepthFL
from cloud.strategies.depthwise import Depthwise
from cloud.strategies.fedavg import FedAvg
from cloud.strategies.fedavg_small import FedAvgSmall
from cloud.strategies.heterofl import HeteroFL
from cloud.strategies.hypemefed import HypeMeFed
from cloud.strategies.hypemefed_release import HypeMeFedRelease
from cloud.strategies.scalefl import ScaleFL

STRATEGIES: dict[str, type[Strategy]] = {
    s.name: s  # type: ignore[misc]
    for s in (FedAvg, FedAvgSmall, Depthwise, HypeMeFed, HypeMeFedRelease, HeteroFL, DepthFL,
              ScaleFL)
}


def build_strategy(name: str, model: str, **options: Any) -> Strategy:
    """``options`` not used by the strategy are ignored (e.g. ``rank`` for ``fedavg``)."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    cls = STRATEGIES[name]
    accepted = {f for f in cls.__dataclass_fields__ if cls.__dataclass_fields__[f].init}
    return cls(model=model, **{k: v for k, v in options.items() if k in accepted})


__all__ = ["STRATEGIES", "ClientTask", "ClientUpdate", "Strategy", "build_strategy"]
