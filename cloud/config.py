"""The settings of a federated run, the method recipes, the authors' presets, and TOML files.

Precedence, lowest first: RunConfig's defaults, the recipe (``--recipe``, default ``hmf``),
``--preset``, ``--config FILE.toml``, flags given explicitly. ``resolve`` applies them; it is
what ``hmf simulate`` and ``hmf-cloud start`` run. The data and federation defaults are the
no-flag demo: HAPT by subject, small enough to finish in minutes on a CPU.

A recipe sets the method's open choices (RECIPES):
- ``hmf``, the default: what docs/RESULTS.md measured best ("In short", "What does win"), the
  authors' release's stale averaging of the deep blocks (``untrained="global"``) with static
  BatchNorm, behind the out-of-sample gate; in every measured run the gate let no generated
  conv through, so it generates nothing. Static BatchNorm then applies to every strategy
  (``--strategy fedavg`` is FedAvg with static BN; ``--no-static-bn`` turns it off).
- ``paper``: HypeMeFed as published: generated convs averaged over the clients that trained or
  generated them, no static BatchNorm (``static_bn=None``: the strategy's own default, so
  heterofl and scalefl keep theirs).

RunConfig's own field defaults are the ``paper`` recipe: a RunConfig built in code (benchmarks,
tests) names what it changes from the method as published; bench/accuracy.py's ``hypemefed``
rows are that, and its ``hypemefed-gate-global-sbn`` rows the ``hmf`` recipe.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import tomllib

AGGREGATIONS = ("mean", "median", "trimmed-mean")  # cloud/aggregation.py accumulator
# what HypeMeFed's hypernetworks generate; "distill": nothing, the deep exits learn from the
# participants' predictions on proxy data instead (cloud/distillation.py)
GENERATE = ("convs", "convs+bn", "all", "distill")
# what a shallow client adds to HypeMeFed's average for a deep tensor it neither trained nor got
# generated: nothing ("skip": averaged over those that have it), or the global model's value
UNTRAINED = ("skip", "global")

# The method's open choices as named sets (module docstring); each a dict of RunConfig settings.
RECIPES: dict[str, dict[str, Any]] = {
    "hmf": dict(hypernet_gate=True, untrained="global", static_bn=True),
    "paper": dict(hypernet_gate=False, untrained="skip", static_bn=None),
}
DEFAULT_RECIPE = "hmf"
# one line each, for --help (the commands' docstrings hold them as text: tests/test_recipes.py)
RECIPE_HELP = {
    "hmf": "stale averaging of deep blocks + static BatchNorm, generates nothing",
    "paper": "HypeMeFed as published: generated convs, averaged over trainers, no static BN",
}


@dataclass
class RunConfig:
    model: str = "hapt"
    data_dir: str | None = None
    strategy: str = "hypemefed"
    hypernet: str = "lrf"
    rank: int = 100
    hidden: int | None = None  # hypernetwork hidden size; None: 128 for lrf, 64 for naive
    hypernet_epochs: int = 0  # full-batch Adam epochs after the closed-form solve
    hypernet_lr: float = 5e-4
    hypernet_ridge: float = 0.03  # closed-form solve's pull towards last round's weights
    hypernet_sweeps: int = 5  # closed-form solve's alternations; 0: Adam only
    hypernet_reset: bool = False  # re-initialise the hypernetworks every round
    # hypernet_gate, untrained and static_bn default to the "paper" recipe; the commands
    # (resolve) default to "hmf" (RECIPES)
    hypernet_gate: bool = False  # generate only where it beats the trainers' mean out of sample
    hypernet_residual: bool = False  # map deviations from the global model, not weights
    generate: str = "convs"  # what the hypernetworks generate: convs, convs+bn or all
    untrained: str = "skip"  # see UNTRAINED
    # server-side ensemble distillation (cloud/distillation.py), for any strategy; on with
    # generate="distill" too. The values were tuned on one seed and setting and frozen
    # (bench/distill.py, docs/RESULTS.md "Distillation")
    distill: bool = False
    distill_steps: int = 50
    distill_lr: float = 1e-3
    distill_batch: int = 64
    distill_temperature: float = 3.0
    distill_from: int = 2  # the first block fine-tuned (1: all; 2: exit 1 left as aggregated)
    proxy: str | None = None  # npz of unlabelled inputs; None: the shipped one (hapt only)
    proxy_size: int = 1024  # a seeded subset of the proxy file; 0: all of it
    local_distill: bool = False  # clients add DepthFL's self-distillation between their exits
    rounds: int = 15
    clients: int = 30
    participants: int = 6
    tier_mix: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)
    tier_by: str = "random"  # or "label": tiers follow the clients' dominant label (federation.py)
    partition: str = "subject"
    alpha: float = 0.5
    min_size: int = 10
    local_epochs: int = 2
    batch_size: int = 16
    lr: float = 5e-3
    weighting: str = "uniform"
    static_bn: bool | None = None  # None: the strategy's default (on for heterofl, scalefl)
    server_lr: float = 1.0  # cloud/aggregation.py server_step
    aggregation: str = "mean"  # or "median", "trimmed-mean": cloud/aggregation.py
    trim: float = 0.1  # trimmed-mean: share of each coordinate's values dropped at each end
    clip_factor: float = 3.0  # bounded influence (cloud/robust.py); 0: off
    clip_window: int = 5  # rounds of accepted deviations the bound is the median of
    seed: int = 0
    device: str = "cpu"
    eval_every: int = 1

    def __post_init__(self) -> None:
        self.tier_mix = tuple(float(f) for f in self.tier_mix)  # type: ignore[assignment]
        if len(self.tier_mix) != 3 or min(self.tier_mix) < 0 or abs(sum(self.tier_mix) - 1) > 1e-6:
            raise ValueError(f"tier_mix must be three fractions summing to 1, got {self.tier_mix}")
        if self.generate not in GENERATE:
            raise ValueError(f"generate must be one of {', '.join(GENERATE)}, "
                             f"got {self.generate!r}")
        if self.untrained not in UNTRAINED:
            raise ValueError(f"untrained must be one of {', '.join(UNTRAINED)}, "
                             f"got {self.untrained!r}")
        if not 0 < self.server_lr < float("inf"):
            raise ValueError("server_lr must be a finite number above 0 (1: the aggregate "
                             f"itself), got {self.server_lr}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, "
                             f"got {self.aggregation!r}")
        if not 0 <= self.trim < 0.5:
            raise ValueError(f"trim must be at least 0 and below 0.5, got {self.trim}")
        if not 0 <= self.clip_factor < float("inf") or self.clip_window < 1:
            raise ValueError("clip_factor must be finite and >= 0 (0: no clipping) and "
                             f"clip_window >= 1, got {self.clip_factor}, {self.clip_window}")
        if self.proxy_size < 0:
            raise ValueError(f"proxy_size must be >= 0 (0: all), got {self.proxy_size}")
        if self.participants > self.clients:
            raise ValueError(f"participants ({self.participants}) exceeds clients ({self.clients})")

    @property
    def distills(self) -> bool:
        return self.distill or self.generate == "distill"

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["tier_mix"] = list(self.tier_mix)
        return d


# The authors' settings (method.md); rounds and epochs as in the paper, so expect hours on a GPU.
PRESETS: dict[str, dict[str, Any]] = {
    "svhn": dict(model="svhn", clients=50, participants=10, rounds=300, local_epochs=5,
                 batch_size=128, lr=5e-4, partition="dirichlet"),
    "stl10": dict(model="stl10", clients=50, participants=10, rounds=300, local_epochs=5,
                  batch_size=32, lr=5e-4, partition="dirichlet"),
    "unimib": dict(model="unimib", clients=30, participants=6, rounds=300, local_epochs=5,
                   batch_size=16, lr=5e-3, partition="subject"),
}

FIELDS = {f.name for f in fields(RunConfig)}


def recipe_of(cfg: RunConfig) -> str:
    """The recipe whose settings ``cfg`` has, or those settings where it has neither's."""
    for name, settings in RECIPES.items():
        if all(getattr(cfg, k) == v for k, v in settings.items()):
            return f"recipe {name}"
    return ", ".join(f"{k} {getattr(cfg, k)}" for k in RECIPES[DEFAULT_RECIPE])


def read_toml(path: str | Path) -> dict[str, Any]:
    """Settings from a TOML file: keys are the flag names, with '-' or '_' (``preset`` and
    ``recipe`` too)."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"config file {path} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"config file {path} is not valid TOML: {e}") from None
    settings = {k.replace("-", "_"): v for k, v in raw.items()}
    unknown = sorted(set(settings) - FIELDS - {"preset", "recipe"})
    if unknown:
        raise ValueError(f"config file {path}: unknown settings {unknown}; known: {sorted(FIELDS)}")
    return settings


def resolve(preset: str | None = None, config_file: str | None = None,
            overrides: dict[str, Any] | None = None,
            defaults: dict[str, Any] | None = None,
            recipe: str | None = None) -> RunConfig:
    """The run's settings, lowest first: RunConfig's, ``recipe`` (else the file's, else
    DEFAULT_RECIPE), ``defaults`` (e.g. derived from a fleet file), ``preset`` (else the
    file's), the file's settings, ``overrides`` (the flags given)."""
    from_file = read_toml(config_file) if config_file else {}
    preset = preset or from_file.get("preset")
    recipe = recipe or from_file.get("recipe") or DEFAULT_RECIPE
    from_file.pop("preset", None)
    from_file.pop("recipe", None)
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    settings: dict[str, Any] = {**RECIPES[recipe], **(defaults or {})}
    if preset:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        settings.update(PRESETS[preset])
    settings.update(from_file)
    settings.update(overrides or {})
    return RunConfig(**settings)
