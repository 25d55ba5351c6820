"""Hypernetworks that map block k's conv weight to block k+1's: low-rank (LRF) and naive.

LRF (method.md): view the source conv (Co, Ci, 3, 3) as a (Co*3) x (Ci*3) matrix, truncate its
SVD at rank r into A = (U_r sqrt S_r)^T and B = sqrt S_r V_r^T, map each of the r rows of A and
of B through a two-layer MLP to the target's sizes, and multiply the mapped factors back into a
target conv of rank <= r. Naive: one MLP from the flattened source to the flattened target.

The factorisation of a source depends only on the source, so it is computed once per training
pair per round (``factorize``), not at every step; rows of A and B are mapped as a batch.
"""

from __future__ import annotations

import torch
from torch import nn

ConvShape = tuple[int, int, int, int]


def conv_to_matrix(w: torch.Tensor) -> torch.Tensor:
    """(..., Co, Ci, kh, kw) -> (..., Co*kh, Ci*kw): rows are (out channel, kernel row)."""
    *lead, co, ci, kh, kw = w.shape
    return w.transpose(-3, -2).reshape(*lead, co * kh, ci * kw)


def matrix_to_conv(m: torch.Tensor, shape: ConvShape) -> torch.Tensor:
    """Inverse of ``conv_to_matrix``."""
    co, ci, kh, kw = shape
    return m.reshape(*m.shape[:-2], co, kh, ci, kw).transpose(-3, -2)


def low_rank_factors(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of shapes (..., r, Co*kh) and (..., r, Ci*kw) with A^T B the best rank-r matrix.

    Singular vectors are defined up to sign; each pair (u_i, v_i) is flipped so that u_i's
    largest-magnitude entry is positive, so similar sources give similar factors.
    """
    u, s, vh = torch.linalg.svd(conv_to_matrix(w), full_matrices=False)
    u, s, vh = u[..., :rank], s[..., :rank], vh[..., :rank, :]
    sign = torch.sign(torch.gather(u, -2, u.abs().argmax(-2, keepdim=True)))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    root = s.sqrt().unsqueeze(-1)
    a = (u * sign).transpose(-1, -2) * root
    b = vh * sign.transpose(-1, -2) * root
    return a, b


def _mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_out))


class LRFHypernet(nn.Module):
    def __init__(self, source_shape: ConvShape, target_shape: ConvShape, *, rank: int = 100,
                 hidden: int = 512) -> None:
        super().__init__()
        (co, ci, kh, kw), (to, ti, th, tw) = source_shape, target_shape
        self.source_shape, self.target_shape = tuple(source_shape), tuple(target_shape)
        self.rank = max(1, min(rank, co * kh, ci * kw))  # rank is clipped to the matrix
        self.map_a = _mlp(co * kh, hidden, to * th)
        self.map_b = _mlp(ci * kw, hidden, ti * tw)

    def factorize(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return low_rank_factors(source, self.rank)

    def from_factors(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        m = self.map_a(a).transpose(-1, -2) @ self.map_b(b)
        return matrix_to_conv(m, self.target_shape)

    def forward(self, source: torch.Tensor) -> torch.Tensor:
        return self.from_factors(*self.factorize(source))


class NaiveHypernet(nn.Module):
    def __init__(self, source_shape: ConvShape, target_shape: ConvShape, *, hidden: int = 64,
                 **_: object) -> None:
        super().__init__()
        self.source_shape, self.target_shape = tuple(source_shape), tuple(target_shape)
        n_in = int(torch.Size(source_shape).numel())
        self.map = _mlp(n_in, hidden, int(torch.Size(target_shape).numel()))

    def factorize(self, source: torch.Tensor) -> tuple[torch.Tensor]:
        return (source.flatten(-4),)

    def from_factors(self, flat: torch.Tensor) -> torch.Tensor:
        return self.map(flat).reshape(*flat.shape[:-1], *self.target_shape)

    def forward(self, source: torch.Tensor) -> torch.Tensor:
        return self.from_factors(*self.factorize(source))


HYPERNETS = {"lrf": LRFHypernet, "naive": NaiveHypernet}
DEFAULT_HIDDEN = {"lrf": 512, "naive": 64}


def build_hypernet(kind: str, source_shape: ConvShape, target_shape: ConvShape, *,
                   rank: int = 100, hidden: int | None = None) -> nn.Module:
    if kind not in HYPERNETS:
        raise ValueError(f"unknown hypernetwork {kind!r}; choose one of {', '.join(HYPERNETS)}")
    return HYPERNETS[kind](source_shape, target_shape, rank=rank,
                           hidden=hidden or DEFAULT_HIDDEN[kind])


@torch.no_grad()
def relative_error(hypernet: nn.Module, sources: list[torch.Tensor],
                   targets: list[torch.Tensor]) -> float:
    """Mean over pairs of ||generated - target|| / ||target||: 1.0 is as bad as generating zeros."""
    hypernet.eval()
    errs = [(hypernet(s) - t).norm() / t.norm() for s, t in zip(sources, targets, strict=True)]
    return float(torch.stack(errs).mean())


def fit(hypernet: nn.Module, optimizer: torch.optim.Optimizer, sources: list[torch.Tensor],
        targets: list[torch.Tensor], epochs: int, generator: torch.Generator) -> float:
    """MSE training at batch 1 (as the authors); returns the mean loss of the last epoch."""
    with torch.no_grad():
        factors = [hypernet.factorize(s) for s in sources]
    hypernet.train()
    last = 0.0
    for _ in range(epochs):
        total = 0.0
        for i in torch.randperm(len(sources), generator=generator).tolist():
            loss = torch.mean((hypernet.from_factors(*factors[i]) - targets[i]) ** 2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
        last = total / len(sources)
    return last
