"""Accuracy of a global model: per exit on the global test set, and on every client's local test
split (the authors' "mean local test accuracy"), from a single forward pass where possible."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cloud.federation import Federation
from common.models import NUM_BLOCKS, State, build_model
from common.training import predict_exits


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def evaluate(model_name: str, state: State, x: torch.Tensor, y: torch.Tensor,
             fed: Federation, exits: int, test: tuple[torch.Tensor, torch.Tensor] | None = None,
             device: str = "cpu") -> dict[str, Any]:
    """``exits``: how many exits the strategy trains (deeper ones report None).

    Clients are scored with the global model at the exits their tier holds. Without an official
    ``test`` split, the global test set is the union of the clients' local test splits.
    """
    model = build_model(model_name).to(device)
    model.load_state_dict(state)
    local = np.concatenate(fed.test)
    preds = predict_exits(model, x[local].to(device)).cpu()
    hits = (preds == y[local]).float()
    if test is None:
        global_acc = hits.mean(1).tolist()
    else:
        global_acc = (predict_exits(model, test[0].to(device)).cpu() == test[1]).float().mean(1)
        global_acc = global_acc.tolist()
    bounds = np.cumsum([0] + [len(t) for t in fed.test])
    per_client = [hits[:, a:b].mean(1).tolist() for a, b in zip(bounds, bounds[1:], strict=False)]
    deepest = [min(t, exits) for t in fed.tiers]
    return {
        "global": {str(e): (global_acc[e - 1] if e <= exits else None)
                   for e in range(1, NUM_BLOCKS + 1)},
        "clients": {str(e): _mean([a[e - 1] for a, t in zip(per_client, fed.tiers, strict=True)
                                   if t >= e]) if e <= exits else None
                    for e in range(1, NUM_BLOCKS + 1)},
        "tier": {str(t): _mean([a[d - 1] for a, ti, d in zip(per_client, fed.tiers, deepest,
                                                              strict=True) if ti == t])
                 for t in range(1, NUM_BLOCKS + 1)},
        "local_mean": _mean([a[d - 1] for a, d in zip(per_client, deepest, strict=True)]),
    }
