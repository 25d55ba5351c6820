"""The defences of cloud/robust.py and the robust rules of cloud/aggregation.py: clipping as the
docs state it, one implementation for the simulator's whole round and the cloud's stream, robust
rules checked against numpy element by element, and the safety net on a real simulated run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cloud.aggregation import RobustAccumulator, robust_median, trimmed_mean
from cloud.checkpoint import load_checkpoint
from cloud.config import RunConfig
from cloud.robust import (
    MIN_HISTORY,
    InfluenceBound,
    RoundGuard,
    ServerGuard,
    collapsed,
    deviations,
    verdict,
)
from cloud.runlog import read_metrics
from cloud.simulation import Simulation
from cloud.strategies import ClientTask, ClientUpdate

GLOBAL = {"w": torch.zeros(4, 5), "bn.running_var": torch.ones(5), "n": torch.tensor(3)}


def _update(client: int, scale: float, seed: int) -> ClientUpdate:
    gen = torch.Generator().manual_seed(seed)
    state = {"w": scale * torch.randn(4, 5, generator=gen),
             "bn.running_var": torch.ones(5) + scale * torch.rand(5, generator=gen),
             "n": torch.tensor(5)}
    return ClientUpdate(ClientTask(client, 1, 1), 10, state)


def _rms(state, name):
    return deviations(GLOBAL, {name: state[name]})[name]


def test_clipping_pulls_an_outlier_onto_the_bound_and_leaves_the_rest_bit_for_bit():
    bound = InfluenceBound(factor=3.0, window=5)
    honest = [_update(i, 0.1, i) for i in range(4)]
    bound.record({"w": [_rms(u.state, "w") for u in honest],
                  "bn.running_var": [_rms(u.state, "bn.running_var") for u in honest]})
    guard = RoundGuard(bound, GLOBAL)
    attacker = _update(9, -1e6, 9)  # sign-flipped and huge: variances far below 0
    out = guard.apply([honest[0], attacker])
    assert out[0] is honest[0]  # under the bound: the very same update
    fixed = bound.bounds()
    for name in ("w", "bn.running_var"):
        assert math.isclose(_rms(out[1].state, name), fixed[name], rel_tol=1e-6)
    assert bool((out[1].state["bn.running_var"] >= 0).all())  # a convex combination
    assert torch.equal(out[1].state["n"], attacker.state["n"])  # integers are not clipped
    assert guard.metrics()["updates"] == 1 and guard.metrics()["max_ratio"] > 1e5


def test_the_whole_round_and_the_stream_clip_identically():
    """Round 1 has no history: every update waits for the round's own median, in the stream
    as in the simulator's whole-round call; with history they are clipped on arrival."""
    for history in ([], [{"w": [0.05] * MIN_HISTORY, "bn.running_var": [0.05] * MIN_HISTORY}]):
        updates = [_update(i, s, i) for i, s in enumerate((0.1, 0.2, 50.0, 0.15))]
        whole = RoundGuard(InfluenceBound(3.0, 5, history=__import__("collections").deque(
            history)), GLOBAL).apply(updates)
        stream_guard = RoundGuard(InfluenceBound(3.0, 5, history=__import__(
            "collections").deque(history)), GLOBAL)
        arrived = [stream_guard.arrive(u) for u in updates]
        assert all(a is None for a in arrived) == (not history)
        streamed = [a for a in arrived if a is not None] + stream_guard.release()
        for a, b in zip(whole, streamed, strict=True):
            assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
        assert _rms(whole[2].state, "w") < 1.0  # the 50x update was pulled in


def test_bound_history_is_a_window_of_rounds_and_survives_json():
    bound = InfluenceBound(2.0, window=2)
    for r in range(4):
        bound.record({"w": [float(r)] * 3})
    assert bound.bounds() == {"w": 2.0 * 2.0}  # rounds 2 and 3 only: lower median 2
    again = InfluenceBound(2.0, window=2)
    again.load_json(bound.to_json())
    assert again.bounds() == bound.bounds()
    assert InfluenceBound(2.0).bounds({"w": [1.0, 1e30]}) == {"w": 2.0}  # lower median


def _numpy_rule(contribs, shape, rule, trim):
    out = np.full(shape, np.nan)
    for idx in np.ndindex(*shape):
        vals = sorted(c[idx] for c in contribs
                      if all(i < n for i, n in zip(idx, c.shape, strict=True)))
        if not vals:
            continue
        if rule == "median":
            out[idx] = np.median(vals)
        else:
            k = int(math.floor(len(vals) * trim))
            out[idx] = np.mean(vals[k:len(vals) - k])
    return out


@pytest.mark.parametrize("rule,trim", [("median", 0.0), ("trimmed-mean", 0.2),
                                       ("trimmed-mean", 0.34)])
def test_robust_rules_match_numpy_per_element_over_leading_slices(rule, trim):
    rng = np.random.default_rng(0)
    ref = torch.full((4, 6), 7.0)
    contribs = [rng.normal(size=shape) for shape in ((4, 6), (2, 3), (4, 6), (3, 6), (1, 1))]
    acc = RobustAccumulator({"t": ref}, rule, trim)
    for c in contribs:
        acc.add({"t": torch.from_numpy(c).float()})
    got = acc.result()["t"].double().numpy()
    want = _numpy_rule([c.astype(np.float32).astype(np.float64) for c in contribs], (4, 6),
                       rule, trim)
    assert np.allclose(got, want, atol=1e-6)
    assert acc.contributors("t") == 5 and acc.result().keys() == {"t"}


def test_robust_rules_ignore_a_huge_minority_and_keep_uncovered_values():
    stack = torch.tensor([[1.0, 2.0], [1.2, float("nan")], [1e30, 2.2]], dtype=torch.float64)
    assert torch.allclose(robust_median(stack), torch.tensor([1.2, 2.1], dtype=torch.float64))
    assert torch.allclose(trimmed_mean(stack, 0.34), torch.tensor([1.2, 2.1],
                                                                  dtype=torch.float64))
    acc = RobustAccumulator({"n": torch.tensor([5, 5]), "x": torch.ones(2)}, "median")
    for v in (3, 4, 100):
        acc.add({"n": torch.tensor([v])})
    result = acc.result()
    assert result["n"].tolist() == [4, 5] and result["n"].dtype == torch.int64
    assert torch.equal(result["x"], torch.ones(2))


def test_verdict_refuses_non_finite_and_collapsed_rounds_only():
    assert verdict({"w": torch.tensor([1.0, math.inf])}, None, None).startswith("non-finite")
    last, chance = {"1": 0.8, "2": 0.6, "3": None}, 1 / 6
    assert verdict({"w": torch.ones(1)}, {"1": 0.17, "2": 0.17, "3": None}, last, chance)
    assert verdict({"w": torch.ones(1)}, {"1": 0.75, "2": 0.2, "3": None}, last, chance) is None
    assert verdict({"w": torch.ones(1)}, {"1": 0.25, "2": 0.2, "3": None}, last, chance)
    # a weak model (0.28) that falls to one class's share (1/6) has collapsed too
    assert collapsed({"1": 1 / 6}, {"1": 0.28}, chance)
    assert not collapsed({"1": 0.32}, {"1": 0.51}, chance)  # an honest dip on small data
    assert not collapsed({"1": 0.1}, None, chance)  # nothing to compare with in round 1
    assert not collapsed({"1": 0.1}, {"1": 0.15}, chance)  # never above chance
    # exits at chance (HypeMeFed's deep ones early on) are not judged; exit 1 collapsed
    assert collapsed({"1": 0.19, "2": 0.197, "3": 0.194}, {"1": 0.378, "2": 0.194, "3": 0.19},
                     chance)


class _Poisoned(Simulation):
    """Client ``victim``'s update multiplied by 1e30 in round 2."""

    victim = 0

    def train_client(self, global_state, task, server_round):
        update = super().train_client(global_state, task, server_round)
        if task.client == self.victim and server_round == 2:
            update.state = {k: v * 1e30 if v.is_floating_point() else v
                            for k, v in update.state.items()}
        return update


def test_a_collapsed_round_is_not_committed_and_the_run_goes_on(tiny_hapt, tmp_path):
    """Undefended (no clipping), the 1e30 update collapses round 2's evaluation: the round is
    not committed, the round-1 model stays (checkpoint included) and round 3 trains on it."""
    cfg = RunConfig(model="hapt", data_dir=str(tiny_hapt), strategy="fedavg-small",
                    partition="iid", clients=3, participants=3, rounds=3, local_epochs=2,
                    batch_size=16, lr=5e-3, seed=0, clip_factor=0.0)
    sim = _Poisoned(cfg, tmp_path, lambda _: None)
    rows = sim.run()
    assert [r["committed"] for r in rows] == [True, False, True], [r.get("note") for r in rows]
    assert rows[1]["note"].startswith("not committed: evaluation collapsed")
    assert rows[1]["acc"]["global"] == rows[0]["acc"]["global"]  # the kept model's
    assert rows[1]["refused_acc"]["1"] < 0.5 * rows[0]["acc"]["global"]["1"]
    assert read_metrics(tmp_path)[1]["committed"] is False
    _, _, meta = load_checkpoint(tmp_path)
    saved = ServerGuard(0.0, 5)
    saved.load_json(meta["guard"])
    assert saved.last_acc == rows[2]["acc"]["global"]
