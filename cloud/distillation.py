"""Server-side ensemble distillation: how a weak device's knowledge reaches the deep exits.

HypeMeFed fills the deep blocks a shallow client could not train by generating weights; the
analysis in docs/RESULTS.md shows generated weights are further from what the client would have
trained than the global block is. This moves behaviour instead (FedDF, Lin et al., NeurIPS
2020, arXiv 2006.07242, adapted to exits of unequal depth): every participant's *deepest* exit,
on its own trained submodel, predicts a set of unlabelled proxy inputs; the weighted mean of
those probabilities is the teacher. After aggregation the new global model's deep blocks and
heads (from block ``first_block`` on) are fine-tuned so that each of their exits matches the
teacher: a tier-1 participant's exit-1 predictions reach block 3.

    loss = mean over exits e >= first_block of T^2 KL(teacher || softmax(z_e / T)),
    teacher = sum_i w_i softmax(z_i,deepest / T) / sum_i w_i.

Choices, and why:
- Blocks before ``first_block`` (and the stem) stay frozen, so exit 1 (with the default 2) is
  exactly the aggregate's: distillation cannot cost the shallow exit. Their output on the proxy
  is computed once a round, in eval mode.
- BatchNorm normalises each proxy batch by its own statistics (train mode, as FedDF) but its
  running statistics are not touched: they are the aggregate's, or static BN's when the strategy
  recomputes them from participants' data afterwards (the proxy's distribution is not the
  clients': HAPT's proxy is the unlabelled stretches between activities).
- Probabilities, not logits, are averaged: exits of different depth are calibrated differently.

The proxy data must be disjoint from every client's and the evaluation's data; for HAPT one
ships (``scripts/make_proxy.py``, common/assets/hapt/SOURCE.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cloud.config import RunConfig
from cloud.federation import seed_of
from cloud.strategies.base import ClientUpdate
from common.models import NUM_BLOCKS, SPECS, State, build_model
from common.training import cpu_fast_layout

SHIPPED_PROXY = {"hapt": Path(__file__).resolve().parents[1] / "common" / "assets" / "hapt"
                 / "hapt_proxy_windows.npz"}


def load_proxy(model: str, path: str | Path | None = None, size: int = 0,
               seed: int = 0) -> torch.Tensor:
    """Unlabelled proxy inputs for ``model``, as the model reads them: the npz ``path``'s ``x``
    (uint8 images are normalised as the datasets are; windows are taken as they are), or the
    shipped proxy of ``model``; ``size`` > 0 keeps a seeded subset of that many."""
    if path is None:
        if model not in SHIPPED_PROXY:
            raise ValueError(f"no proxy data ships for model {model!r}: give --proxy FILE.npz "
                             "(an array 'x' of unlabelled inputs no client trains on; "
                             "scripts/make_proxy.py builds one for cifar10)")
        path = SHIPPED_PROXY[model]
    try:
        with np.load(path) as f:
            x = f["x"]
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"proxy file {path}: not an npz with an array 'x' ({e})") from None
    shape = SPECS[model].input_shape
    if x.ndim != len(shape) + 1 or x.shape[1:] != shape or not len(x):
        want = ", ".join(map(str, shape))
        raise ValueError(f"proxy file {path}: expected inputs of shape (N, {want}) for model "
                         f"{model!r}, got {x.shape}")
    if size and size < len(x):
        x = x[np.sort(np.random.default_rng(seed).choice(len(x), size, replace=False))]
    out = torch.from_numpy(x.astype(np.float32))
    if x.dtype == np.uint8:
        out = (out / 255.0 - 0.5) / 0.5
    if not torch.isfinite(out).all():
        raise ValueError(f"proxy file {path}: holds NaN or infinite values")
    return out


@dataclass(frozen=True)
class DistillConfig:
    """Defaults: the configuration frozen after tuning (RunConfig's distill_* defaults)."""

    steps: int = 50
    lr: float = 1e-3  # Adam
    batch: int = 64
    temperature: float = 3.0
    first_block: int = 2  # blocks (and their heads) from this one on are fine-tuned

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch < 1 or not self.lr > 0 or not self.temperature > 0:
            raise ValueError("distillation needs steps >= 1, batch >= 1, lr > 0 and "
                             f"temperature > 0, got {self}")
        if not 1 <= self.first_block <= NUM_BLOCKS:
            raise ValueError(f"distill_from must be 1..{NUM_BLOCKS}, got {self.first_block}")


@torch.no_grad()
def deepest_probs(model: str, update: ClientUpdate, x: torch.Tensor, temperature: float,
                  batch: int = 512) -> torch.Tensor:
    """softmax(z / T) of the deepest exit of ``update``'s own trained submodel on ``x``."""
    task = update.task
    module = build_model(model, depth=task.depth, width_fraction=task.width_fraction)
    module.load_state_dict(update.state)
    module.eval()
    with cpu_fast_layout(module):
        return torch.cat([F.softmax(module(x[i:i + batch])[-1] / temperature, dim=1)
                          for i in range(0, len(x), batch)])


class TeacherEnsemble:
    """The weighted mean of participants' deepest-exit probabilities, on the proxy inputs and
    on an optional labelled ``probe`` set (to report what the teacher knows, per tier too).
    Each update is run through its submodel as it arrives, then dropped (a fleet never holds a
    round's updates); the sums run in ``order`` (the round's clients in task order), so a fleet
    whose updates arrive in any order gets the simulator's teacher bit for bit."""

    def __init__(self, model: str, proxy: torch.Tensor, temperature: float,
                 probe: tuple[torch.Tensor, torch.Tensor] | None = None,
                 order: list[int] | None = None) -> None:
        self.model, self.proxy, self.temperature, self.probe = model, proxy, temperature, probe
        self.rank = {c: i for i, c in enumerate(order or [])}
        # client -> (tier, weight, proxy probabilities, probe probabilities or None)
        self.parts: dict[int, tuple[int, float, torch.Tensor, torch.Tensor | None]] = {}

    def add(self, update: ClientUpdate, weight: float) -> None:
        p = deepest_probs(self.model, update, self.proxy, self.temperature)
        q = (deepest_probs(self.model, update, self.probe[0], self.temperature)
             if self.probe is not None else None)
        self.parts[update.task.client] = (update.task.tier, weight, p, q)

    def _ordered(self) -> list[tuple[int, float, torch.Tensor, torch.Tensor | None]]:
        return [self.parts[c] for c in sorted(self.parts, key=lambda c: self.rank.get(c, c))]

    def teacher(self) -> torch.Tensor | None:
        """The teacher's probabilities on the proxy, or None when nothing was added."""
        parts = self._ordered()
        total = sum(w for _, w, _, _ in parts)
        if not parts or total <= 0:
            return None
        return sum(w * p for _, w, p, _ in parts) / total

    def probe_accuracy(self) -> dict[str, float]:
        """Accuracy on the probe of the whole ensemble ("all") and of each tier's members."""
        parts = [part for part in self._ordered() if part[3] is not None]
        if self.probe is None or not parts:
            return {}
        y = self.probe[1]

        def accuracy(members: list[tuple[int, float, torch.Tensor, torch.Tensor | None]]
                     ) -> float:
            votes = sum(w * q for _, w, _, q in members)
            return float((votes.argmax(1) == y).float().mean())

        acc = {str(t): accuracy([m for m in parts if m[0] == t])
               for t in sorted({m[0] for m in parts})}
        acc["all"] = accuracy(parts)
        return acc


@torch.no_grad()
def frozen_features(net: torch.nn.Module, x: torch.Tensor, first: int, batch: int = 512
                    ) -> torch.Tensor:
    """The input of block ``first`` (0-based) for every row of ``x``: the frozen part runs once
    a round, not once a step (the stem and block 1 are most of the hapt model's compute)."""
    net.eval()
    with cpu_fast_layout(net):
        out = []
        for i in range(0, len(x), batch):
            h = net.stem(net.view(x[i:i + batch]))
            for block in net.blocks[:first]:
                h = block(h)
            out.append(h.contiguous())
    return torch.cat(out)


def deep_logits(net: torch.nn.Module, h: torch.Tensor, first: int) -> list[torch.Tensor]:
    """The logits of exits ``first`` + 1 on from block ``first``'s input ``h``."""
    logits = []
    for block, head in zip(net.blocks[first:], net.heads[first:], strict=True):
        h = block(h)
        logits.append(head(h))
    return logits


def distill(model: str, state: State, proxy: torch.Tensor, teacher: torch.Tensor,
            cfg: DistillConfig, seed: int, device: str = "cpu") -> tuple[State, dict[str, Any]]:
    """``state`` with its blocks from ``cfg.first_block`` on fine-tuned towards ``teacher``
    on ``proxy``; running BatchNorm statistics and everything before are returned unchanged."""
    start = time.perf_counter()
    net = build_model(model).to(device)
    net.load_state_dict(state)
    first = cfg.first_block - 1
    h = frozen_features(net, proxy.to(device), first)
    trained = [*net.blocks[first:], *net.heads[first:]]
    params = [p for m in trained for p in m.parameters()]
    for m in trained:
        m.train()
    opt = torch.optim.Adam(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(seed)
    target, t = teacher.to(device), cfg.temperature
    losses = []
    with torch.random.fork_rng(devices=[]):  # dropout: seeded, and the caller's RNG untouched
        torch.manual_seed(seed)
        for _ in range(cfg.steps):
            idx = torch.randint(len(h), (min(cfg.batch, len(h)),), generator=gen).to(device)
            logits = deep_logits(net, h[idx], first)
            loss = t * t * sum(F.kl_div(F.log_softmax(z / t, dim=1), target[idx],
                                        reduction="batchmean") for z in logits) / len(logits)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    params_now = {k: v.detach().cpu() for k, v in net.named_parameters()}
    # buffers (running statistics, batch counters) and frozen parameters stay as they came
    out = {k: params_now.get(k, v) for k, v in state.items()}
    tail = max(1, len(losses) // 10)
    return out, {"distill_kl": [losses[0], float(np.mean(losses[-tail:]))],
                 "distill_s": time.perf_counter() - start}


class Distiller:
    """The server step as a run uses it: the proxy, the settings, one ensemble per round."""

    def __init__(self, model: str, proxy: torch.Tensor, cfg: DistillConfig, seed: int,
                 device: str = "cpu") -> None:
        self.model, self.proxy, self.cfg, self.seed, self.device = model, proxy, cfg, seed, device

    @classmethod
    def for_run(cls, cfg: RunConfig) -> Distiller | None:
        """The run's distillation step, or None when it has none."""
        if not cfg.distills:
            return None
        settings = DistillConfig(cfg.distill_steps, cfg.distill_lr, cfg.distill_batch,
                                 cfg.distill_temperature, cfg.distill_from)
        proxy = load_proxy(cfg.model, cfg.proxy, cfg.proxy_size, seed_of(cfg.seed, 6))
        return cls(cfg.model, proxy, settings, cfg.seed, cfg.device)

    def ensemble(self, order: list[int], probe: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> TeacherEnsemble:
        return TeacherEnsemble(self.model, self.proxy, self.cfg.temperature, probe, order)

    def apply(self, state: State, ensemble: TeacherEnsemble, server_round: int
              ) -> tuple[State, dict[str, Any]]:
        """``state`` distilled from ``ensemble``; unchanged when no participant taught."""
        teacher = ensemble.teacher()
        if teacher is None:
            return state, {}
        state, metrics = distill(self.model, state, self.proxy, teacher, self.cfg,
                                 seed_of(self.seed, 7, server_round), self.device)
        probe = ensemble.probe_accuracy()
        if probe:
            metrics["teacher_acc"] = probe
        return state, metrics
