"""How a dataset is dealt out to federated clients, and how each client splits its share.

Everything is a pure function of the seed (``numpy.random.default_rng``), so a resumed run, a
real device fleet and a simulation all see the same clients.
"""

from __future__ import annotations

import numpy as np

MAX_TRIES = 1000  # Dirichlet redraws before giving up on min_size


def _dirichlet(labels: np.ndarray, num_clients: int, alpha: float, min_size: int,
               rng: np.random.Generator) -> list[np.ndarray]:
    """NIID-bench's label-skew partition, as the HypeMeFed authors used it: per class, Dirichlet
    proportions over clients, with clients already at a fair share (N / clients) left out so no
    client swallows the data; redrawn until every client holds ``min_size`` samples."""
    n = len(labels)
    for _ in range(MAX_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        sizes = np.zeros(num_clients, dtype=np.int64)
        for k in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == k))
            p = rng.dirichlet(np.full(num_clients, alpha)) * (sizes < n / num_clients)
            p = p / p.sum() if p.sum() > 0 else np.full(num_clients, 1 / num_clients)
            cuts = (np.cumsum(p) * len(idx)).astype(np.int64)[:-1]
            for c, chunk in enumerate(np.split(idx, cuts)):
                parts[c].append(chunk)
                sizes[c] += len(chunk)
        if sizes.min() >= min_size:
            return [np.concatenate(p) for p in parts]
    raise ValueError(f"no Dirichlet(alpha={alpha}) partition of {n} samples over {num_clients} "
                     f"clients gave every client >= {min_size} samples in {MAX_TRIES} tries: use a "
                     "larger alpha, fewer clients or a smaller min_size")


def partition(labels: np.ndarray, num_clients: int, scheme: str, *, alpha: float = 0.5,
              groups: np.ndarray | None = None, seed: int = 0,
              min_size: int = 10) -> list[np.ndarray]:
    """Indices of each client's share: every sample in exactly one client, each array sorted.

    ``iid``: a seeded shuffle cut into near-equal parts. ``dirichlet``: label skew of strength
    ``alpha`` (smaller = more skewed), every client >= ``min_size`` samples. ``subject``: one
    client per distinct ``groups`` id, in sorted id order (natural clients, e.g. HAPT's 30 people).
    """
    labels = np.asarray(labels).reshape(-1)
    n = len(labels)
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        if num_clients > n:
            raise ValueError(f"{num_clients} clients but only {n} samples")
        parts = np.array_split(rng.permutation(n), num_clients)
    elif scheme == "dirichlet":
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        if num_clients * min_size > n:
            raise ValueError(f"{num_clients} clients of >= {min_size} samples need more than the "
                             f"{n} samples there are: use fewer clients or a smaller min_size")
        parts = _dirichlet(labels, num_clients, alpha, min_size, rng)
    elif scheme == "subject":
        if groups is None:
            raise ValueError("the subject partition needs a subject id per sample, and this "
                             "dataset has none: use the iid or dirichlet partition")
        groups = np.asarray(groups).reshape(-1)
        if len(groups) != n:
            raise ValueError(f"{len(groups)} subject ids for {n} samples")
        ids = np.unique(groups)
        if num_clients != len(ids):
            raise ValueError(f"the subject partition makes one client per subject and this dataset "
                             f"has {len(ids)} subjects: set the number of clients to {len(ids)} "
                             f"(got {num_clients})")
        parts = [np.flatnonzero(groups == g) for g in ids]
    else:
        raise ValueError(f"unknown partition scheme {scheme!r}; choose iid, dirichlet or subject")
    return [np.sort(p).astype(np.int64) for p in parts]


def split_local(indices: np.ndarray, seed: int,
                train_fraction: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    """A client's own train/test split of its share (the authors' 80/20): a seeded shuffle, the
    first ``round(train_fraction * n)`` to train, the rest to test, each part non-empty when
    n >= 2 so every client can both train and be evaluated. Both returned sorted."""
    idx = np.random.default_rng(seed).permutation(np.asarray(indices, dtype=np.int64))
    k = round(train_fraction * len(idx))
    if len(idx) >= 2:
        k = min(max(k, 1), len(idx) - 1)
    return np.sort(idx[:k]), np.sort(idx[k:])
