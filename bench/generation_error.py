"""How good are HypeMeFed's generated weights, and how good could any generator be? Out of
sample, on a finished run.

Every client of the run's federation (or the first --clients of them) starts from the run's
final global model and trains the full model on its local data, as a tier-3 participant would.

1. The run's hypernetworks (a hypemefed run): their output from a client's trained block k
   against the block k+1 the client actually trained, tensor by tensor (conv weights, and with
   ``--generate convs+bn`` / ``all`` the per-channel vectors and heads too). References for the
   relative error ||generated - trained|| / ||trained||: zeros (1.0) and the global model's
   block k+1 before local training, what depth-wise FL effectively keeps.
2. Predictability (any run, every client): is the part of a client's block k+1 that differs
   from the other trainers' mean predictable from its block k? Each tier is held out in turn;
   predictors are fitted on the other tiers' clients (about 20 pairs, more than any round has)
   and judged by ||predicted - trained|| / ||trained - trainers' mean||, so 1.0 is the trainers'
   mean, what depth-wise FL gives a shallow client's block. Predictors: a fresh LRF hypernetwork
   (the production one, closed-form fit) on the weights and on the deviations from the trainers'
   mean, and kernel ridge regression with a linear kernel over clients on the deviations (the
   held-out client's deviation as a mix of the trainers' deviations, weighted by how alike their
   block-k deviations are). "group" is the error of the held-out tier's mean prediction: what
   the aggregate sees. Below 1.0 is information a generator could add to depth-wise FL.
Prints the tables, writes JSON.

    python bench/generation_error.py runs/hapt-subject/hypemefed
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
from cloud.hypernet import build_hypernet, fit
from cloud.simulation import strategy_for
from cloud.strategies.hypemefed import pack, transitions, unpack
from common.data import load_dataset
from common.models import State, build_model
from common.training import TrainConfig, train_task

KRR_RIDGE = 0.1  # relative to the mean diagonal of the clients' Gram matrix


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def run_config(run_dir: Path) -> RunConfig:
    saved = json.loads((run_dir / "config.json").read_text())
    saved["tier_mix"] = tuple(saved["tier_mix"])
    if "hypernet_sweeps" not in saved:  # a run from before the closed-form step: LRF hidden 512
        saved.update(hypernet_sweeps=0, hidden=saved.get("hidden") or 512)
    return RunConfig(**saved)


def hypernet_errors(strategy, state: State, trained: list[State]) -> dict[str, dict]:
    """Table 1: the run's hypernetworks against the global block, median over clients."""
    rows = []
    for client, t in enumerate(trained):
        for m in strategy.mappings:
            with torch.no_grad():
                out = strategy.hypernets[m.key].eval()(pack(m, t, m.sources))
            for target, generated in unpack(m, out).items():
                rows.append({"client": client, "target": target,
                             "hypernet": rel(generated, t[target]),
                             "global": rel(state[target], t[target]),
                             "norm_ratio": float(generated.norm() / t[target].norm())})
    print(f"{'target':<32}{'hypernet':>10}{'global':>10}{'|gen|/|trained|':>17}")
    summary = {}
    for target in dict.fromkeys(r["target"] for r in rows):
        s = summary[target] = {k: float(np.median([r[k] for r in rows if r["target"] == target]))
                               for k in ("hypernet", "global", "norm_ratio")}
        print(f"{target:<32}{s['hypernet']:>10.3f}{s['global']:>10.3f}{s['norm_ratio']:>17.3f}")
    return {"median": summary, "rows": rows}


def kernel_ridge(src: torch.Tensor, tgt: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Linear-kernel ridge regression over clients: flattened (P, n) -> (P, m), for (Q, n)."""
    gram = src @ src.T
    lam = KRR_RIDGE * gram.diagonal().mean()
    return (query @ src.T) @ torch.linalg.solve(gram + lam * torch.eye(len(gram)), tgt)


def lrf(src: torch.Tensor, tgt: torch.Tensor, query: torch.Tensor, rank: int) -> torch.Tensor:
    with torch.random.fork_rng(devices=[]):  # the same initial hypernetwork every time
        torch.manual_seed(0)
        hnet = build_hypernet("lrf", src.shape[1:], tgt.shape[1:], rank=rank)
    fit(hnet, torch.optim.Adam(hnet.parameters()), src, tgt)
    with torch.no_grad():
        return hnet.eval()(query)


def predictability(trained: list[State], tiers: list[int], rank: int) -> list[dict]:
    """Table 2: per conv transition and held-out tier, the predictors' errors (docstring)."""
    tiers_t = torch.tensor(tiers)
    rows = []
    print(f"{'transition':<40}{'tier':>5}{'lrf':>7}{'lrf dev':>9}{'krr dev':>9}"
          f"{'group krr':>11}{'|dev|/|W|':>11}")
    for source, target in transitions():
        src = torch.stack([t[source] for t in trained])
        tgt = torch.stack([t[target] for t in trained])
        for held in sorted(set(tiers)):
            fit_on, test = tiers_t != held, tiers_t == held
            if fit_on.sum() < 2 or not test.any():
                continue
            src_mean, tgt_mean = src[fit_on].mean(0), tgt[fit_on].mean(0)
            ds, dt = src - src_mean, tgt - tgt_mean
            true = dt[test].flatten(1)
            scale = true.norm(dim=1)

            def err(dev_pred: torch.Tensor, scale=scale, true=true) -> float:
                return float(((dev_pred.flatten(1) - true).norm(dim=1) / scale).mean())

            krr = kernel_ridge(ds[fit_on].flatten(1), dt[fit_on].flatten(1), ds[test].flatten(1))
            row = {"transition": f"{source} -> {target}", "held_out_tier": held,
                   "lrf": err(lrf(src[fit_on], tgt[fit_on], src[test], rank) - tgt_mean),
                   "lrf_dev": err(lrf(ds[fit_on], dt[fit_on], ds[test], rank)),
                   "krr_dev": err(krr),
                   "group_krr": float((krr.mean(0) - true.mean(0)).norm() / true.mean(0).norm()),
                   "dev_over_weight": float(scale.mean() / tgt[test].flatten(1).norm(dim=1).mean()),
                   "pairs": int(fit_on.sum())}
            rows.append(row)
            print(f"{row['transition']:<40}{held:>5}{row['lrf']:>7.3f}{row['lrf_dev']:>9.3f}"
                  f"{row['krr_dev']:>9.3f}{row['group_krr']:>11.3f}"
                  f"{row['dev_over_weight']:>11.3f}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--clients", type=int, default=None, help="only the first N clients")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON file (default: RUN/generation_error.json)")
    args = ap.parse_args()
    cfg = run_config(args.run_dir)
    strategy = strategy_for(cfg)
    rnd, state, _ = load_checkpoint(args.run_dir, strategy)
    data = load_dataset(cfg.model, cfg.data_dir)
    fed = Federation.build(data, cfg.clients, cfg.participants, cfg.tier_mix, cfg.partition,
                           cfg.alpha, cfg.seed, cfg.min_size, cfg.tier_by)
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    train_cfg = TrainConfig(cfg.local_epochs, cfg.batch_size, cfg.lr)
    clients = range(min(args.clients or cfg.clients, cfg.clients))
    trained = []
    for client in clients:
        idx = torch.from_numpy(fed.train[client])
        trained.append(train_task(build_model(cfg.model), state, x[idx], y[idx], train_cfg,
                                  seed_of(cfg.seed, 99, client))[0])
    print(f"{args.run_dir} after round {rnd}, {len(trained)} clients, {cfg.local_epochs} local "
          f"epoch(s): relative errors against the clients' trained weights")
    result = {"round": rnd, "clients": len(trained), "local_epochs": cfg.local_epochs}
    if hasattr(strategy, "mappings"):
        result["hypernets"] = hypernet_errors(strategy, state, trained)
    print("predictability: 1.0 = the trainers' mean (depth-wise FL); tiers held out in turn")
    result["predictability"] = predictability(trained, [fed.tiers[c] for c in clients],
                                              cfg.rank)
    out = args.out or args.run_dir / "generation_error.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
