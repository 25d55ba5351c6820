"""Hypernetworks that map block k's weights to block k+1's: low-rank (LRF) and naive.

LRF (method.md): view the source conv (Co, Ci, 3, 3) as a (Co*3) x (Ci*3) matrix, truncate its
SVD at rank r into A = (U_r sqrt S_r)^T and B = sqrt S_r V_r^T, map each of the r rows of A and
of B through a two-layer MLP to the target's sizes, and multiply the mapped factors back into a
target conv of rank <= r. Naive: one MLP from the flattened source to the flattened target (also
used, small, for BatchNorm vectors and exit-head rows: cloud/strategies/hypemefed.py).

Every hypernetwork splits into ``factorize`` (no parameters: the SVD, or a flatten), ``raw``
(the learned map, output in a layout of its own: the target matrix for LRF) and ``raw_layout``
(a target in that layout). ``fit`` is one round's training on all of a round's pairs at once:
1. each source is factorised once (one batched SVD), each target laid out once;
2. the MLPs' output layers are solved in closed form: for fixed hidden features the output is
   linear in them (LRF: bilinear, so the two factors' layers are solved alternately), and the
   ridge term pulls them towards the weights the round started from, so what earlier rounds
   taught is kept (the closed-form counterpart of a few persistent Adam epochs);
3. optionally, ``epochs`` full-batch Adam steps on all layers.
With the default settings a round costs a few small linear solves instead of the authors'
25 epochs of batch-1 Adam steps, at a lower generation error on held-out clients
(bench/hypernet_cost.py, docs/METHOD.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

ConvShape = tuple[int, int, int, int]

RIDGE = 0.03  # relative to the mean diagonal of the features' Gram matrix (scale-free)
SWEEPS = 5  # alternations between LRF's two output layers


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


# ---- closed-form output layers ---------------------------------------------------------------

def _features(mlp: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The MLP's hidden activations with a column of ones: the output layer is linear in them."""
    h = mlp[1](mlp[0](x))
    return torch.cat([h, torch.ones_like(h[..., :1])], dim=-1)


def _output_weight(mlp: nn.Sequential) -> torch.Tensor:
    """The output layer as one (n_out, hidden + 1) matrix, bias last."""
    return torch.cat([mlp[2].weight, mlp[2].bias[:, None]], dim=1)


def _set_output_weight(mlp: nn.Sequential, w: torch.Tensor) -> None:
    mlp[2].weight.copy_(w[:, :-1])
    mlp[2].bias.copy_(w[:, -1])


def ridge_solve(x: torch.Tensor, t: torch.Tensor, anchor: torch.Tensor,
                ridge: float) -> torch.Tensor:
    """argmin_W sum_p ||W x_p - t_p||^2 + lam ||W - anchor||^2 for x (P, k, n), t (P, m, n),
    anchor (m, k); lam = ridge * mean diagonal of sum_p x_p x_p^T."""
    gram = (x @ x.transpose(-1, -2)).sum(0)
    lam = ridge * gram.diagonal().mean().clamp_min(1e-12)
    rhs = (t @ x.transpose(-1, -2)).sum(0) + lam * anchor
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + lam * eye, rhs.T).T


# ---- the hypernetworks ------------------------------------------------------------------------

class LRFHypernet(nn.Module):
    def __init__(self, source_shape: ConvShape, target_shape: ConvShape, *, rank: int = 100,
                 hidden: int = 128) -> None:
        super().__init__()
        (co, ci, kh, kw), (to, ti, th, tw) = source_shape, target_shape
        self.source_shape, self.target_shape = tuple(source_shape), tuple(target_shape)
        self.rank = max(1, min(rank, co * kh, ci * kw))  # rank is clipped to the matrix
        self.map_a = _mlp(co * kh, hidden, to * th)
        self.map_b = _mlp(ci * kw, hidden, ti * tw)

    def factorize(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return low_rank_factors(source, self.rank)

    def raw(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The generated weight as a (..., To*th, Ti*tw) matrix."""
        return self.map_a(a).transpose(-1, -2) @ self.map_b(b)

    def raw_layout(self, target: torch.Tensor) -> torch.Tensor:
        return conv_to_matrix(target)

    def squared_errors(self, factors: tuple[torch.Tensor, ...], want: torch.Tensor
                       ) -> torch.Tensor:
        """Per pair ||A'^T B' - T||^2 = <A'A'^T, B'B'^T> - 2 <A' T, B'> + ||T||^2, which never
        forms the (To*th) x (Ti*tw) output or its gradient: r x r and r x n products only."""
        a, b = self.map_a(factors[0]), self.map_b(factors[1])
        square = ((a @ a.transpose(-1, -2)) * (b @ b.transpose(-1, -2))).sum((-1, -2))
        cross = ((a @ want) * b).sum((-1, -2))
        return square - 2 * cross + torch.linalg.vector_norm(want, dim=(-1, -2)).square()

    @torch.no_grad()
    def solve_output_layers(self, factors: tuple[torch.Tensor, ...], want: torch.Tensor,
                            ridge: float, sweeps: int) -> None:
        """Output = Wa G_p Wb^T with G_p = Fa_p^T Fb_p (hidden features of both factors):
        linear in Wa for fixed Wb and vice versa, so alternate ridge solves, each anchored to
        the weights the round started from."""
        g = _features(self.map_a, factors[0]).transpose(-1, -2) @ _features(self.map_b,
                                                                            factors[1])
        wa0, wb0 = _output_weight(self.map_a), _output_weight(self.map_b)
        wa, wb = wa0, wb0
        for _ in range(sweeps):
            wa = ridge_solve(g @ wb.T, want, wa0, ridge)
            wb = ridge_solve(g.transpose(-1, -2) @ wa.T, want.transpose(-1, -2), wb0, ridge)
        _set_output_weight(self.map_a, wa)
        _set_output_weight(self.map_b, wb)

    def from_factors(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return matrix_to_conv(self.raw(a, b), self.target_shape)

    def forward(self, source: torch.Tensor) -> torch.Tensor:
        return self.from_factors(*self.factorize(source))


class NaiveHypernet(nn.Module):
    """An MLP from the flattened source to the flattened target; shapes of any rank, any number
    of leading batch dimensions."""

    def __init__(self, source_shape: Sequence[int], target_shape: Sequence[int], *,
                 hidden: int = 64, **_: object) -> None:
        super().__init__()
        self.source_shape, self.target_shape = tuple(source_shape), tuple(target_shape)
        self.map = _mlp(int(torch.Size(self.source_shape).numel()), hidden,
                        int(torch.Size(self.target_shape).numel()))

    def factorize(self, source: torch.Tensor) -> tuple[torch.Tensor]:
        return (source.flatten(-len(self.source_shape)),)

    def raw(self, flat: torch.Tensor) -> torch.Tensor:
        return self.map(flat)

    def raw_layout(self, target: torch.Tensor) -> torch.Tensor:
        return target.flatten(-len(self.target_shape))

    def squared_errors(self, factors: tuple[torch.Tensor, ...], want: torch.Tensor
                       ) -> torch.Tensor:
        return (self.raw(*factors) - want).square().flatten(1).sum(1)

    @torch.no_grad()
    def solve_output_layers(self, factors: tuple[torch.Tensor, ...], want: torch.Tensor,
                            ridge: float, sweeps: int) -> None:
        """One ridge solve: every row (pair, or pair x row) is one sample of a linear map."""
        feats = _features(self.map, factors[0])
        x = feats.reshape(-1, feats.shape[-1]).T[None]
        t = want.reshape(-1, want.shape[-1]).T[None]
        _set_output_weight(self.map, ridge_solve(x, t, _output_weight(self.map), ridge))

    def from_factors(self, flat: torch.Tensor) -> torch.Tensor:
        return self.raw(flat).reshape(*flat.shape[:-1], *self.target_shape)

    def forward(self, source: torch.Tensor) -> torch.Tensor:
        return self.from_factors(*self.factorize(source))


HYPERNETS = {"lrf": LRFHypernet, "naive": NaiveHypernet}
# LRF at 128 hidden units (the authors: 512): as accurate on held-out clients once the output
# layers are solved, and 4x smaller (bench/hypernet_cost.py). Naive as the authors.
DEFAULT_HIDDEN = {"lrf": 128, "naive": 64}


def build_hypernet(kind: str, source_shape: Sequence[int], target_shape: Sequence[int], *,
                   rank: int = 100, hidden: int | None = None) -> nn.Module:
    if kind not in HYPERNETS:
        raise ValueError(f"unknown hypernetwork {kind!r}; choose one of {', '.join(HYPERNETS)}")
    return HYPERNETS[kind](source_shape, target_shape, rank=rank,
                           hidden=hidden or DEFAULT_HIDDEN[kind])


def stack(tensors: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """A batch along dim 0 (a tensor passes through)."""
    return tensors if isinstance(tensors, torch.Tensor) else torch.stack(list(tensors))


def stack_raw_layout(hypernet: nn.Module, targets: torch.Tensor | Sequence[torch.Tensor]
                     ) -> torch.Tensor:
    """The targets in the hypernetwork's raw layout, one contiguous batch, filled pair by pair:
    stacking first and laying out after would hold two copies of all targets at once."""
    first = hypernet.raw_layout(targets[0])
    out = torch.empty((len(targets), *first.shape), dtype=first.dtype, device=first.device)
    for i, t in enumerate(targets):
        out[i] = hypernet.raw_layout(t)
    return out


@torch.no_grad()
def relative_error(hypernet: nn.Module, sources: torch.Tensor | Sequence[torch.Tensor],
                   targets: torch.Tensor | Sequence[torch.Tensor]) -> float:
    """Mean over pairs of ||generated - target|| / ||target||: 1.0 is as bad as generating zeros."""
    hypernet.eval()
    targets = stack(targets)
    diff = (hypernet(stack(sources)) - targets).flatten(1).norm(dim=1)
    return float((diff / targets.flatten(1).norm(dim=1)).mean())


@dataclass(frozen=True)
class FitResult:
    loss: float  # MSE per element, mean over pairs, after training
    relative_error: float  # mean over pairs of ||generated - target|| / ||target||


def fit(hypernet: nn.Module, optimizer: torch.optim.Optimizer,
        sources: torch.Tensor | Sequence[torch.Tensor],
        targets: torch.Tensor | Sequence[torch.Tensor], epochs: int = 0, *,
        ridge: float = RIDGE, sweeps: int = SWEEPS) -> FitResult:
    """One round's training on all pairs (stacked along dim 0): the closed-form output layers
    (``sweeps`` = 0 skips them), then ``epochs`` full-batch Adam steps. Nothing random."""
    with torch.no_grad():
        factors = hypernet.factorize(stack(sources))
        want = stack_raw_layout(hypernet, targets)
    if sweeps > 0:
        hypernet.solve_output_layers(factors, want, ridge, sweeps)
    hypernet.train()
    per_element = want[0].numel()
    for _ in range(epochs):
        loss = hypernet.squared_errors(factors, want).mean() / per_element
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # gradients are not kept between rounds
    with torch.no_grad():
        sq = hypernet.squared_errors(factors, want).clamp_min(0)
        norms = want.flatten(1).norm(dim=1)
        return FitResult(float(sq.mean() / per_element), float((sq.sqrt() / norms).mean()))
