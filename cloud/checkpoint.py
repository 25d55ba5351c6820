"""Checkpoints: global weights, server-side strategy state (hypernetworks and their optimizers),
RNG state and the round, in one tensor file (no pickle), replaced atomically each round."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cloud.strategies import Strategy
from common import tensorfile
from common.models import State

CHECKPOINT = "checkpoint.hmf"


def save_checkpoint(out_dir: str | Path, server_round: int, global_state: State,
                    strategy: Strategy, config: dict[str, Any],
                    guard: dict[str, Any] | None = None) -> Path:
    """``guard``: the defences' run-long state (``cloud.robust.ServerGuard.to_json``)."""
    tensors = {f"global.{k}": v for k, v in global_state.items()}
    strategy_tensors, strategy_meta = strategy.state_tensors()
    tensors.update({f"strategy.{k}": v for k, v in strategy_tensors.items()})
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"format": "hmf-checkpoint/1", "round": server_round, "model": strategy.model,
            "strategy": strategy.name, "strategy_meta": strategy_meta, "config": config}
    if guard is not None:
        meta["guard"] = guard
    path = Path(out_dir) / CHECKPOINT
    tensorfile.save(path, tensors, meta)
    return path


def load_checkpoint(path: str | Path, strategy: Strategy | None = None
                    ) -> tuple[int, State, dict[str, Any]]:
    """(round, global state, meta); restores ``strategy``'s state and torch's RNG if given."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: run without --resume to start afresh")
    tensors, meta = tensorfile.load(path)
    if meta.get("format") != "hmf-checkpoint/1":
        raise ValueError(f"{path} is not an hmf checkpoint (format {meta.get('format')!r})")
    state = {k[len("global."):]: v for k, v in tensors.items() if k.startswith("global.")}
    if strategy is not None:
        strategy.load_state_tensors(
            {k[len("strategy."):]: v for k, v in tensors.items() if k.startswith("strategy.")},
            meta["strategy_meta"])
        torch.set_rng_state(tensors["rng.torch"])
    return int(meta["round"]), state, meta
