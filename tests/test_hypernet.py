import numpy as np
import pytest
import torch

from cloud.hypernet import (
    LRFHypernet,
    NaiveHypernet,
    build_hypernet,
    conv_to_matrix,
    fit,
    low_rank_factors,
    matrix_to_conv,
)
from cloud.strategies.hypemefed import HypeMeFed


def test_matrix_view_roundtrip_and_layout():
    w = torch.randn(4, 2, 3, 3)
    m = conv_to_matrix(w)
    assert m.shape == (12, 6)
    # row (co, kh), column (ci, kw)
    assert m[1 * 3 + 2, 1 * 3 + 0] == w[1, 1, 2, 0]
    assert torch.equal(matrix_to_conv(m, w.shape), w)


@pytest.mark.parametrize("rank", [1, 5, 18])
def test_low_rank_factors_are_truncated_svd(rank):
    w = torch.randn(8, 6, 3, 3, dtype=torch.float64)
    a, b = low_rank_factors(w, rank)
    assert a.shape == (rank, 24) and b.shape == (rank, 18)
    u, s, vt = np.linalg.svd(conv_to_matrix(w).numpy(), full_matrices=False)
    best = (u[:, :rank] * s[:rank]) @ vt[:rank]  # Eckart-Young: the best rank-r approximation
    np.testing.assert_allclose((a.T @ b).numpy(), best, atol=1e-10)
    # sign convention: the largest-magnitude entry of every left factor row is positive
    rows = a / a.norm(dim=1, keepdim=True)
    assert torch.all(rows.gather(1, rows.abs().argmax(1, keepdim=True)) > 0)
    # ... so a flipped source gives the same factors up to the flip of B
    a2, b2 = low_rank_factors(-w, rank)
    torch.testing.assert_close(a2, a)
    torch.testing.assert_close(b2, -b)


def test_lrf_output_shape_and_rank():
    h = LRFHypernet((16, 8, 3, 3), (32, 16, 3, 3), rank=4, hidden=32)
    out = h(torch.randn(16, 8, 3, 3))
    assert out.shape == (32, 16, 3, 3)
    assert torch.linalg.matrix_rank(conv_to_matrix(out.detach())) <= 4
    assert LRFHypernet((4, 2, 3, 3), (8, 4, 3, 3), rank=100).rank == 6  # clipped to min(12, 6)


def test_parameter_counts_match_release():
    # method.md: naive at hidden 64 has 89.6M (svhn) and 358.3M (unimib) parameters
    assert sum(p.numel() for p in HypeMeFed(model="svhn", hypernet="naive")
               .hypernets.parameters()) == 89_579_776
    assert isinstance(build_hypernet("naive", (4, 2, 3, 3), (8, 4, 3, 3)), NaiveHypernet)
    with pytest.raises(ValueError, match="unknown hypernetwork"):
        build_hypernet("huge", (4, 2, 3, 3), (8, 4, 3, 3))


@pytest.mark.parametrize("kind", ["lrf", "naive"])
def test_fit_learns_a_consistent_mapping(kind):
    torch.manual_seed(0)
    # targets are a fixed linear function of the sources: learnable by both kinds
    sources = [torch.randn(8, 4, 3, 3) * 0.3 for _ in range(4)]
    mix = torch.randn(16, 8) * 0.2
    targets = [torch.einsum("oi,ijkl->ojkl", mix, s).repeat(1, 2, 1, 1) for s in sources]
    h = build_hypernet(kind, (8, 4, 3, 3), (16, 8, 3, 3), rank=12, hidden=64)
    opt = torch.optim.Adam(h.parameters(), lr=2e-3)
    first = fit(h, opt, sources, targets, 1, torch.Generator().manual_seed(0))
    last = fit(h, opt, sources, targets, 150, torch.Generator().manual_seed(1))
    assert last < 0.2 * first
