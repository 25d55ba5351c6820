"""Who the clients are: their data shares, local train/test splits, tiers, and each round's
participants. Everything is a pure function of the seed, so a resumed run and a real fleet see
the same federation as an uninterrupted simulation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.data import Dataset
from common.partition import partition, split_local


def seed_of(*parts: int) -> int:
    """A 63-bit seed derived from several integers (run seed, round, client ...)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, np.uint64)[0] >> np.uint64(1))


def counts_from_fractions(total: int, fractions: tuple[float, ...]) -> list[int]:
    """Split ``total`` by cumulative rounding: 10 in thirds gives 3/4/3, as the authors used."""
    bounds = [0] + [round(total * sum(fractions[: i + 1])) for i in range(len(fractions))]
    bounds[-1] = total
    return [b - a for a, b in zip(bounds, bounds[1:], strict=False)]


# How clients get their tiers: a seeded random permutation, or ordered by the most frequent label
# of their local train data (lowest labels in tier 1), so that weak devices hold classes that
# the deep tier rarely sees: the "information disparity" HypeMeFed is motivated by
TIER_BY = ("random", "label")


def by_dominant_label(order: np.ndarray, labels: list[np.ndarray]) -> np.ndarray:
    """``order`` re-sorted by each client's most frequent label (stable: ties keep ``order``)."""
    dominant = np.array([np.bincount(y).argmax() if len(y) else -1 for y in labels])
    return order[np.argsort(dominant[order], kind="stable")]


@dataclass
class Federation:
    train: list[np.ndarray]  # per client, indices into the dataset
    test: list[np.ndarray]
    tiers: list[int]  # per client, 1..3
    participants_per_tier: list[int]

    @classmethod
    def build(cls, data: Dataset, clients: int, participants: int,
              tier_mix: tuple[float, float, float], scheme: str, alpha: float, seed: int,
              min_size: int = 10, tier_by: str = "random") -> Federation:
        shares = partition(data.y, clients, scheme, alpha=alpha, groups=data.groups, seed=seed,
                           min_size=min_size)
        splits = [split_local(s, seed_of(seed, 1, i)) for i, s in enumerate(shares)]
        order = np.random.default_rng(seed_of(seed, 2)).permutation(clients)
        if tier_by == "label":
            order = by_dominant_label(order, [data.y[a] for a, _ in splits])
        elif tier_by != "random":
            raise ValueError(f"tier_by must be one of {', '.join(TIER_BY)}, got {tier_by!r}")
        tiers = np.empty(clients, dtype=int)
        start = 0
        for tier, n in enumerate(counts_from_fractions(clients, tier_mix), start=1):
            tiers[order[start : start + n]] = tier
            start += n
        per_tier = counts_from_fractions(participants, tier_mix)
        for tier, want in enumerate(per_tier, start=1):
            have = int((tiers == tier).sum())
            if want > have:
                raise ValueError(f"{want} tier-{tier} participants a round, but only {have} "
                                 f"tier-{tier} clients: change --tier-mix or --participants")
        return cls([a for a, _ in splits], [b for _, b in splits], tiers.tolist(), per_tier)

    def participants(self, seed: int, server_round: int) -> list[tuple[int, int]]:
        """This round's (client, tier) pairs: a seeded sample of each tier's clients."""
        rng = np.random.default_rng(seed_of(seed, 3, server_round))
        chosen = []
        for tier, n in enumerate(self.participants_per_tier, start=1):
            pool = [c for c, t in enumerate(self.tiers) if t == tier]
            chosen += [(int(c), tier) for c in sorted(rng.choice(pool, n, replace=False))]
        return chosen
