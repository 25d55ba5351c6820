"""Click options for RunConfig settings, shared by ``hmf simulate`` and ``hmf-cloud start``."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import click

from cloud.config import AGGREGATIONS, DEFAULT_RECIPE, RECIPES, RunConfig, resolve

# what a command runs when no flag, preset or file sets it: RunConfig's, under the default recipe
DEFAULTS = {**{f.name: f.default for f in fields(RunConfig)}, **RECIPES[DEFAULT_RECIPE]}


def setting(name: str, help_text: str, **kw: Any):
    """An option whose absence means 'not given' (so presets and config files can fill it);
    the help shows RunConfig's default."""
    default = DEFAULTS.get(name.replace("-", "_"))
    shown = f" [default: {default}]" if default is not None else ""
    return click.option(f"--{name}", default=None, help=help_text + shown, **kw)


recipe = click.option(
    "--recipe", type=click.Choice(list(RECIPES)), default=None,
    help=f"The method's open choices as one set (above; --hypernet-gate, --untrained, "
    f"--static-bn): presets, --config and flags override it. [default: {DEFAULT_RECIPE}]")


static_bn = click.option(
    "--static-bn/--no-static-bn", default=None,
    help="Recompute BatchNorm statistics of each round's global model from participants' data "
    "(HeteroFL's static BN; in a fleet, devices compute them on their own data and upload only "
    "statistics). [default: on (recipe hmf, every strategy); recipe paper: the strategy's own, "
    "on for heterofl and scalefl only]")


server_lr = click.option(
    "--server-lr", type=float, default=None,
    help="Server learning rate: each round the global model moves this fraction of the way to "
    "the aggregate (FedOpt with plain SGD). [default: 1, the aggregate itself]")


hypernet_reset = click.option(
    "--hypernet-reset/--no-hypernet-reset", default=None,
    help="Re-initialise the hypernetworks (same seed) every round instead of keeping them "
    "across rounds (an ablation). [default: keep]")

hypernet_gate = click.option(
    "--hypernet-gate/--no-hypernet-gate", default=None,
    help="Generate a tensor only while the hypernetwork, before this round's training, predicts "
    "this round's trained weights better than both the mean of the other trainers' weights and "
    "the global model's weights do. "
    "[default: on (recipe hmf); recipe paper: off, as the paper]")


hypernet_residual = click.option(
    "--hypernet-residual/--no-hypernet-residual", default=None,
    help="Hypernetworks map a client's deviation from the global model in block k to its "
    "deviation in block k+1; generated = global + predicted deviation (an ablation). "
    "[default: off: weights to weights, as the paper]")


def hypernet_switches(f: Any) -> Any:
    """The hypernetwork ablations' on/off flags, shared by both commands."""
    return hypernet_reset(hypernet_gate(hypernet_residual(f)))


def robust_options(f: Any) -> Any:
    """The defences against poisoned updates (cloud/robust.py), shared by both commands."""
    for option in reversed([
        setting("aggregation", "How updates are combined: the weighted mean, or a robust rule "
                "per coordinate (unweighted; keeps every update until the round closes).",
                type=click.Choice(list(AGGREGATIONS))),
        setting("trim", "trimmed-mean: share of each coordinate's values dropped at each end.",
                type=click.FloatRange(0, 0.5, max_open=True)),
        setting("clip-factor", "Bounded influence: each update's deviation from the global "
                "model is clipped, per tensor, to this many times the median deviation of "
                "recent rounds (0: off).", type=click.FloatRange(min=0)),
        setting("clip-window", "Rounds of accepted deviations the clipping bound is the "
                "median of.", type=click.IntRange(min=1)),
    ]):
        f = option(f)
    return f


def distill_options(f: Any) -> Any:
    """Server-side ensemble distillation (cloud/distillation.py), shared by both commands."""
    for option in reversed([
        click.option("--local-distill/--no-local-distill", default=None,
                     help="Clients add DepthFL's self-distillation between the exits they hold "
                     "to the joint loss (any strategy). [default: off]"),
        click.option("--distill/--no-distill", default=None,
                     help="After aggregation, fine-tune the global model's deep blocks towards "
                     "the participants' deepest-exit predictions on unlabelled proxy data (any "
                     "strategy; on with --generate distill). [default: off]"),
        setting("distill-steps", "Distillation: Adam steps per round.",
                type=click.IntRange(min=1)),
        setting("distill-lr", "Distillation: Adam learning rate.",
                type=click.FloatRange(0, None, min_open=True)),
        setting("distill-batch", "Distillation: proxy inputs per step.",
                type=click.IntRange(min=1)),
        setting("distill-temperature", "Distillation: softmax temperature.",
                type=click.FloatRange(0, None, min_open=True)),
        setting("distill-from", "Distillation: first block fine-tuned (1: all; 2 leaves exit 1 as "
                "aggregated).", type=click.IntRange(1, 3)),
        setting("proxy", "Distillation: npz with an array 'x' of unlabelled inputs no client "
                "trains on (hapt: the shipped unlabelled windows if omitted; "
                "scripts/make_proxy.py).", type=click.Path(exists=True, dir_okay=False)),
        setting("proxy-size", "Distillation: use a seeded subset of this many proxy inputs "
                "(0: all).", type=click.IntRange(min=0)),
    ]):
        f = option(f)
    return f


def resolve_flags(preset: str | None, config_file: str | None, flags: dict[str, Any],
                  extra: dict[str, Any] | None = None,
                  defaults: dict[str, Any] | None = None) -> RunConfig:
    """RunConfig from --recipe (in ``flags``), --preset, --config and the flags given (None =
    not given); ``extra`` overrides them all, ``defaults`` fills what none of them sets (above
    the recipe)."""
    overrides = {k: v for k, v in flags.items() if v is not None and k != "recipe"}
    if "tier_mix" in overrides:
        try:
            overrides["tier_mix"] = tuple(float(f) for f in overrides["tier_mix"].split(","))
        except ValueError:
            raise click.BadParameter("three comma-separated fractions, e.g. 0.3,0.4,0.3",
                                     param_hint="--tier-mix") from None
    return resolve(preset, config_file, {**overrides, **(extra or {})}, defaults,
                   recipe=flags.get("recipe"))
