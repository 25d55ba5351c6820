"""A real fleet: which devices exist, the client index and tier of each, and who takes part in
each round.

The mapping from devices to the simulator's clients is explicit: the fleet file lists devices
in order, and device ``i`` of the list *is* client ``i`` of the federation (its training seeds,
``seed_of(seed, 5, round, i)``, and its place in the participant draw). Participants are drawn
by ``Federation.participants`` itself, so a fleet whose file was written by ``hmf-cloud
partition`` trains exactly what ``hmf simulate`` trains with the same settings.

Fleet file (JSON): ``{"devices": [{"id": "dev-00", "tier": 1, "samples": 120}, ...]}``;
``samples`` (optional, written by ``hmf-cloud partition``) is what the cloud knows of a
device's data: under ``--weighting samples`` a device weighs at most that much, whatever it
claims.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cloud.config import RunConfig
from cloud.federation import Federation, counts_from_fractions, seed_of
from common.protocol import check_device_id


@dataclass(frozen=True)
class FleetDevice:
    id: str
    tier: int
    samples: int | None = None  # local train samples, when the fleet's maker knows them


@dataclass
class Fleet:
    devices: list[FleetDevice]

    def __post_init__(self) -> None:
        ids = [check_device_id(d.id) for d in self.devices]
        if len(set(ids)) != len(ids):
            raise ValueError("device ids in a fleet must be unique")
        if any(d.tier not in (1, 2, 3) for d in self.devices):
            raise ValueError("every device's tier must be 1, 2 or 3")
        if any(d.samples is not None and d.samples < 0 for d in self.devices):
            raise ValueError("a device's samples must be a count, 0 or more")
        self._index = {d: i for i, d in enumerate(ids)}

    def index(self, device: str) -> int | None:
        return self._index.get(device)

    @property
    def ids(self) -> list[str]:
        return [d.id for d in self.devices]

    def to_json(self) -> dict[str, Any]:
        return {"devices": [_device_json(d) for d in self.devices]}

    def tier_fractions(self) -> tuple[float, float, float]:
        """The share of each tier among the fleet's devices."""
        tiers = [d.tier for d in self.devices]
        return tuple(tiers.count(t) / len(tiers) for t in (1, 2, 3))  # type: ignore[return-value]

    @classmethod
    def from_json(cls, obj: Any) -> Fleet:
        try:
            return cls([FleetDevice(str(d["id"]), int(d["tier"]),
                                    None if d.get("samples") is None else int(d["samples"]))
                        for d in obj["devices"]])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"fleet file: {e}; expected {{\"devices\": [{{\"id\": ..., "
                             "\"tier\": 1}}, ...]}}") from None

    @classmethod
    def load(cls, path: str | Path) -> Fleet:
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"fleet file {path} is not JSON: {e}") from None

    def save(self, path: str | Path) -> None:
        """One device a line: a fleet file is meant to be read and edited by people."""
        rows = ",\n".join(f"  {json.dumps(_device_json(d))}" for d in self.devices)
        Path(path).write_text('{"devices": [\n' + rows + "\n]}\n")

    def federation(self, participants: int, tier_mix: tuple[float, float, float]) -> Federation:
        """The simulator's federation object for this fleet (tiers and per-tier draw counts;
        the data stays on the devices)."""
        tiers = [d.tier for d in self.devices]
        per_tier = counts_from_fractions(participants, tier_mix)
        for tier, want in enumerate(per_tier, start=1):
            have = tiers.count(tier)
            if want > have:
                raise ValueError(f"{want} tier-{tier} participants a round, but the fleet has "
                                 f"{have} tier-{tier} devices: change --tier-mix or "
                                 "--participants")
        return Federation([], [], tiers, per_tier)


def _device_json(d: FleetDevice) -> dict[str, Any]:
    return {"id": d.id, "tier": d.tier, **({} if d.samples is None else {"samples": d.samples})}


def select(fed: Federation, seed: int, server_round: int,
           online: set[int] | None = None) -> list[tuple[int, int]]:
    """(client, tier) pairs of a round. ``online=None``: exactly the simulator's draw (devices
    that are away simply miss the round). Otherwise the same seeded draw from each tier's online
    devices only (all of them when fewer are online than the tier's share)."""
    if online is None:
        return fed.participants(seed, server_round)
    rng = np.random.default_rng(seed_of(seed, 3, server_round))
    chosen = []
    for tier, n in enumerate(fed.participants_per_tier, start=1):
        pool = [c for c, t in enumerate(fed.tiers) if t == tier and c in online]
        pick = sorted(rng.choice(pool, min(n, len(pool)), replace=False)) if pool else []
        chosen += [(int(c), tier) for c in pick]
    return chosen


def write_partition(cfg: RunConfig, out: str | Path, prefix: str = "dev") -> Fleet:
    """The simulator's federation for ``cfg`` as files: one ``<id>.npz`` per client (x, y: its
    local train split; test_x, test_y: its local test split), ``eval.npz`` (what ``hmf simulate``
    reports as global accuracy: the official test split, or the union of local test splits)
    and ``fleet.json`` (client i = device i, with its tier)."""
    from common.data import load_dataset

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(cfg.model, cfg.data_dir)
    fed = Federation.build(data, cfg.clients, cfg.participants, cfg.tier_mix, cfg.partition,
                           cfg.alpha, cfg.seed, cfg.min_size, cfg.tier_by)
    width = max(2, len(str(cfg.clients - 1)))
    devices = []
    for i, (train, test) in enumerate(zip(fed.train, fed.test, strict=True)):
        device = f"{prefix}-{i:0{width}d}"
        np.savez(out / f"{device}.npz", x=data.x[train], y=data.y[train].astype(np.int64),
                 test_x=data.x[test], test_y=data.y[test].astype(np.int64))
        devices.append(FleetDevice(device, fed.tiers[i], len(train)))
    if data.test_x is not None:
        ex, ey = data.test_x, data.test_y
    else:
        local = np.concatenate(fed.test)
        ex, ey = data.x[local], data.y[local]
    np.savez(out / "eval.npz", x=ex, y=np.asarray(ey, dtype=np.int64))
    fleet = Fleet(devices)
    fleet.save(out / "fleet.json")
    return fleet
