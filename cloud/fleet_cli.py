"""``hmf-cloud`` commands for a real fleet: ``start``, ``broker-config`` and ``partition``.

Registered on the ``hmf_cloud`` group of ``cloud/cli.py`` by ``register``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from cloud.config import GENERATE, PRESETS, UNTRAINED, RunConfig, recipe_of
from cloud.federation import TIER_BY
from cloud.options import (
    DEFAULTS,
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
from common.models import SPECS

if TYPE_CHECKING:
    from cloud.fleet import Fleet


def _auth_options(f):
    for option in reversed([
        click.option("--username", default=None,
                     help="Broker user name [default: hmf-cloud with --password-file]."),
        click.option("--password-file", type=click.Path(exists=True, dir_okay=False),
                     default=None, help="File holding the broker password."),
        click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="CA certificate to verify the broker (implies TLS)."),
        click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="Client certificate (mutual TLS)."),
        click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="Client key (mutual TLS)."),
    ]):
        f = option(f)
    return f


def _run_options(f):
    """The settings of ``hmf simulate`` that a fleet run uses."""
    for option in reversed([
        recipe,
        click.option("--preset", type=click.Choice(list(PRESETS)), default=None,
                     help="The authors' settings for svhn, stl10 or unimib."),
        click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
                     help="TOML file of settings (keys = flag names)."),
        setting("model", "Model.", type=click.Choice(list(SPECS))),
        setting("strategy", "Aggregation strategy.", type=click.Choice(list(STRATEGIES))),
        setting("hypernet", "Hypernetwork kind (hypemefed).", type=click.Choice(["lrf", "naive"])),
        setting("rank", "LRF rank.", type=int),
        setting("hidden", "Hypernetwork hidden size.", type=int),
        setting("hypernet-epochs", "Hypernetwork epochs per round.", type=int),
        setting("hypernet-lr", "Hypernetwork learning rate.", type=float),
        setting("hypernet-ridge", "Closed-form solve: pull towards last round's hypernetwork.",
                type=float),
        setting("hypernet-sweeps", "Closed-form solve: alternations (0: Adam only).", type=int),
        hypernet_switches,
        setting("generate", "Hypernetwork-generated weights (convs, convs+bn, all), or "
                "distill: server-side ensemble distillation on proxy data.",
                type=click.Choice(list(GENERATE))),
        setting("untrained", "What a shallow client adds for deep tensors neither trained nor "
                "generated.", type=click.Choice(list(UNTRAINED))),
        distill_options,
        setting("rounds", "Rounds.", type=int),
        setting("participants", "Participants per round.", type=int),
        setting("tier-mix", "Fractions of tiers 1,2,3 among participants."),
        setting("local-epochs", "Local epochs per round.", type=int),
        setting("batch-size", "Local batch size.", type=int),
        setting("lr", "Local learning rate.", type=float),
        setting("weighting", "Averaging weights (samples: at most the fleet file's count).",
                type=click.Choice(["uniform", "samples"])),
        robust_options,
        setting("seed", "Seed of everything random.", type=int),
        static_bn,
        server_lr,
        setting("eval-every", "Evaluate every N rounds (and the last).", type=int),
    ]):
        f = option(f)
    return f


@click.command()
@click.option("--broker", required=True, help="mqtt://HOST:PORT or mqtts://HOST:PORT.")
@click.option("--fleet", "fleet_file", required=True, type=click.Path(exists=True,
                                                                        dir_okay=False),
              help='JSON {"devices": [{"id": ..., "tier": 1..3}, ...]}: device i is client i.')
@_run_options
@click.option("--min-updates", type=click.IntRange(min=1), default=1, show_default=True,
              help="A round closes at its deadline only with at least this many updates.")
@click.option("--round-timeout", type=click.FloatRange(min=0.1), default=600.0,
              show_default=True, help="Seconds from a round's start to its deadline.")
@click.option("--eval-data", type=click.Path(exists=True, dir_okay=False), default=None,
              help="NPZ (x, y) held out on the cloud: global accuracy per exit each round.")
@click.option("--transfer-dtype", type=click.Choice(["float32", "float16"]), default="float32",
              show_default=True, help="Weights on the wire (float16 halves the bytes).")
@click.option("--select", "selection", type=click.Choice(["all", "online"]), default="all",
              show_default=True, help="Draw participants among all fleet devices (as "
              "hmf simulate) or among those online.")
@click.option("--wait-devices", type=click.IntRange(min=0), default=None,
              help="Devices online before a round opens [default: --min-updates].")
@click.option("--upload-slots", type=click.IntRange(min=1), default=16, show_default=True,
              help="Uploads reassembled at once (bounds the cloud's memory).")
@click.option("--absent-grace", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="Seconds after a round opens from which tasks of devices that are offline "
              "no longer hold it open (it closes once every online device has answered).")
@click.option("--fetch-budget", type=click.FloatRange(min=1), default=8.0, show_default=True,
              help="Bytes a device may fetch per round, in sizes of its blob (graphs: of the "
              "served model); more is refused.")
@click.option("--connect-timeout", type=click.FloatRange(min=0), default=60.0,
              show_default=True, help="Give up (exit 1) after this many seconds without a "
              "first connection to the broker; 0: retry forever, each attempt logged.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Torch threads for the server step [default: torch's].")
@click.option("--export-onnx", is_flag=True,
              help="After each round, export the global model as checked ONNX graphs into "
                   "OUT/onnx/round_N and serve them: devices fetch their tier's graphs.")
@click.option("--export-quantize", type=click.Choice(["int8"]), default=None,
              help="With --export-onnx: static int8 graphs too (slower export).")
@click.option("--serve-graphs-s", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="With --export-onnx: keep serving the final graphs this long after the "
                   "last round, before the run finishes.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint in --out.")
@_auth_options
def start(broker: str, fleet_file: str, preset: str | None, config_file: str | None,
          min_updates: int, round_timeout: float, eval_data: str | None, transfer_dtype: str,
          selection: str, wait_devices: int | None, upload_slots: int, absent_grace: float,
          fetch_budget: float, connect_timeout: float, threads: int | None,
          export_onnx: bool, export_quantize: str | None, serve_graphs_s: float,
          out: str, resume: bool,
          username: str | None, password_file: str | None, tls_ca: str | None,
          tls_cert: str | None, tls_key: str | None, **flags: Any) -> None:
    """Run federated training with real devices over MQTT (docs/PROTOCOL.md).

    \b
    Recipes (--recipe), the method's open choices:
      hmf (default): stale averaging of deep blocks + static BatchNorm, generates nothing
      paper: HypeMeFed as published: generated convs, averaged over trainers, no static BN
    Precedence: recipe < --preset < --config < flags.
    """
    import torch

    if export_quantize and not export_onnx:
        raise click.UsageError("--export-quantize needs --export-onnx")

    from cloud.fleet import Fleet
    from cloud.server import BrokerUnreachable, CloudOptions, FleetCloud
    from common.mqtt_link import broker_settings

    if threads:
        torch.set_num_threads(threads)
    try:
        fleet = Fleet.load(fleet_file)
        cfg = fleet_config(fleet, preset, config_file, flags)
        settings = broker_settings(broker, username or ("hmf-cloud" if password_file else None),
                                   password_file, tls_ca, tls_cert, tls_key)
        opts = CloudOptions(min_updates=min_updates, round_timeout=round_timeout,
                            transfer_dtype=transfer_dtype, select=selection,
                            wait_devices=wait_devices, upload_slots=upload_slots,
                            absent_grace=absent_grace, fetch_budget=fetch_budget,
                            connect_timeout=connect_timeout,
                            eval_data=eval_data, export_onnx=export_onnx,
                            export_quantize=export_quantize, serve_graphs_s=serve_graphs_s)
        click.echo(f"hmf-cloud start: {cfg.strategy} ({recipe_of(cfg)}) on {cfg.model}, "
                   f"{len(fleet.devices)} "
                   f"devices, {cfg.participants} a round, {cfg.rounds} rounds -> {out}")
        FleetCloud(cfg, fleet, out, settings, opts, log=click.echo,
                   client_id=settings.username or "hmf-cloud").run(resume=resume)
    except (ValueError, FileNotFoundError, OSError, BrokerUnreachable) as e:
        raise click.ClickException(str(e)) from None


def fleet_config(fleet: Fleet, preset: str | None, config_file: str | None,
                 flags: dict[str, Any]) -> RunConfig:
    """The run's settings, with defaults a fleet file implies where nothing else sets them:
    clients = its devices, participants at most that many, and when the default tier mix
    asks for more devices of a tier than the fleet has, the fleet's own mix."""
    n = len(fleet.devices)
    derived: dict[str, Any] = {"participants": min(DEFAULTS["participants"], n)}
    cfg = resolve_flags(preset, config_file, flags, {"clients": n}, derived)
    try:
        fleet.federation(cfg.participants, cfg.tier_mix)
    except ValueError:
        if cfg.tier_mix != RunConfig().tier_mix:
            raise
        derived["tier_mix"] = fleet.tier_fractions()
        cfg = resolve_flags(preset, config_file, flags, {"clients": n}, derived)
    return cfg


@click.command("broker-config")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Directory for mosquitto.conf, passwd, acl and secrets/.")
@click.option("--devices", required=True, multiple=True,
              help="Device ids, or a fleet.json file: --devices a b c, or repeated.")
@click.argument("more_devices", nargs=-1, metavar="[ID]...")
@click.option("--port", type=int, default=None, help="Listener port [1883, or 8883 with TLS].")
@click.option("--bind", default="127.0.0.1", show_default=True,
              help="Listener address (0.0.0.0: every interface, for devices on the network).")
@click.option("--tls-ca", default=None, help="CA file for the TLS listener.")
@click.option("--tls-cert", default=None, help="Broker certificate.")
@click.option("--tls-key", default=None, help="Broker private key.")
@click.option("--require-client-cert", is_flag=True, help="Mutual TLS: devices need certs.")
@click.option("--run-as", default=None,
              help="User mosquitto switches to when started as root (must read passwd/acl); "
              "e.g. $(whoami) for a local demo.")
def broker_config(out: str, devices: tuple[str, ...], more_devices: tuple[str, ...],
                  port: int | None, bind: str,
                  tls_ca: str | None, tls_cert: str | None, tls_key: str | None,
                  require_client_cert: bool, run_as: str | None) -> None:
    """Write a mosquitto config: password file, per-device ACL, optional TLS."""
    from cloud.broker_config import TLSFiles, write_broker_config
    from cloud.fleet import Fleet

    ids: list[str] = []
    for d in devices + more_devices:
        ids += Fleet.load(d).ids if d.endswith(".json") and Path(d).is_file() else [d]
    tls = None
    if tls_ca or tls_cert or tls_key:
        if not (tls_ca and tls_cert and tls_key):
            raise click.UsageError("TLS needs --tls-ca, --tls-cert and --tls-key")
        tls = TLSFiles(tls_ca, tls_cert, tls_key, require_client_cert)
    try:
        paths = write_broker_config(out, ids, port or (8883 if tls else 1883), bind, tls,
                                    run_as=run_as)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {paths['conf']} ({len(ids)} devices + hmf-cloud, listening on "
               f"{bind}); passwords in {paths['secrets']}/<user>.txt: hand each device its own "
               f"only.\nstart the broker: mosquitto -c {paths['conf']}")
    for warning in paths["warnings"]:
        click.echo(f"warning: {warning}", err=True)


@click.command()
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Directory for <device>.npz files, eval.npz and fleet.json.")
@click.option("--prefix", default="dev", show_default=True, help="Device id prefix.")
@click.option("--preset", type=click.Choice(list(PRESETS)), default=None)
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None)
@setting("model", "Model and dataset.", type=click.Choice(list(SPECS)))
@setting("data-dir", "Dataset directory (hapt: the shipped copy if omitted).")
@setting("clients", "Clients (devices).", type=int)
@setting("participants", "Participants per round (checked against the tiers).", type=int)
@setting("tier-mix", "Fractions of tiers 1,2,3.")
@setting("tier-by", "How clients get tiers: at random, or by their most frequent label "
         "(lowest labels in tier 1).", type=click.Choice(list(TIER_BY)))
@setting("partition", "Data partition.", type=click.Choice(["iid", "dirichlet", "subject"]))
@setting("alpha", "Dirichlet concentration.", type=float)
@setting("seed", "Seed.", type=int)
def partition(out: str, prefix: str, preset: str | None, config_file: str | None,
              **flags: Any) -> None:
    """Split a dataset as `hmf simulate` does, one NPZ per device, plus fleet.json."""
    from cloud.fleet import write_partition
    from common.data import DataError

    try:
        cfg = resolve_flags(preset, config_file, flags, {})
        fleet = write_partition(cfg, out, prefix)
    except (ValueError, DataError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    tiers = [d.tier for d in fleet.devices]
    click.echo(f"wrote {len(tiers)} device files to {out} (tiers 1/2/3: {tiers.count(1)}/"
               f"{tiers.count(2)}/{tiers.count(3)}), eval.npz and fleet.json")


def register(group: click.Group) -> None:
    for command in (start, broker_config, partition):
        group.add_command(command)


__all__ = ["register"]
