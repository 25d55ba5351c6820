"""Out-of-sample errors of HypeMeFed's hypernetworks, from runs with ``--hypernet-gate``.

Each round, before training on them, the gated hypernetworks predict that round's trainers'
deep convs (new clients to them) and the run's metrics record three relative errors per conv:
the generated conv's, the other trainers' mean's and the global conv's (cloud/strategies/
hypemefed.py, ``out_of_sample_check``). This prints, per run and conv, how often the gate
opened and the medians of the three errors, and writes them as JSON.

    python bench/gate_verdicts.py runs/x/hypemefed-gate/s0 ... --json bench/results/gate.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from cloud.runlog import read_metrics

ERRORS = ("generated_err", "mean_err", "global_err")


def verdicts(run: Path) -> dict[str, dict[str, Any]]:
    """Per conv: rounds judged, rounds opened, rounds the generated conv beat the global one,
    and the median of each error over the judged rounds."""
    judged: dict[str, list[dict[str, Any]]] = {}
    for row in read_metrics(run):
        for conv, v in row.get("hypernet_gate", {}).items():
            if v["generated_err"] is not None:  # judged: trained before, at least two pairs
                judged.setdefault(conv, []).append(v)
    return {conv: {"rounds": len(vs), "opened": sum(v["open"] for v in vs),
                   "beat_global": sum(v["generated_err"] < v["global_err"] for v in vs),
                   **{f"median_{e}": float(np.median([v[e] for v in vs])) for e in ERRORS}}
            for conv, vs in judged.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    print("| run | conv | rounds judged | opened | generated beat global | median error: "
          "generated / other trainers' mean / global |")
    print("|---|---|---|---|---|---|")
    out = {}
    for run in args.runs:
        out[str(run)] = per_conv = verdicts(run)
        for conv, v in per_conv.items():
            print(f"| {run} | {conv} | {v['rounds']} | {v['opened']} | {v['beat_global']} | "
                  + " / ".join(f"{v[f'median_{e}']:.3f}" for e in ERRORS) + " |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
