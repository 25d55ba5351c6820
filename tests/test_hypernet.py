import copy

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
    relative_error,
    ridge_solve,
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


def linear_pairs(n=4):
    """Targets a fixed linear function of the sources: learnable by both kinds."""
    torch.manual_seed(0)
    sources = torch.randn(n, 8, 4, 3, 3) * 0.3
    mix = torch.randn(16, 8) * 0.2
    return sources, torch.einsum("oi,pijkl->pojkl", mix, sources).repeat(1, 1, 2, 1, 1)


@pytest.mark.parametrize("kind", ["lrf", "naive"])
def test_adam_epochs_alone_learn_a_consistent_mapping(kind):
    sources, targets = linear_pairs()
    h = build_hypernet(kind, (8, 4, 3, 3), (16, 8, 3, 3), rank=12, hidden=64)
    opt = torch.optim.Adam(h.parameters(), lr=2e-3)
    first = fit(h, opt, sources, targets, 1, sweeps=0)
    last = fit(h, opt, sources, targets, 150, sweeps=0)
    assert last.loss < 0.2 * first.loss


@pytest.mark.parametrize("kind", ["lrf", "naive"])
def test_fit_reports_the_error_of_what_it_generates(kind):
    sources, targets = linear_pairs()
    h = build_hypernet(kind, (8, 4, 3, 3), (16, 8, 3, 3), rank=12, hidden=64)
    result = fit(h, torch.optim.Adam(h.parameters(), lr=1e-3), sources, targets, 3)
    with torch.no_grad():
        generated = h.eval()(sources)
    assert result.loss == pytest.approx(float(((generated - targets) ** 2).mean()), rel=1e-4)
    assert result.relative_error == pytest.approx(relative_error(h, sources, targets), rel=1e-4)
    per_pair = [float((g - t).norm() / t.norm()) for g, t in zip(generated, targets, strict=True)]
    assert result.relative_error == pytest.approx(np.mean(per_pair), rel=1e-4)


def test_lrf_squared_errors_without_forming_the_output():
    """The trace form equals the error of the explicitly formed product (float64)."""
    h = LRFHypernet((8, 4, 3, 3), (16, 8, 3, 3), rank=6, hidden=16).double()
    sources, targets = (t.double() for t in linear_pairs(3))
    factors = h.factorize(sources)
    want = conv_to_matrix(targets).contiguous()
    explicit = ((h.raw(*factors) - want) ** 2).flatten(1).sum(1)
    torch.testing.assert_close(h.squared_errors(factors, want), explicit)


def test_ridge_solve_against_least_squares():
    """argmin sum_p ||W x_p - t_p||^2 + lam ||W - anchor||^2 is ordinary least squares on
    [x_1 .. x_P, sqrt(lam) I] -> [t_1 .. t_P, sqrt(lam) anchor]."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    t = torch.randn(3, 4, 7, generator=g, dtype=torch.float64)
    anchor = torch.randn(4, 5, generator=g, dtype=torch.float64)
    ridge = 0.1
    w = ridge_solve(x, t, anchor, ridge)
    gram = sum(xp @ xp.T for xp in x)
    lam = ridge * float(np.mean(np.diag(gram.numpy())))
    xs = np.concatenate([*x.numpy(), np.sqrt(lam) * np.eye(5)], axis=1)  # (5, 3*7 + 5)
    ts = np.concatenate([*t.numpy(), np.sqrt(lam) * anchor.numpy()], axis=1)
    ref = np.linalg.lstsq(xs.T, ts.T, rcond=None)[0].T
    np.testing.assert_allclose(w.numpy(), ref, atol=1e-10)


def test_naive_solve_recovers_an_output_layer_exactly():
    torch.manual_seed(0)
    h = NaiveHypernet((8, 4, 3, 3), (16, 8, 3, 3), hidden=16)
    teacher = copy.deepcopy(h)
    with torch.no_grad():
        teacher.map[2].weight.normal_(0, 0.3)
    sources = torch.randn(40, 8, 4, 3, 3)  # more pairs than hidden units: one solution
    targets = teacher(sources).detach()
    result = fit(h, torch.optim.Adam(h.parameters()), sources, targets, 0, ridge=1e-9)
    assert result.relative_error < 1e-4
    torch.testing.assert_close(h.map[2].weight, teacher.map[2].weight, atol=1e-3, rtol=1e-3)


def test_lrf_solve_fits_and_the_ridge_anchors_to_the_previous_round():
    torch.manual_seed(0)
    h = LRFHypernet((8, 4, 3, 3), (16, 8, 3, 3), rank=12, hidden=32)
    teacher = copy.deepcopy(h)
    with torch.no_grad():
        for layer in (teacher.map_a[2], teacher.map_b[2]):
            layer.weight.normal_(0, 0.3)
    sources = torch.randn(6, 8, 4, 3, 3)
    targets = teacher(sources).detach()
    before = relative_error(h, sources, targets)
    solved = copy.deepcopy(h)
    result = fit(solved, torch.optim.Adam(solved.parameters()), sources, targets, 0,
                 ridge=1e-9, sweeps=20)
    assert before > 0.9 and result.relative_error < 0.1
    # a huge ridge keeps the weights the round started from: what earlier rounds taught
    kept = copy.deepcopy(h)
    fit(kept, torch.optim.Adam(kept.parameters()), sources, targets, 0, ridge=1e9)
    for a, b in zip(kept.parameters(), h.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # hidden layers are untouched by the solve: only output layers move
    torch.testing.assert_close(solved.map_a[0].weight, h.map_a[0].weight, atol=0, rtol=0)


def test_naive_hypernet_maps_rows_of_any_rank():
    """Head rows: (pairs, classes, features) -> (pairs, classes, features'), row by row."""
    h = NaiveHypernet((5,), (3,), hidden=4)
    x = torch.randn(2, 7, 5)
    out = h(x)
    assert out.shape == (2, 7, 3)
    torch.testing.assert_close(out[1, 4], h(x[1, 4]))
