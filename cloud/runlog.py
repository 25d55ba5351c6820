"""A run's directory: config.json, metrics.jsonl (one object per round) and summary.json."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(out_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RunLog:
    def __init__(self, out_dir: str | Path, config: dict[str, Any], resume_round: int = 0) -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        _write_json(self.dir / "config.json", config)
        # Rounds logged after the checkpoint being resumed were lost with the crash: drop them.
        kept = [m for m in read_metrics(self.dir) if m["round"] <= resume_round]
        (self.dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in kept))
        self.rows = kept

    def append(self, row: dict[str, Any]) -> None:
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        self.rows.append(row)
        _write_json(self.dir / "summary.json", summarize(self.rows))


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Final and best of every accuracy in the metrics (None where never measured)."""
    summary: dict[str, Any] = {"rounds": len(rows), "final": {}, "best": {}}
    evaluated = [r for r in rows if r.get("acc")]
    if not evaluated:
        return summary
    last = evaluated[-1]["acc"]
    for group, values in last.items():
        if isinstance(values, dict):
            summary["final"][group] = values
            summary["best"][group] = {
                k: max((r["acc"][group][k] for r in evaluated if r["acc"][group][k] is not None),
                       default=None) for k in values}
        else:
            summary["final"][group] = values
            summary["best"][group] = max((r["acc"][group] for r in evaluated
                                          if r["acc"][group] is not None), default=None)
    summary["strategy"] = rows[-1].get("strategy")
    summary["mean_round_s"] = sum(r["elapsed_s"] for r in rows) / len(rows)
    return summary
