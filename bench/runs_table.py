"""A markdown table comparing finished runs (one row per run directory).

Accuracies are the mean of the last ``--last`` evaluated rounds (single rounds swing by several
points on HAPT), with the best round in parentheses where asked.

    python bench/runs_table.py runs/hapt-subject/* --last 3
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cloud.runlog import read_metrics


def last_mean(rows: list[dict], path: tuple[str, ...], last: int) -> float | None:
    values = []
    for r in rows[-last:]:
        v = r["acc"]
        for key in path:
            v = v[key]
        if v is not None:
            values.append(v)
    return float(np.mean(values)) if values else None


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--last", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    cols = [("global", "1"), ("global", "2"), ("global", "3"), ("tier", "1"), ("tier", "2"),
            ("tier", "3"), ("local_mean",)]
    print(f"| run | rounds | {' | '.join('/'.join(c) for c in cols)} | s/round | server s |")
    print("|---" * (len(cols) + 4) + "|")
    table = {}
    for run in args.runs:
        rows = [r for r in read_metrics(run) if r.get("acc")]
        if not rows:
            continue
        figures = {"/".join(c): last_mean(rows, c, args.last) for c in cols}
        every = read_metrics(run)
        figures["s_per_round"] = float(np.median([r["elapsed_s"] for r in every]))
        figures["server_s"] = float(np.median([r["server_s"] for r in every]))
        table[run.name] = figures
        print(f"| {run.name} | {rows[-1]['round']} | "
              + " | ".join(fmt(figures["/".join(c)]) for c in cols)
              + f" | {figures['s_per_round']:.1f} | {figures['server_s']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"last": args.last, "runs": table}, indent=2))


if __name__ == "__main__":
    main()
