"""``hmf simulate``: the whole algorithm in one process, the reference for the real fleet."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cloud.aggregation import server_step
from cloud.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from cloud.config import RunConfig
from cloud.distillation import Distiller
from cloud.evaluation import evaluate
from cloud.federation import Federation, seed_of
from cloud.robust import ServerGuard, non_finite, screen, server_snapshot
from cloud.runlog import RunLog
from cloud.strategies import ClientTask, ClientUpdate, Strategy, build_strategy
from common.calibration import batches
from common.data import load_dataset
from common.models import SPECS, State, build_model
from common.training import TrainConfig, train_task

PROBE = 512  # evaluation inputs the distillation teacher is scored on (a diagnostic)


def state_bytes(state: State) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def strategy_for(cfg: RunConfig) -> Strategy:
    extra = {} if cfg.static_bn is None else {"static_bn": cfg.static_bn}
    return build_strategy(cfg.strategy, cfg.model, weighting=cfg.weighting, hypernet=cfg.hypernet,
                          rank=cfg.rank, hidden=cfg.hidden, epochs=cfg.hypernet_epochs,
                          lr=cfg.hypernet_lr, ridge=cfg.hypernet_ridge,
                          sweeps=cfg.hypernet_sweeps, reset=cfg.hypernet_reset,
                          gate=cfg.hypernet_gate, residual=cfg.hypernet_residual,
                          generate=cfg.generate, untrained=cfg.untrained, seed=cfg.seed,
                          server_lr=cfg.server_lr, aggregation=cfg.aggregation, trim=cfg.trim,
                          local_distill=cfg.local_distill,
                          device=cfg.device, **extra)


def initial_state(cfg: RunConfig) -> State:
    torch.manual_seed(seed_of(cfg.seed, 0))
    return {k: v.clone() for k, v in build_model(cfg.model).state_dict().items()}


class Simulation:
    def __init__(self, cfg: RunConfig, out_dir: str | Path,
                 log: Callable[[str], None] = print) -> None:
        self.cfg, self.out, self.log = cfg, Path(out_dir), log
        self.distiller = Distiller.for_run(cfg)  # first: a missing proxy fails before the data
        data = load_dataset(cfg.model, cfg.data_dir)
        self.x, self.y = torch.from_numpy(data.x), torch.from_numpy(data.y)
        self.test = None
        if data.test_x is not None:
            self.test = (torch.from_numpy(data.test_x), torch.from_numpy(data.test_y))
        self.fed = Federation.build(data, cfg.clients, cfg.participants, cfg.tier_mix,
                                    cfg.partition, cfg.alpha, cfg.seed, cfg.min_size, cfg.tier_by)
        self.strategy = strategy_for(cfg)
        self.train_cfg = self.strategy.train_config(
            TrainConfig(cfg.local_epochs, cfg.batch_size, cfg.lr))
        self.device = torch.device(cfg.device)
        self.x_dev, self.y_dev = self.x.to(self.device), self.y.to(self.device)
        self.guard = ServerGuard(cfg.clip_factor, cfg.clip_window,
                                 SPECS[cfg.model].num_classes)

    def train_client(self, global_state: State, task: ClientTask, server_round: int
                     ) -> ClientUpdate:
        module, state = self.strategy.submodel(global_state, task)
        idx = torch.from_numpy(self.fed.train[task.client])
        trained, loss = train_task(module.to(self.device), state, self.x_dev[idx],
                                   self.y_dev[idx], self.train_cfg,
                                   seed_of(self.cfg.seed, 5, server_round, task.client))
        return ClientUpdate(task, len(idx), trained, loss)

    def tasks(self, server_round: int) -> list[ClientTask]:
        """What this round's participants train."""
        return self.strategy.tasks(self.fed.participants(self.cfg.seed, server_round))

    def participant_batches(self, tasks: list[ClientTask]) -> Iterator[torch.Tensor]:
        """Each participant's train data in order, in consecutive batches: what a fleet's device
        runs through the model for static BN (``common.calibration.bn_statistics``)."""
        for task in tasks:
            yield from batches(self.x[torch.from_numpy(self.fed.train[task.client])])

    def round(self, global_state: State, server_round: int) -> tuple[State, dict[str, Any]]:
        start = time.perf_counter()
        tasks = self.tasks(server_round)
        updates, down = [], 0
        for task in tasks:
            down += state_bytes(self.strategy.submodel(global_state, task)[1])
            updates.append(self.train_client(global_state, task, server_round))
        server_start = time.perf_counter()
        trained = len(updates)
        guard, (updates, rejected) = self.guard.round(global_state), screened(updates)
        updates = guard.apply(updates)
        evaluated = server_round % self.cfg.eval_every == 0 or server_round == self.cfg.rounds
        snapshot = server_snapshot(self.strategy)
        new_state, server_metrics = self.strategy.aggregate(global_state, updates, server_round)
        new_state = server_step(global_state, new_state, self.strategy.server_lr)
        if self.distiller is not None and not non_finite(new_state):
            new_state, distilled = self.distill(new_state, updates, server_round, evaluated)
            server_metrics.update(distilled)
        if not non_finite(new_state):  # never calibrate (or commit) a broken model
            new_state = self.strategy.calibrate(new_state, self.participant_batches(tasks))
        server_s = time.perf_counter() - server_start
        losses = [u.train_loss for u in updates]
        row: dict[str, Any] = {
            "round": server_round, "strategy": self.strategy.name,
            "participants": {str(t): sum(u.task.tier == t for u in updates) for t in (1, 2, 3)},
            "server_s": server_s, "hypernet_s": server_metrics.pop("hypernet_s", 0.0),
            "bytes_down": down, "bytes_up": sum(state_bytes(u.state) for u in updates),
            "train_loss": float(np.mean(losses)) if losses else None,
            "rejected": dict(rejected), "clipped": guard.metrics(),
            **server_metrics,
        }
        if not trained:
            row["note"] = "no participant could train this strategy's model: global unchanged"
        acc = self._evaluate(new_state) if evaluated and not non_finite(new_state) else None
        kept, why = self.guard.settle(guard, self.strategy, snapshot, global_state, new_state,
                                      acc["global"] if acc else None)
        row["committed"] = why is None
        if why is not None:
            row["note"] = f"not committed: {why}; the previous global model stays"
            row["refused_acc"] = acc["global"] if acc else None
            acc = self._evaluate(kept) if evaluated else None
        if acc is not None:
            row["acc"] = acc
        row["elapsed_s"] = time.perf_counter() - start
        return kept, row

    def distill(self, state: State, updates: list[ClientUpdate], server_round: int,
                evaluated: bool) -> tuple[State, dict[str, Any]]:
        """The server's distillation step; on evaluated rounds the teacher is also scored on
        the evaluation data (what the weak devices' exits know)."""
        assert self.distiller is not None
        probe = self._evaluation_set() if evaluated else None
        ensemble = self.distiller.ensemble([u.task.client for u in updates], probe)
        for u in updates:
            ensemble.add(u, self.strategy.weight(u))
        return self.distiller.apply(state, ensemble, server_round)

    def _evaluation_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A seeded sample of ``PROBE`` inputs of what ``evaluate`` scores global accuracy on:
        the official test split, or the union of the clients' local test splits."""
        if self.test is not None:
            x, y = self.test
        else:
            local = torch.from_numpy(np.concatenate(self.fed.test))
            x, y = self.x[local], self.y[local]
        rng = np.random.default_rng(seed_of(self.cfg.seed, 8))
        keep = torch.from_numpy(np.sort(rng.permutation(len(y))[:PROBE]))
        return x[keep], y[keep]

    def _evaluate(self, state: State) -> dict[str, Any]:
        return evaluate(self.cfg.model, state, self.x, self.y, self.fed,
                        self.strategy.evaluated_exits(), self.test, str(self.device))

    def run(self, resume: bool = False) -> list[dict[str, Any]]:
        first, state = 1, initial_state(self.cfg)
        if resume and (self.out / CHECKPOINT).exists():
            done, state, meta = load_checkpoint(self.out, self.strategy)
            _check_same_run(meta["config"], self.cfg.to_json())
            self.guard.load_json(meta.get("guard"))
            first = done + 1
            self.log(f"resuming {self.out} after round {done}")
        elif resume:
            self.log(f"no checkpoint in {self.out}: starting from round 1")
        runlog = RunLog(self.out, self.cfg.to_json(), resume_round=first - 1)
        for r in range(first, self.cfg.rounds + 1):
            state, row = self.round(state, r)
            save_checkpoint(self.out, r, state, self.strategy, self.cfg.to_json(),
                            self.guard.to_json())
            runlog.append(row)
            self.log(format_round(row, self.cfg.rounds))
        return runlog.rows


def screened(updates: list[ClientUpdate]) -> tuple[list[ClientUpdate], Counter[str]]:
    """The updates that can be aggregated at all, and the others counted by reason (the
    fleet's decoder refuses the same ones as input)."""
    kept, rejected = [], Counter()
    for u in updates:
        reason = screen(u.state)
        if reason is None:
            kept.append(u)
        else:
            rejected[reason] += 1
    return kept, rejected


def _check_same_run(saved: dict[str, Any], now: dict[str, Any]) -> None:
    """Resuming with other settings would silently mix two experiments: refuse, except for
    settings that do not change what a round computes."""
    free = {"rounds", "device", "eval_every", "data_dir"}
    defaults = RunConfig().to_json()  # settings added since the checkpoint was written
    diff = {k: (saved.get(k, defaults[k]), v) for k, v in now.items()
            if k not in free and saved.get(k, defaults[k]) != v}
    if diff:
        lines = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"--resume with settings that differ from the checkpoint ({lines}); "
                         "use the original settings or a new --out")


def format_round(row: dict[str, Any], rounds: int) -> str:
    parts = [f"round {row['round']:>3}/{rounds}", f"{row['elapsed_s']:6.1f}s",
             f"server {row['server_s']:5.2f}s"]
    if row.get("train_loss") is not None:
        parts.append(f"loss {row['train_loss']:.3f}")
    if "acc" in row:
        acc = row["acc"]
        fmt = lambda d: " ".join(f"{k}:{v:.3f}" if v is not None else f"{k}:-"  # noqa: E731
                                 for k, v in d.items())
        parts += [f"global[{fmt(acc['global'])}]", f"tier[{fmt(acc['tier'])}]"]
    if "note" in row:
        parts.append(f"({row['note']})")
    return "  ".join(parts)
