"""Accuracy curves of one or more runs (``hmf plot``)."""

from __future__ import annotations

from pathlib import Path

from cloud.runlog import read_metrics
from common.models import NUM_BLOCKS


def run_label(run_dir: Path) -> str:
    return run_dir.name or str(run_dir)


def plot_runs(run_dirs: list[Path], out: Path, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no screen needed
    import matplotlib.pyplot as plt

    panels = [("global", str(e), f"global test, exit {e}") for e in range(1, NUM_BLOCKS + 1)]
    panels.append(("local_mean", None, "mean local test (deepest exit)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), sharey=True)
    for i, run_dir in enumerate(run_dirs):
        rows = [r for r in read_metrics(run_dir) if r.get("acc")]
        if not rows:
            raise ValueError(f"{run_dir} has no evaluated rounds in metrics.jsonl")
        for ax, (group, key, _) in zip(axes, panels, strict=True):
            points = [(r["round"], r["acc"][group] if key is None else r["acc"][group][key])
                      for r in rows]
            points = [(x, y) for x, y in points if y is not None]
            if points:
                # one colour per run in every panel, even where another run has no points
                ax.plot(*zip(*points, strict=True), label=run_label(run_dir), color=f"C{i % 10}")
    for ax, (_, _, name) in zip(axes, panels, strict=True):
        ax.set_title(name)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[-1].legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
