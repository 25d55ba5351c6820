"""How good are HypeMeFed's generated weights? Out-of-sample check on a finished run.

For every client of the run's federation (or the first --clients of them), start from the run's
final global model, train the full model on the client's local data as a tier-3 participant
would, and compare the hypernetworks' output from the client's trained block k with the block
k+1 the client actually trained, tensor by tensor (conv weights, and with ``--generate
convs+bn`` / ``all`` the per-channel vectors and heads too). Two references for the relative
error ||generated - trained|| / ||trained||:
- zeros (error 1.0), and
- the global model's block k+1 before local training: what depth-wise FL effectively keeps.
A hypernetwork worth using beats both. Prints a table, writes JSON.

    python bench/generation_error.py runs/hapt-subject/hypemefed --clients 8
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from cloud.checkpoint import load_checkpoint
from cloud.config import RunConfig
from cloud.federation import Federation, seed_of
from cloud.simulation import strategy_for
from cloud.strategies.hypemefed import pack, unpack
from common.data import load_dataset
from common.models import build_model
from common.training import TrainConfig, train_task


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def run_config(run_dir: Path) -> RunConfig:
    saved = json.loads((run_dir / "config.json").read_text())
    saved["tier_mix"] = tuple(saved["tier_mix"])
    if "hypernet_sweeps" not in saved:  # a run from before the closed-form step: LRF hidden 512
        saved.update(hypernet_sweeps=0, hidden=saved.get("hidden") or 512)
    return RunConfig(**saved)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON file (default: RUN/generation_error.json)")
    args = ap.parse_args()
    cfg = run_config(args.run_dir)
    strategy = strategy_for(cfg)
    rnd, state, _ = load_checkpoint(args.run_dir, strategy)
    data = load_dataset(cfg.model, cfg.data_dir)
    fed = Federation.build(data, cfg.clients, cfg.participants, cfg.tier_mix, cfg.partition,
                           cfg.alpha, cfg.seed, cfg.min_size)
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    train_cfg = TrainConfig(cfg.local_epochs, cfg.batch_size, cfg.lr)
    rows = []
    for client in range(min(args.clients, cfg.clients)):
        idx = torch.from_numpy(fed.train[client])
        trained, _ = train_task(build_model(cfg.model), state, x[idx], y[idx], train_cfg,
                                seed_of(cfg.seed, 99, client))
        for m in strategy.mappings:
            with torch.no_grad():
                out = strategy.hypernets[m.key].eval()(pack(m, trained, m.sources))
            for target, generated in unpack(m, out).items():
                rows.append({"client": client, "target": target,
                             "hypernet": rel(generated, trained[target]),
                             "global": rel(state[target], trained[target]),
                             "norm_ratio": float(generated.norm() / trained[target].norm())})
    print(f"{args.run_dir} after round {rnd}: relative error against the client's trained weight")
    print(f"{'target':<32}{'hypernet':>10}{'global':>10}{'|gen|/|trained|':>17}")
    summary = {}
    for target in dict.fromkeys(r["target"] for r in rows):
        sel = [r for r in rows if r["target"] == target]
        summary[target] = {k: float(np.median([r[k] for r in sel]))
                           for k in ("hypernet", "global", "norm_ratio")}
        s = summary[target]
        print(f"{target:<32}{s['hypernet']:>10.3f}{s['global']:>10.3f}{s['norm_ratio']:>17.3f}")
    out = args.out or args.run_dir / "generation_error.json"
    out.write_text(json.dumps({"round": rnd, "median": summary, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
