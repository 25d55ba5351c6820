import numpy as np
import pytest

from common import partition as part
from common.partition import partition, split_local

LABELS = np.random.default_rng(0).integers(0, 6, 3000)


def check_cover(parts, n):
    assert all(np.all(np.diff(p) > 0) for p in parts)  # sorted, no repeats
    allidx = np.concatenate(parts)
    assert len(allidx) == n and np.array_equal(np.sort(allidx), np.arange(n))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_cover_and_determinism(scheme):
    parts = partition(LABELS, 20, scheme, alpha=0.3, seed=1)
    assert len(parts) == 20
    check_cover(parts, len(LABELS))
    again = partition(LABELS, 20, scheme, alpha=0.3, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition(LABELS, 20, scheme, alpha=0.3, seed=2)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_iid_sizes():
    sizes = [len(p) for p in partition(LABELS, 7, "iid")]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_min_size_and_skew():
    def mean_entropy(alpha):
        ents = []
        for p in partition(LABELS, 20, "dirichlet", alpha=alpha, seed=3, min_size=30):
            assert len(p) >= 30
            q = np.bincount(LABELS[p], minlength=6) / len(p)
            ents.append(-(q[q > 0] * np.log(q[q > 0])).sum())
        return np.mean(ents)

    skewed, flat = mean_entropy(0.1), mean_entropy(100)
    assert flat > 0.95 * np.log(6) and skewed < 0.6 * flat


def test_dirichlet_impossible(monkeypatch):
    with pytest.raises(ValueError, match="fewer clients"):
        partition(LABELS[:100], 20, "dirichlet", min_size=10)
    monkeypatch.setattr(part, "MAX_TRIES", 3)
    with pytest.raises(ValueError, match="larger alpha"):
        partition(LABELS[:100], 10, "dirichlet", alpha=0.01, min_size=10)


def test_subject():
    groups = np.array([7, 3, 3, 9, 7, 3, 9, 12])
    parts = partition(np.zeros(8, int), 4, "subject", groups=groups)
    assert [p.tolist() for p in parts] == [[1, 2, 5], [0, 4], [3, 6], [7]]
    with pytest.raises(ValueError, match="has 4 subjects"):
        partition(np.zeros(8, int), 5, "subject", groups=groups)
    with pytest.raises(ValueError, match="subject id"):
        partition(np.zeros(8, int), 4, "subject")
    with pytest.raises(ValueError, match="unknown partition scheme"):
        partition(np.zeros(8, int), 4, "random")


def test_split_local():
    idx = np.arange(1000, 1100)[::-1]
    tr, te = split_local(idx, seed=4)
    assert len(tr) == 80 and len(te) == 20 and not set(tr) & set(te)
    assert np.array_equal(np.sort(np.concatenate([tr, te])), np.sort(idx))
    assert np.all(np.diff(tr) > 0) and np.all(np.diff(te) > 0)
    tr2, te2 = split_local(idx, seed=4)
    assert np.array_equal(tr, tr2) and np.array_equal(te, te2)
    assert not np.array_equal(tr, split_local(idx, seed=5)[0])
    assert [len(a) for a in split_local(np.array([5, 9]), 0)] == [1, 1]
    assert [len(a) for a in split_local(np.array([5, 9, 11]), 0, train_fraction=0.1)] == [1, 2]
    assert [len(a) for a in split_local(np.array([5]), 0)] == [1, 0]


def test_tiers_by_label_put_the_lowest_dominant_labels_in_tier_1():
    from cloud.federation import Federation
    from common.data import Dataset

    data = Dataset("t", np.zeros((len(LABELS), 1), np.float32), LABELS, None, None, None, ())
    args = (data, 30, 6, (1 / 3, 1 / 3, 1 / 3), "dirichlet", 0.1, 3)
    fed = Federation.build(*args, tier_by="label")
    dominant = [np.bincount(LABELS[t]).argmax() for t in fed.train]
    # independent reference: clients sorted by dominant label, cut in thirds
    ranked = sorted(dominant)
    for client, tier in enumerate(fed.tiers):
        assert ranked[10 * (tier - 1)] <= dominant[client] <= ranked[10 * tier - 1]
    assert sorted(fed.tiers) == [1] * 10 + [2] * 10 + [3] * 10
    random = Federation.build(*args)  # same shares, only the tiers differ
    assert all(np.array_equal(a, b) for a, b in zip(fed.train, random.train, strict=True))
    assert fed.tiers != random.tiers
    with pytest.raises(ValueError, match="tier_by"):
        Federation.build(*args, tier_by="size")
