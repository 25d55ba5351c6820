"""Local training with the joint multi-exit loss, and per-exit evaluation.

The same code runs on a device (``hmf-device join``) and in the simulator, so one round of a
simulated client and of a real board give the same weights for the same seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TrainConfig:
    """The authors' local training: Adam, weight decay 0.1 * lr, optimizer new every round."""

    epochs: int = 5
    batch_size: int = 128
    lr: float = 5e-4
    exit_weights: tuple[float, ...] | None = None  # None: weight 1 for every exit


def joint_loss(logits: Sequence[torch.Tensor], target: torch.Tensor,
               exit_weights: Sequence[float] | None = None) -> torch.Tensor:
    """Sum over exits of (weighted) cross-entropy."""
    weights = exit_weights or [1.0] * len(logits)
    return sum(w * F.cross_entropy(z, target) for w, z in zip(weights, logits, strict=False))


def train_local(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
                generator: torch.Generator) -> float:
    """Train ``model`` in place on (x, y); returns the mean joint loss over the last epoch.

    Shuffling draws from ``generator`` and dropout from torch's global RNG, so a caller that
    seeds both gets bit-identical weights on the same machine.
    """
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=0.1 * cfg.lr)
    model.train()
    n, last = len(x), 0.0
    for _ in range(cfg.epochs):
        order, total, batches = torch.randperm(n, generator=generator), 0.0, 0
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            if len(idx) < 2 and n >= 2:  # BatchNorm cannot train on a single sample
                continue
            loss = joint_loss(model(x[idx]), y[idx], cfg.exit_weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, batches = total + loss.item(), batches + 1
        last = total / max(batches, 1)
    return last


@torch.no_grad()
def predict_exits(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Predicted labels at every exit: (exits, N)."""
    model.eval()
    preds = [torch.stack([z.argmax(1) for z in model(x[i : i + batch_size])])
             for i in range(0, len(x), batch_size)]
    return torch.cat(preds, dim=1)


def accuracy_per_exit(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    return (predict_exits(model, x) == y).float().mean(1).tolist()


def train_task(model: nn.Module, state: dict[str, torch.Tensor], x: torch.Tensor,
               y: torch.Tensor, cfg: TrainConfig, seed: int
               ) -> tuple[dict[str, torch.Tensor], float]:
    """One client's round: load ``state``, train, return the trained state (on CPU) and loss.

    A pure function of its arguments: every random draw (shuffling, dropout) comes from ``seed``,
    so a device process and the simulator produce the same weights for the same task.
    """
    model.load_state_dict(state)
    cuda = [x.device.index or 0] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        loss = train_local(model, x, y, cfg, torch.Generator().manual_seed(seed))
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, loss
