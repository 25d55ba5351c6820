"""``hmf-device join``: take part in a real fleet over MQTT (agent: device/agent.py).

Heavy imports (torch, paho) happen when the command runs, so the other ``hmf-device`` commands
start fast."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import click

MODEL_SUBDIR = "model"  # a device's ONNX graphs, inside its work dir (device/serving.py)


def default_model_dir(work_dir: str | Path) -> Path:
    """The graphs ``--tier auto`` measures: the latest served model (``model/current``) if the
    device holds one, else an export copied into ``model/`` by hand."""
    from device.serving import CURRENT

    root = Path(work_dir) / MODEL_SUBDIR
    return root / CURRENT if (root / CURRENT).exists() else root


def _timeout_arg(ctx: click.Context, param: click.Parameter, value: float) -> float | None:
    """``--connect-timeout``: seconds, or None (0 or infinity) to wait for the broker forever."""
    if math.isnan(value):
        raise click.BadParameter("must be a number of seconds (0: wait forever)")
    return None if value == 0 or math.isinf(value) else value


def _tier_arg(ctx: click.Context, param: click.Parameter, value: str | None) -> int | str | None:
    if value is None or value == "auto":
        return value
    if value in ("1", "2", "3"):
        return int(value)
    raise click.BadParameter(f"{value!r}: 1, 2, 3 or auto")


def budget_arg(ctx: click.Context, param: click.Parameter, value: float | None
               ) -> float | None:
    """``--budget-ms``: a positive, finite number of milliseconds (or not given)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise click.BadParameter(f"must be a positive number of milliseconds (got {value})")
    return value


def auto_tier(model_dir: str | Path, budget_ms: float, *, runs: int = 100,
              precision: str = "fp32", threads: int | None = None,
              log: Any = print) -> tuple[int, dict[str, Any]]:
    """``--tier auto``: profiles the exit graphs in ``model_dir`` (``hmf export onnx``'s), the
    exits interleaved, and returns the deepest tier k whose exits 1..k all have their p95
    latency within ``budget_ms``, with the profile. Logs each exit's measured latency and the
    choice. Raises ``ValueError`` (``ManifestError``) when there is no intact export in
    ``model_dir`` or when even exit 1 misses the budget (tier 0)."""
    from device.profile import check_budget, profile, tier_within

    check_budget(budget_ms)
    report = profile(model_dir, runs=runs, threads=threads, precision=precision)
    tier = tier_within(report, budget_ms)
    for row in report["exits"]:
        fits = "fits" if row["p95_ms"] <= budget_ms else "over"
        log(f"exit {row['exit']}: p95 {row['p95_ms']:.3f} ms, median {row['median_ms']:.3f} ms "
            f"({row['runs']} runs, {precision}) -> {fits} the {budget_ms:g} ms budget")
    if tier == 0:
        first = report["exits"][0]
        raise ValueError(f"no tier fits the {budget_ms:g} ms budget on this device: even exit "
                         f"{first['exit']} takes {first['p95_ms']:.3f} ms (p95) with the graphs "
                         f"in {model_dir}; raise --budget-ms or give a --tier explicitly")
    log(f"tier auto: chose tier {tier} (the deepest tier whose exits 1..{tier} all have their "
        f"p95 within {budget_ms:g} ms)")
    return tier, report


TORCH_MISSING = (
    "hmf-device join trains the model on this device and needs torch, which this environment "
    "lacks (a serve-only install: hmf-device profile and predict work without it). Install "
    "it with scripts/install-device.sh (without --serve-only), which takes torch's CPU build "
    "from https://download.pytorch.org/whl/cpu; on a Jetson, NVIDIA's torch wheel "
    "(docs/DEVICE.md, \"Device install\"). Not `pip install torch`: PyPI's is a multi-GB CUDA "
    "build on x86-64 and aarch64.")


def _import_torch() -> Any:
    """torch, or a click error saying how to get it: only join trains, so a board that only
    serves graphs is installed without torch (requirements-device-serve.txt)."""
    try:
        import torch
    except ModuleNotFoundError as e:
        if e.name != "torch":  # torch is there but broken: its own error says more
            raise
        raise click.ClickException(TORCH_MISSING) from None
    return torch


@click.command("join")
@click.option("--broker", required=True, help="mqtt://HOST:PORT or mqtts://HOST:PORT.")
@click.option("--device-id", required=True, help="This device's id (its broker user name).")
@click.option("--data", "data_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="NPZ with x (float32) and y (int64), optionally test_x and test_y.")
@click.option("--tier", callback=_tier_arg, default=None, metavar="1|2|3|auto",
              help="Deepest tier this device can train; deeper tasks are refused. auto: the "
                   "deepest tier k whose exits 1..k all have their p95 latency within "
                   "--budget-ms, measured on the ONNX graphs in --model-dir.")
@click.option("--budget-ms", type=float, default=None, callback=budget_arg,
              help="Latency budget per inference for --tier auto (positive, ms; p95, "
                   "batch 1).")
@click.option("--model-dir", type=click.Path(file_okay=False), default=None,
              help=f"Graphs of `hmf export onnx` for --tier auto [default: "
                   f"WORK_DIR/{MODEL_SUBDIR}/current, else WORK_DIR/{MODEL_SUBDIR}].")
@click.option("--precision", type=click.Choice(["fp32", "int8"]), default="fp32",
              show_default=True, help="Which graphs --tier auto measures and --serve-latest "
                                      "fetches.")
@click.option("--serve-latest/--no-serve-latest", default=True, show_default=True,
              help=f"Fetch the graphs of this device's tier each time the cloud exports a new "
                   f"model (hmf-cloud start --export-onnx) into WORK_DIR/{MODEL_SUBDIR}; "
                   f"WORK_DIR/{MODEL_SUBDIR}/current always points at the latest complete one.")
@click.option("--work-dir", required=True, type=click.Path(file_okay=False),
              help="Where the device keeps its last update until the cloud has it.")
@click.option("--username", default=None, help="Broker user name (default: the device id "
                                                 "when --password-file is given).")
@click.option("--password-file", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Torch threads for training [default: torch's].")
@click.option("--retry-s", type=float, default=10.0, show_default=True,
              help="Repeat a request after this long without an answer.")
@click.option("--stay", is_flag=True, help="Keep waiting for a new run when this one ends.")
@click.option("--connect-timeout", type=click.FloatRange(min=0), default=60.0,
              show_default=True, callback=_timeout_arg,
              help="Give up (exit status 1) when the broker cannot be reached, or refuses this "
                   "device, for this many seconds after the start; 0: keep trying forever. "
                   "Once connected, a lost broker is always waited for.")
def join(broker: str, device_id: str, data_path: str, tier: int | str | None,
         budget_ms: float | None, model_dir: str | None, precision: str, work_dir: str,
         username: str | None, password_file: str | None, tls_ca: str | None,
         tls_cert: str | None, tls_key: str | None, threads: int | None, retry_s: float,
         stay: bool, serve_latest: bool, connect_timeout: float | None) -> None:
    """Join a fleet: announce, train what the cloud assigns, upload, repeat until the run ends."""
    torch = _import_torch()

    from common import protocol as p
    from common.mqtt_link import broker_settings
    from device.agent import BrokerUnreachable, DeviceAgent, load_device_data
    from device.serving import ModelFetcher

    try:
        p.check_device_id(device_id)
        settings = broker_settings(broker, username or (device_id if password_file else None),
                                   password_file, tls_ca, tls_cert, tls_key)
        data = load_device_data(data_path)
    except (ValueError, p.ProtocolError, OSError) as e:
        raise click.ClickException(str(e)) from None
    if (tier == "auto") != (budget_ms is not None):
        raise click.UsageError("--tier auto needs --budget-ms, and --budget-ms needs --tier auto")
    if tier == "auto":
        assert budget_ms is not None
        graphs = Path(model_dir) if model_dir else default_model_dir(work_dir)
        try:
            tier, _ = auto_tier(graphs, budget_ms, precision=precision, threads=threads,
                                log=lambda line: click.echo(f"{device_id}: {line}"))
        except ValueError as e:
            raise click.ClickException(str(e)) from None
    if threads:
        torch.set_num_threads(threads)
    log = click.echo
    serving = None
    if serve_latest:
        serving = ModelFetcher(Path(work_dir) / MODEL_SUBDIR, device_id, tier, (precision,),
                               retry_s, log=log)
    agent = DeviceAgent(device_id, settings, data, work_dir, tier, retry_s, stay, log=log,
                        serving=serving, connect_timeout=connect_timeout)
    try:
        code = agent.run()
    except BrokerUnreachable as e:
        raise click.ClickException(str(e)) from None
    raise SystemExit(code)

