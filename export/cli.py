"""``hmf export onnx``: a trained global model -> per-exit and segment ONNX graphs + manifest.

Only ``click`` is imported at module level: ``hmf --help`` must not pay for importing onnx.
"""

from __future__ import annotations

from pathlib import Path

import click

from common.models import NUM_BLOCKS, SPECS


def _tiers(text: str) -> list[int]:
    try:
        tiers = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise click.BadParameter("comma-separated tiers, e.g. 1,2,3",
                                 param_hint="--tiers") from None
    if not tiers or not all(1 <= t <= NUM_BLOCKS for t in tiers):
        raise click.BadParameter(f"tiers must be in 1..{NUM_BLOCKS}", param_hint="--tiers")
    return tiers


@click.group()
def export() -> None:
    """Export trained models for devices."""


@export.command("onnx")
@click.option("--checkpoint", type=click.Path(exists=True),
              help="Run directory (its checkpoint.hmf) or checkpoint file.")
@click.option("--model", "model_name", type=click.Choice(list(SPECS)), default=None,
              help="Export an untrained model instead of a checkpoint (for benchmarks).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Directory for the .onnx files and manifest.json.")
@click.option("--tiers", default=",".join(map(str, range(1, NUM_BLOCKS + 1))), show_default=True,
              help="Exits to export as whole graphs (segments 1..max are always written).")
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="Also write static int8 (QDQ) graphs calibrated on real data.")
@click.option("--int8-scheme", type=click.Choice(["u8s8-rr", "u8s8", "u8u8"]),
              default="u8s8-rr", show_default=True,
              help="int8 kernels' number formats (docs/DEVICE.md, int8): u8s8-rr keeps fp32's "
                   "answers on x86 CPUs without VNNI too.")
@click.option("--int8-min-agreement", type=click.FloatRange(0, 1), default=0.97,
              show_default=True,
              help="An int8 graph ships only if its labels agree with fp32's on at least this "
                   "share of the evaluation samples...")
@click.option("--int8-max-drop", type=click.FloatRange(0, 1), default=0.02, show_default=True,
              help="...and it loses at most this much accuracy (0.02: 2 points).")
@click.option("--int8-on-failure", type=click.Choice(["fp32", "refuse"]), default="fp32",
              show_default=True,
              help="A graph over the bounds: leave its int8 version out (devices run fp32 "
                   "there), or fail the export.")
@click.option("--opset", type=click.IntRange(min=13), default=None,
              help="ONNX opset, 13 or later (per-channel int8 needs 13) [default: 17].")
@click.option("--data-dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Dataset for checks, calibration and accuracy (hapt: the shipped windows).")
@click.option("--calibration-samples", type=int, default=256, show_default=True)
@click.option("--eval-samples", type=int, default=2000, show_default=True,
              help="Test samples for the int8 accuracy columns (at most).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Sample selection, and the weights of an untrained --model.")
def onnx_command(checkpoint: str | None, model_name: str | None, out: str, tiers: str,
                 quantize: str | None, int8_scheme: str, int8_min_agreement: float,
                 int8_max_drop: float, int8_on_failure: str, opset: int | None,
                 data_dir: str | None, calibration_samples: int, eval_samples: int,
                 seed: int) -> None:
    """One ONNX graph per exit and per segment, checked against torch, with manifest.json."""
    import torch

    from common.data import DataError
    from export.data import export_data
    from export.exporter import (
        DEFAULT_OPSET,
        ExportCheckError,
        Int8Policy,
        export_onnx,
        load_global_state,
        sha256,
    )

    if (checkpoint is None) == (model_name is None):
        raise click.UsageError("give exactly one of --checkpoint or --model")
    try:
        if checkpoint is not None:
            state, meta, path = load_global_state(checkpoint)
            name = meta["model"]
            # the file's name and hash, not its path: the build machine's paths stay home
            source = {"checkpoint": path.name, "checkpoint_sha256": sha256(path),
                      "round": meta.get("round"), "strategy": meta.get("strategy")}
        else:
            from common.models import build_model

            name = model_name
            torch.manual_seed(seed)
            state = build_model(name).state_dict()
            source = {"untrained": True, "seed": seed,
                      "note": "random initial weights: accuracies mean nothing"}
        data = export_data(name, data_dir, calibration=calibration_samples,
                           evaluation=eval_samples, seed=seed)
        policy = Int8Policy(int8_scheme, int8_min_agreement, int8_max_drop, int8_on_failure)
        manifest = export_onnx(name, state, out, data, tiers=_tiers(tiers),
                               opset=opset or DEFAULT_OPSET, quantize=quantize, source=source,
                               int8=policy)
    except (ValueError, FileNotFoundError, DataError, ExportCheckError) as e:
        raise click.ClickException(str(e)) from None
    _summary(manifest, Path(out))


def _summary(manifest: dict, out: Path) -> None:
    """One line per file, then the check and the int8 accuracy."""
    click.echo(f"{manifest['model']}: exported to {out} (opset {manifest['opset']})")
    for f in manifest["files"]:
        click.echo(f"  {f['file']:<22} {f['bytes'] / 2**20:7.2f} MiB  {f['params']:>10,} params"
                   f"  {f['macs']:>14,} MACs")
    worst = max(e["max_abs_diff_vs_torch"] for e in manifest["check"]["exits"].values())
    click.echo(f"check passed on {manifest['check']['samples']} samples "
               f"({manifest['check']['source']}): max |ORT - torch| {worst:.1e}")
    q = manifest["quantization"]
    if q:
        click.echo(f"int8 ({q['method']['scheme']}), measured on {q['measured_on']['cpu']} "
                   f"({q['measured_on']['int8_isa']}):")
        for name, v in q["graphs"].items():
            acc = ("" if v["accuracy_fp32"] is None else
                   f"accuracy {v['accuracy_fp32']:.4f} -> {v['accuracy_int8']:.4f}, ")
            verdict = "ships" if v["reason"] is None else f"KEPT IN FP32: {v['reason']}"
            click.echo(f"  {name:<10} {acc}agrees with fp32 on {v['agreement_with_fp32']:.1%}:"
                       f" {verdict}")
        if q["note"]:
            click.echo(f"  note: {q['note']}")
