"""Local training with the joint multi-exit loss, and per-exit evaluation.

The same code runs on a device (``hmf-device join``) and in the simulator, so one round of a
simulated client and of a real board give the same weights for the same seed.

Self-distillation between a client's exits is a property of the local training, chosen by the
strategy (``Strategy.train_config``) and carried to devices in the task's ``train`` fields:
``"mutual"`` is DepthFL's, ``"deepest"`` ScaleFL's (formulas at their functions below).
"""

from __future__ import annotations

import platform
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

DISTILL_MODES = (None, "mutual", "deepest")
X86 = platform.machine().lower() in ("x86_64", "amd64")


@dataclass(frozen=True)
class TrainConfig:
    """The authors' local training: Adam, weight decay 0.1 * lr, optimizer new every round."""

    epochs: int = 5
    batch_size: int = 128
    lr: float = 5e-4
    exit_weights: tuple[float, ...] | None = None  # None: weight 1 for every exit
    distill: str | None = None  # None: plain joint CE; "mutual" (DepthFL); "deepest" (ScaleFL)
    distill_weight: float = 1.0  # weight of the distillation terms
    temperature: float = 1.0  # softmax temperature of the distillation terms

    def __post_init__(self) -> None:
        if self.distill not in DISTILL_MODES:
            raise ValueError(f"distill must be one of {DISTILL_MODES}, got {self.distill!r}")
        if self.distill is not None and self.exit_weights is not None:
            # each distillation loss fixes its own exit weighting (see its function)
            raise ValueError("exit_weights cannot be combined with distill")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")

    def to_json(self) -> dict[str, Any]:
        """The fields as JSON values (a task message's ``train``)."""
        d = asdict(self)
        d["exit_weights"] = None if self.exit_weights is None else list(self.exit_weights)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of ``to_json``; fields a sender left out take their defaults, so a task from
        an older cloud trains as before."""
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if known.get("exit_weights") is not None:
            known["exit_weights"] = tuple(float(w) for w in known["exit_weights"])
        return cls(**known)


def joint_loss(logits: Sequence[torch.Tensor], target: torch.Tensor,
               exit_weights: Sequence[float] | None = None) -> torch.Tensor:
    """Sum over exits of (weighted) cross-entropy."""
    weights = exit_weights or [1.0] * len(logits)
    return sum(w * F.cross_entropy(z, target) for w, z in zip(weights, logits, strict=False))


def distillation_kl(student: torch.Tensor, teacher: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch.

    The teacher is detached: it is a target, so no gradient flows into the exit that teaches.
    T^2 keeps the gradient's scale independent of T (Hinton et al., 2015).
    """
    t = temperature
    log_student = F.log_softmax(student / t, dim=1)
    log_teacher = F.log_softmax(teacher.detach() / t, dim=1)
    return t * t * F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)


def mutual_distillation_loss(logits: Sequence[torch.Tensor], target: torch.Tensor,
                             weight: float = 1.0, temperature: float = 1.0) -> torch.Tensor:
    """DepthFL's local loss (Kim et al., ICLR 2023, Eq. 1), over the n exits a client holds:

        sum_i [ CE(z_i, y) + weight / (n - 1) * sum_{j != i} T^2 KL(p_j || p_i) ],
        p_k = softmax(z_k / T), p_j detached,

    every exit learning from the labels and from every other exit. One exit: plain CE.
    """
    n = len(logits)
    ce = sum(F.cross_entropy(z, target) for z in logits)
    if n == 1:
        return ce
    kl = sum(distillation_kl(zi, zj, temperature)
             for i, zi in enumerate(logits) for j, zj in enumerate(logits) if i != j)
    return ce + weight / (n - 1) * kl


def deepest_exit_distillation_loss(logits: Sequence[torch.Tensor], target: torch.Tensor,
                                   weight: float = 1.0, temperature: float = 1.0) -> torch.Tensor:
    """ScaleFL's local loss (Ilhan et al., CVPR 2023, as its public release computes it), over
    the n exits a client holds, the deepest (z_n) teaching the earlier ones:

        sum_k k * l_k / sum_k k,   l_k = CE(z_k, y) + weight * T^2 KL(p_n || p_k)  (k < n),
        l_n = CE(z_n, y),   p_k = softmax(z_k / T), p_n detached.

    Deeper exits weigh more (k), and the weights sum to 1. One exit: plain CE.
    """
    n = len(logits)
    deepest = logits[-1]
    total = n * F.cross_entropy(deepest, target)
    for k, z in enumerate(logits[:-1], start=1):
        total = total + k * (F.cross_entropy(z, target)
                             + weight * distillation_kl(z, deepest, temperature))
    return total / (n * (n + 1) / 2)


def local_loss(logits: Sequence[torch.Tensor], target: torch.Tensor,
               cfg: TrainConfig) -> torch.Tensor:
    """The loss a client minimises: the joint loss, or a self-distillation loss."""
    if cfg.distill == "mutual":
        return mutual_distillation_loss(logits, target, cfg.distill_weight, cfg.temperature)
    if cfg.distill == "deepest":
        return deepest_exit_distillation_loss(logits, target, cfg.distill_weight,
                                              cfg.temperature)
    return joint_loss(logits, target, cfg.exit_weights)


@contextmanager
def cpu_fast_layout(model: nn.Module) -> Iterator[None]:
    """Runs ``model`` with channels-last (NHWC) weights on an x86 CPU, where oneDNN's
    convolutions are faster in that layout (here, 1 thread: 10 % per training step and 26 % per
    evaluation for the cifar10 model, 3 % / 22 % for hapt; not measured on ARM boards, so they
    keep the default), and puts the weights back in the default layout so that state dicts stay
    contiguous for the wire format and the hypernetworks."""
    nhwc = X86 and all(p.device.type == "cpu" for p in model.parameters())
    if nhwc:
        model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        if nhwc:
            model.to(memory_format=torch.contiguous_format)


def train_local(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
                generator: torch.Generator) -> float:
    """Train ``model`` in place on (x, y); returns the mean local loss over the last epoch.

    Shuffling draws from ``generator`` and dropout from torch's global RNG, so a caller that
    seeds both gets bit-identical weights on the same machine.
    """
    with cpu_fast_layout(model):
        # fused: one kernel for every tensor's update (the per-tensor loop was 20 % of a
        # training step of the hapt model on CPU), the same Adam to float rounding
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=0.1 * cfg.lr,
                               fused=True)
        model.train()
        n, last = len(x), 0.0
        for _ in range(cfg.epochs):
            order, total, batches = torch.randperm(n, generator=generator), 0.0, 0
            for start in range(0, n, cfg.batch_size):
                idx = order[start : start + cfg.batch_size]
                if len(idx) < 2 and n >= 2:  # BatchNorm cannot train on a single sample
                    continue
                loss = local_loss(model(x[idx]), y[idx], cfg)
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
    with cpu_fast_layout(model):
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
