"""bench/bn_recalibration.py: the BN statistics it recomputes for a round are those static BN
computed in that round, so its figures are what --static-bn would have given."""

import sys
from pathlib import Path

import torch
from test_simulate import quiet, tiny

from cloud.checkpoint import load_checkpoint
from cloud.simulation import Simulation
from common.calibration import is_bn_statistic

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bn_recalibration as bnr  # noqa: E402


def bn_of(state):
    return {k: v for k, v in state.items() if is_bn_statistic(k) and v.is_floating_point()}


def test_round_recalibration_reproduces_static_bn(tiny_hapt, tmp_path):
    static = tmp_path / "static"
    Simulation(tiny(tiny_hapt, strategy="depthwise", static_bn=True, rounds=2), static,
               quiet).run()
    sim = Simulation(bnr.run_config(static), static, log=quiet)
    _, state, _ = load_checkpoint(static, sim.strategy)
    again = bn_of(bnr.recalibrated(sim, state, bnr.round_batches(sim, 2)))
    assert again.keys() == bn_of(state).keys() and len(again) > 0
    for k, v in again.items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    # a different round's participants give different statistics: the check above can fail
    other = bn_of(bnr.recalibrated(sim, state, bnr.round_batches(sim, 1)))
    assert any(not torch.equal(other[k], state[k]) for k in other)


def test_diagnose_reports_every_figure(tiny_hapt, tmp_path):
    Simulation(tiny(tiny_hapt, strategy="fedavg", rounds=3), tmp_path, quiet).run()
    res = bnr.diagnose(tmp_path, rounds=2)
    assert res["round"] == 3 and list(res["per_round"]) == [2, 3]
    for figures in (res["as_run"], res["federation"], *res["per_round"].values()):
        assert set(figures) == {"exit1", "exit2", "exit3", "local_mean"}
        assert all(0 <= v <= 100 for v in figures.values())
    exit3 = [s["exit3"] for s in res["per_round"].values()]
    assert res["round_exit3"] == {"median": sum(exit3) / 2, "min": min(exit3), "max": max(exit3)}
