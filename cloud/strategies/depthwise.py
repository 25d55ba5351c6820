"""Depth-wise FL: every client trains its own tier; each tensor is averaged over exactly the
clients that trained it, matched by name. HypeMeFed without the hypernetwork."""

from __future__ import annotations

from dataclasses import dataclass, field

from cloud.strategies.base import Strategy


@dataclass
class Depthwise(Strategy):
    name: str = field(default="depthwise", init=False)
