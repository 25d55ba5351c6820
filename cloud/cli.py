"""Command line: ``hmf`` (models, simulate, plot) for researchers."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from cloud.config import GENERATE, PRESETS, UNTRAINED, recipe_of
from cloud.federation import TIER_BY
from cloud.options import (
    distill_options,
    hypernet_switches,
    recipe,
    resolve_flags,
    robust_options,
    server_lr,
    setting,
    static_bn,
)
from cloud.strategies import STRATEGIES
from common.models import NUM_BLOCKS, SPECS, build_model, macs_per_sample, param_count


@click.group()
def hmf() -> None:
    """HypeMeFed for heterogeneous device fleets: models, simulation and plots."""


@hmf.command()
@click.option("--model", "names", multiple=True, type=click.Choice(list(SPECS)),
              help="Model to describe (repeatable); default: all.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per model, per line.")
def models(names: tuple[str, ...], as_json: bool) -> None:
    """Per tier: parameters, multiply-accumulates per sample and fp32 bytes."""
    for name in names or SPECS:
        tiers = []
        for tier in range(1, NUM_BLOCKS + 1):
            m = build_model(name, depth=tier)
            tiers.append({"tier": tier, "params": param_count(m), "macs": macs_per_sample(m),
                          "bytes": sum(t.numel() * t.element_size()
                                       for t in m.state_dict().values())})
        if as_json:
            click.echo(json.dumps({"model": name, "tiers": tiers}))
            continue
        spec = SPECS[name]
        click.echo(f"{name}: input {'x'.join(map(str, spec.input_shape))}, "
                   f"{spec.num_classes} classes, widths {'/'.join(map(str, spec.widths))}")
        for t in tiers:
            click.echo(f"  tier {t['tier']}: {t['params']:>10,} params  {t['macs']:>14,} MACs  "
                       f"{t['bytes'] / 2**20:8.2f} MiB fp32")


@hmf.command()
@recipe
@click.option("--preset", type=click.Choice(list(PRESETS)), default=None,
              help="The authors' settings for svhn, stl10 or unimib (method.md).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="TOML file of settings (keys = flag names); flags given override it.")
@setting("model", "Model and dataset.", type=click.Choice(list(SPECS)))
@setting("data-dir", "Directory holding the dataset's files (hapt: the shipped copy if omitted).")
@setting("strategy", "Aggregation strategy.", type=click.Choice(list(STRATEGIES)))
@setting("hypernet", "Hypernetwork kind (hypemefed).", type=click.Choice(["lrf", "naive"]))
@setting("rank", "LRF rank, clipped to the weight matrix.", type=int)
@setting("hidden", "Hypernetwork hidden size (lrf 128, naive 64 if unset).", type=int)
@setting("hypernet-epochs", "Full-batch Adam epochs per round after the closed-form solve.",
         type=int)
@setting("hypernet-lr", "Hypernetwork Adam learning rate.", type=float)
@setting("hypernet-ridge", "Closed-form solve: pull towards last round's hypernetwork.",
         type=float)
@setting("hypernet-sweeps", "Closed-form solve: alternations (0: Adam epochs only).", type=int)
@hypernet_switches
@setting("generate", "What fills the deep blocks shallow clients could not train: "
         "hypernetwork-generated weights (convs, convs+bn, all), or distill: the "
         "participants' predictions on proxy data, distilled into the deep exits.",
         type=click.Choice(list(GENERATE)))
@setting("untrained", "What a shallow client adds for a deep tensor it neither trained nor got "
         "generated: nothing, or the global model's value (the authors' release).",
         type=click.Choice(list(UNTRAINED)))
@distill_options
@setting("rounds", "Rounds.", type=int)
@setting("clients", "Clients in the federation.", type=int)
@setting("participants", "Participants per round.", type=int)
@setting("tier-mix", "Fractions of tiers 1,2,3, e.g. 0.3,0.4,0.3.")
@setting("tier-by", "How clients get tiers: at random, or by their most frequent label "
         "(lowest labels in tier 1).", type=click.Choice(list(TIER_BY)))
@setting("partition", "Data partition.", type=click.Choice(["iid", "dirichlet", "subject"]))
@setting("alpha", "Dirichlet concentration.", type=float)
@setting("local-epochs", "Local epochs per round.", type=int)
@setting("batch-size", "Local batch size.", type=int)
@setting("lr", "Local Adam learning rate.", type=float)
@setting("weighting", "Averaging weights.", type=click.Choice(["uniform", "samples"]))
@robust_options
@static_bn
@server_lr
@setting("seed", "Seed of everything random.", type=int)
@setting("device", "Torch device.", type=click.Choice(["cpu", "cuda"]))
@setting("eval-every", "Evaluate every N rounds (and the last).", type=int)
@click.option("--out", type=click.Path(file_okay=False), default="runs/simulate",
              show_default=True, help="Run directory.")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint in --out.")
def simulate(preset: str | None, config_file: str | None, out: str, resume: bool,
             **flags: Any) -> None:
    """Run federated training in one process (with no flags: HAPT by subject, minutes on a CPU).

    \b
    Recipes (--recipe), the method's open choices:
      hmf (default): stale averaging of deep blocks + static BatchNorm, generates nothing
      paper: HypeMeFed as published: generated convs, averaged over trainers, no static BN
    Precedence: recipe < --preset < --config < flags.
    """
    from cloud.simulation import Simulation
    from common.data import DataError

    try:
        cfg = resolve_flags(preset, config_file, flags)
        click.echo(f"hmf simulate: {cfg.strategy} ({recipe_of(cfg)}) on {cfg.model}, "
                   f"{cfg.clients} clients, "
                   f"{cfg.participants} a round, {cfg.rounds} rounds -> {out}")
        Simulation(cfg, out, log=click.echo).run(resume=resume)
    except (ValueError, DataError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"done: {Path(out) / 'summary.json'}")


@hmf.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG file to write.")
@click.option("--title", default=None, help="Figure title.")
def plot(run_dirs: tuple[str, ...], out: str, title: str | None) -> None:
    """Global accuracy per round at every exit, one line per run."""
    from cloud.plot import plot_runs

    try:
        plot_runs([Path(d) for d in run_dirs], Path(out), title)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {out}")


# ---- hmf-cloud: the cloud of a real fleet over MQTT (commands in cloud/fleet_cli.py) ----------
@click.group()
def hmf_cloud() -> None:
    """HypeMeFed's cloud for real device fleets over MQTT (docs/PROTOCOL.md)."""


def _register_fleet_commands() -> None:
    from cloud.fleet_cli import register

    register(hmf_cloud)


_register_fleet_commands()

from export.cli import export  # noqa: E402  (`hmf export onnx`; imports onnx lazily)

hmf.add_command(export)


if __name__ == "__main__":
    sys.exit(hmf())
