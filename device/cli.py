"""``hmf-device``: what runs on a board (requirements-device.txt alone)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
import numpy as np

from device.join import join
from device.runtime import DeviceModel, ManifestError, Prediction

_MODEL_DIR = click.option("--model-dir", required=True,
                          type=click.Path(exists=True, file_okay=False),
                          help="Directory written by `hmf export onnx` (manifest.json), or "
                               "a joined device's WORK_DIR/model/current.")
_PRECISION = click.option("--precision", type=click.Choice(["fp32", "int8"]), default="fp32",
                          show_default=True, help="Which exported graphs to run.")
_THREADS = click.option("--threads", type=click.IntRange(min=1), default=None,
                        help="ONNX Runtime intra-op threads [default: one per core].")
_PROVIDERS = click.option("--providers", default="CPUExecutionProvider", show_default=True,
                          help="ONNX Runtime execution providers in order of preference, "
                               "comma-separated (Jetson: TensorrtExecutionProvider,"
                               "CUDAExecutionProvider,CPUExecutionProvider).")


def _pinned(model_dir: str) -> Path:
    """The directory behind ``model_dir``, resolved once: when ``hmf-device join`` moves its
    ``current`` link to a newer model mid-run, this run keeps reading one model's graphs."""
    return Path(model_dir).resolve()


def _provider_list(text: str) -> list[str]:
    """The providers asked for, refusing ones this onnxruntime build lacks (ONNX Runtime would
    otherwise fall back to the CPU without a word)."""
    import onnxruntime as ort

    wanted = [p.strip() for p in text.split(",") if p.strip()]
    missing = [p for p in wanted if p not in ort.get_available_providers()]
    if missing:
        raise click.BadParameter(f"{', '.join(missing)} not in this onnxruntime build (has "
                                 f"{', '.join(ort.get_available_providers())})",
                                 param_hint="--providers")
    return wanted


@click.group()
def hmf_device() -> None:
    """HypeMeFed on a device: profile and run exported models."""


@hmf_device.command()
@_MODEL_DIR
@click.option("--runs", type=click.IntRange(min=1), default=50, show_default=True,
              help="Timed runs per exit (after 3 warm-up runs).")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--budget-ms", type=float, default=None,
              help="Latency budget: report the deepest tier whose p95 fits it.")
@_PRECISION
@_THREADS
@_PROVIDERS
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as JSON.")
def profile(model_dir: str, runs: int, batch: int, budget_ms: float | None, precision: str,
            threads: int | None, providers: str, as_json: bool) -> None:
    """Per exit: median and p95 latency, throughput, peak memory; CPU, ONNX Runtime, thermals."""
    from device.profile import profile as run_profile
    from device.profile import tier_within

    try:
        report = run_profile(_pinned(model_dir), runs=runs, batch=batch, threads=threads,
                             precision=precision, providers=_provider_list(providers))
    except (ManifestError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    if budget_ms is not None:
        report["budget_ms"] = budget_ms
        report["deepest_tier_within_budget"] = tier_within(report, budget_ms)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    _print_profile(report)


def _print_profile(r: dict[str, Any]) -> None:
    s = r["system"]
    click.echo(f"{r['model']} ({r['precision']}), batch {r['batch']}, {r['runs']} runs, "
               f"threads {r['threads'] or 'default'}")
    click.echo(f"cpu: {s['cpu']} ({s['machine']}, {s['cores']} cores), onnxruntime "
               f"{s['onnxruntime']}")
    click.echo(f"{'exit':>4} {'median ms':>10} {'p95 ms':>9} {'p99 ms':>9} {'samples/s':>10} "
               f"{'peak MiB':>9} {'session MiB':>12}")
    for e in r["exits"]:
        sess = "n/a" if e["session_mb"] is None else f"{e['session_mb']:.1f}"
        click.echo(f"{e['exit']:>4} {e['median_ms']:>10.3f} {e['p95_ms']:>9.3f} "
                   f"{e['p99_ms']:>9.3f} {e['throughput_per_s']:>10.1f} "
                   f"{e['peak_rss_mb']:>9.1f} {sess:>12}")
    for when in ("before", "after"):
        t = r[f"thermal_{when}"]
        temps = t["temperatures_c"]
        hottest = f"{max(temps.values()):.1f} C" if temps else "not exposed"
        throttled = t["pi_throttled"]["now"] if t["pi_throttled"] else "not exposed"
        freq = t["cpufreq"]
        clock = f"{freq['cur_khz'] / 1e3:.0f}/{freq['max_khz'] / 1e3:.0f} MHz" if freq else "n/a"
        click.echo(f"{when}: hottest zone {hottest}, throttled {throttled}, clock {clock}")
    if "budget_ms" in r:
        tier = r["deepest_tier_within_budget"]
        click.echo(f"deepest tier within {r['budget_ms']} ms (p95): "
                   f"{tier if tier else 'none (even exit 1 is over budget)'}")


def _load_input(path: str, key: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Samples (key ``x``, or the only array, or ``--key``) and labels ``y`` if present; never
    unpickles (a .npz from elsewhere may hold a pickle that runs code)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            names = list(f.keys())
            k = key or ("x" if "x" in names else names[0] if len(names) == 1 else None)
            if k is None or k not in names:
                raise click.BadParameter(f"{path} holds {', '.join(names)}: name the samples "
                                         "with --key", param_hint="--input")
            return f[k], (f["y"] if "y" in names and k != "y" else None)
    except (OSError, ValueError) as e:
        raise click.BadParameter(f"cannot read {path}: {e}", param_hint="--input") from None


@hmf_device.command()
@_MODEL_DIR
@click.option("--input", "input_path", required=True,
              type=click.Path(exists=True, dir_okay=False),
              help=".npz with samples under 'x' (labels under 'y' give an accuracy).")
@click.option("--key", default=None, help="Array of the .npz holding the samples.")
@click.option("--exit", "exit_k", type=click.IntRange(min=1), default=None,
              help="Classify at this exit (default: the deepest exported).")
@click.option("--threshold", type=click.FloatRange(0, 1), default=None,
              help="Cascade: stop at the first exit whose softmax confidence reaches it.")
@_PRECISION
@_THREADS
@_PROVIDERS
@click.option("--json", "as_json", is_flag=True, help="Print the predictions as JSON.")
def predict(model_dir: str, input_path: str, key: str | None, exit_k: int | None,
            threshold: float | None, precision: str, threads: int | None, providers: str,
            as_json: bool) -> None:
    """Classify the samples of an .npz at one exit or with early exit."""
    if exit_k is not None and threshold is not None:
        raise click.UsageError("give --exit or --threshold, not both")
    x, y = _load_input(input_path, key)
    try:
        model = DeviceModel(_pinned(model_dir), precision=precision, threads=threads,
                            providers=_provider_list(providers))
        pred = (model.cascade(x, threshold) if threshold is not None
                else model.predict(x, exit_k))
    except (ManifestError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    _print_predictions(pred, model.manifest.class_names, y, as_json)


def _print_predictions(p: Prediction, names: list[str], y: np.ndarray | None,
                       as_json: bool) -> None:
    rows = [{"index": i, "label": int(lb), "class": names[lb], "exit": int(e),
             "confidence": round(float(c), 6)}
            for i, (lb, e, c) in enumerate(zip(p.labels, p.exits, p.confidences, strict=True))]
    summary: dict[str, Any] = {"samples": len(rows),
                               "exits": {int(k): int(n) for k, n in
                                         zip(*np.unique(p.exits, return_counts=True),
                                             strict=True)}}
    if y is not None and len(y) == len(rows):
        summary["accuracy"] = float((p.labels == np.asarray(y).reshape(-1)).mean())
    if as_json:
        click.echo(json.dumps({"predictions": rows, "summary": summary}))
        return
    for r in rows:
        click.echo(f"{r['index']:>6}  {r['class']:<20} exit {r['exit']}  "
                   f"confidence {r['confidence']:.3f}")
    acc = f", accuracy {summary['accuracy']:.4f}" if "accuracy" in summary else ""
    click.echo(f"{summary['samples']} samples, per exit {summary['exits']}{acc}")


hmf_device.add_command(join)

if __name__ == "__main__":
    sys.exit(hmf_device())
