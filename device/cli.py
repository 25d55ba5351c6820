"""``hmf-device``: what runs on a board (requirements-device.txt alone)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import click
import numpy as np

from device.join import budget_arg, join
from device.runtime import (
    BATCH_VALUES,
    DEFAULT_BATCH,
    STATUS_TEXT,
    DeviceModel,
    ManifestError,
    Prediction,
)

_MODEL_DIR = click.option("--model-dir", required=True,
                          type=click.Path(exists=True, file_okay=False),
                          help="Directory written by `hmf export onnx` (manifest.json), or "
                               "a joined device's WORK_DIR/model/current.")
_PRECISION_HELP = ("Which exported graphs to run. auto: int8 for the exits whose int8 graphs "
                   "agree with fp32 on this CPU (checked on the export's calibration windows), "
                   "fp32 for the others.")
_PRECISION = click.option("--precision", type=click.Choice(["fp32", "int8", "auto"]),
                          default="fp32", show_default=True, help=_PRECISION_HELP)
_PROFILE_PRECISION = click.option("--precision", type=click.Choice(["fp32", "int8", "auto"]),
                                  default="auto", show_default=True,
                                  help=_PRECISION_HELP + " With auto, int8 must also be faster.")
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


def _threshold_arg(ctx: click.Context, param: click.Parameter, value: float | None
                   ) -> float | None:
    if value is not None and math.isnan(value):
        raise click.BadParameter("must be a number between 0 and 1, not NaN")
    return value


@hmf_device.command()
@_MODEL_DIR
@click.option("--runs", type=click.IntRange(min=1), default=100, show_default=True,
              help="Timed runs per exit, the exits interleaved (after 3 warm-up rounds).")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--budget-ms", type=float, default=None, callback=budget_arg,
              help="Latency budget (positive, ms): report the deepest tier k whose exits "
                   "1..k all have their p95 within it.")
@_PROFILE_PRECISION
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
        click.echo(json.dumps(report, indent=2, allow_nan=False))
        return
    _print_profile(report)


def _print_profile(r: dict[str, Any]) -> None:
    s = r["system"]
    click.echo(f"{r['model']} ({r['precision']}), batch {r['batch']}, {r['runs']} runs per exit "
               f"(interleaved), threads {r['threads'] or 'default'}")
    click.echo(f"cpu: {s['cpu']} ({s['machine']}, {s['cores']} cores), onnxruntime "
               f"{s['onnxruntime']}")
    click.echo(f"{'exit':>4} {'precision':>9} {'median ms':>10} {'p95 ms':>9} {'p99 ms':>9} "
               f"{'samples/s':>10} {'peak MiB':>9} {'session MiB':>12}")
    for e in r["exits"]:
        sess = "n/a" if e["session_mb"] is None else f"{e['session_mb']:.1f}"
        click.echo(f"{e['exit']:>4} {e['precision']:>9} {e['median_ms']:>10.3f} "
                   f"{e['p95_ms']:>9.3f} {e['p99_ms']:>9.3f} {e['throughput_per_s']:>10.1f} "
                   f"{e['peak_rss_mb']:>9.1f} {sess:>12}")
    for e in r["exits"]:
        if "why" in e:
            click.echo(f"exit {e['exit']}: {e['precision']}: {e['why']}")
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
        click.echo(f"deepest tier within {r['budget_ms']:g} ms (exits 1..k all by p95): "
                   f"{tier if tier else 'none (even exit 1 is over budget)'}")


def _open_input(path: str, key: str | None) -> tuple[Any, np.ndarray | None]:
    from device.inputs import InputError, open_samples

    try:
        return open_samples(path, key)
    except InputError as e:
        raise click.BadParameter(str(e), param_hint="--input") from None


def _labels(y: np.ndarray | None, n: int) -> np.ndarray | None:
    """Labels usable for an accuracy, or None with a warning on stderr saying why not."""
    if y is None:
        return None
    why = None
    if y.dtype.kind not in "iu":
        why = f"they are {y.dtype}, not integers"
    elif y.size != n:
        why = f"there are {y.size} for {n} samples"
    if why:
        click.echo(f"warning: labels y ignored (no accuracy): {why}", err=True)
        return None
    return y.reshape(-1)


@hmf_device.command()
@_MODEL_DIR
@click.option("--input", "input_path", required=True,
              type=click.Path(exists=True, dir_okay=False),
              help=".npz with samples under 'x' (labels under 'y' give an accuracy), or a .npy "
                   "of samples.")
@click.option("--key", default=None, help="Array of the .npz holding the samples.")
@click.option("--exit", "exit_k", type=click.IntRange(min=1), default=None,
              help="Classify at this exit (default: the deepest exported).")
@click.option("--threshold", type=click.FloatRange(0, 1), default=None,
              callback=_threshold_arg,
              help="Cascade: stop at the first exit whose softmax confidence reaches it.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help=f"Samples per ONNX Runtime call: bounds memory [default: {DEFAULT_BATCH}, "
                   f"fewer for large samples so that a batch holds at most {BATCH_VALUES} input "
                   "values].")
@_PRECISION
@_THREADS
@_PROVIDERS
@click.option("--json", "as_json", is_flag=True, help="Print the predictions as JSON.")
def predict(model_dir: str, input_path: str, key: str | None, exit_k: int | None,
            threshold: float | None, batch_size: int | None, precision: str, threads: int | None,
            providers: str, as_json: bool) -> None:
    """Classify the samples of a .npz or .npy at one exit or with early exit.

    Samples holding NaN or Inf get no label (they are reported as invalid and left out of the
    counts and the accuracy); the exit status is 1 only when not one sample could be labelled.
    """
    if exit_k is not None and threshold is not None:
        raise click.UsageError("give --exit or --threshold, not both")
    x, y = _open_input(input_path, key)
    try:
        model = _model(_pinned(model_dir), precision, threads, _provider_list(providers))
    except ManifestError as e:
        raise click.ClickException(str(e)) from None
    x = _checked_samples(model, x, exit_k, input_path)
    labels = _labels(y, len(x))
    from device.inputs import InputError

    try:
        warnings = model.input_warnings(x, batch_size)
        pred = (model.cascade(x, threshold, batch_size=batch_size) if threshold is not None
                else model.predict(x, exit_k, batch_size=batch_size))
    except (ManifestError, InputError) as e:  # InputError: the file changed while being read
        raise click.ClickException(str(e)) from None
    for w in warnings:
        click.echo(f"warning: {input_path}: {w}", err=True)
    summary = _summary(pred, labels, warnings)
    _print_predictions(pred, model.manifest.class_names, summary, as_json)
    if len(pred.labels) and not pred.valid.any():
        raise click.ClickException(f"not one of the {len(pred.labels)} samples could be "
                                   "classified: every one holds NaN or Inf (or gave non-finite "
                                   "logits); check the sensor or the export")


def _model(model_dir: Path, precision: str, threads: int | None, providers: list[str]
           ) -> DeviceModel:
    """The model at ``precision``; for auto, int8 with the exits whose int8 graphs disagree
    with fp32 on this CPU in fp32 (each choice said on stderr)."""
    if precision != "auto":
        return DeviceModel(model_dir, precision=precision, threads=threads, providers=providers)
    from device.precision import choose_precisions

    verdicts = choose_precisions(model_dir, threads=threads, providers=providers)
    has_int8 = any(v.precision == "int8" for v in verdicts)
    model = DeviceModel(model_dir, precision="int8" if has_int8 else "fp32", threads=threads,
                        providers=providers, verify=False)
    model.fp32_exits = {v.exit for v in verdicts if v.precision == "fp32"}
    for v in verdicts:
        click.echo(f"precision auto: exit {v.exit}: {v.precision} ({v.why})", err=True)
    return model


def _checked_samples(model: DeviceModel, x: Any, exit_k: int | None, path: str) -> Any:
    """The samples as a batch that fits the model, checked before anything runs."""
    try:
        x = model.as_batch(x)
    except ValueError as e:
        raise click.BadParameter(f"{path}: {e}", param_hint="--input") from None
    if len(x) == 0:
        raise click.BadParameter(f"{path} holds no samples", param_hint="--input")
    if exit_k is not None and exit_k not in model.exits:
        raise click.BadParameter(f"this export has exits {model.exits} at {model.precision}",
                                 param_hint="--exit")
    return x


def _summary(p: Prediction, y: np.ndarray | None, warnings: list[str]) -> dict[str, Any]:
    """Counts over the labelled samples only; invalid ones are counted by reason."""
    valid = p.valid
    exits, counts = np.unique(p.exits[valid], return_counts=True)
    summary: dict[str, Any] = {
        "samples": len(p.labels), "valid": int(valid.sum()),
        "invalid": {STATUS_TEXT[int(s)]: int(n) for s, n in
                    zip(*np.unique(p.status[~valid], return_counts=True), strict=True)},
        "exits": {int(k): int(n) for k, n in zip(exits, counts, strict=True)}}
    if y is not None and valid.any():
        summary["accuracy"] = float((p.labels[valid] == y[valid]).mean())
    summary["warnings"] = warnings
    return summary


def _row(i: int, p: Prediction, names: list[str]) -> dict[str, Any]:
    if not p.valid[i]:
        return {"index": i, "label": None, "class": None, "exit": None, "confidence": None,
                "invalid": STATUS_TEXT[int(p.status[i])]}
    label = int(p.labels[i])
    return {"index": i, "label": label, "class": names[label], "exit": int(p.exits[i]),
            "confidence": round(float(p.confidences[i]), 6), "invalid": None}


def _print_predictions(p: Prediction, names: list[str], summary: dict[str, Any],
                       as_json: bool) -> None:
    """One row per sample, then the summary; streamed, so output memory stays flat. JSON is
    strict (no NaN or Infinity tokens: invalid samples have nulls)."""
    n = len(p.labels)
    if as_json:
        click.echo('{"predictions": [', nl=False)
        for i in range(n):
            sep = ", " if i else ""
            click.echo(sep + json.dumps(_row(i, p, names), allow_nan=False), nl=False)
        click.echo('], "summary": ' + json.dumps(summary, allow_nan=False) + "}")
        return
    for i in range(n):
        r = _row(i, p, names)
        if r["invalid"]:
            click.echo(f"{i:>6}  invalid: {r['invalid']}")
        else:
            click.echo(f"{i:>6}  {r['class']:<20} exit {r['exit']}  "
                       f"confidence {r['confidence']:.3f}")
    invalid = "".join(f", {k} invalid ({reason})" for reason, k in summary["invalid"].items())
    acc = (f", accuracy {summary['accuracy']:.4f} of {summary['valid']} labelled"
           if "accuracy" in summary else "")
    click.echo(f"{summary['samples']} samples, per exit {summary['exits']}{invalid}{acc}")


hmf_device.add_command(join)

if __name__ == "__main__":
    sys.exit(hmf_device())
