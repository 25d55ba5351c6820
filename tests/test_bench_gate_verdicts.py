"""bench/gate_verdicts.py on a real gated run: every deep conv is judged in each round after the
first (two or more trainers of both blocks), and its figures are those the run recorded."""

import sys
from pathlib import Path

import numpy as np
from test_simulate import quiet, tiny

from cloud.runlog import read_metrics
from cloud.simulation import Simulation
from cloud.strategies.hypemefed import transitions

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import gate_verdicts  # noqa: E402


def test_verdicts_of_a_gated_run(tiny_hapt, tmp_path):
    cfg = tiny(tiny_hapt, clients=6, participants=6, rounds=3, hypernet_gate=True,
               hypernet_residual=True, untrained="global")
    Simulation(cfg, tmp_path, quiet).run()
    rows = read_metrics(tmp_path)
    per_conv = gate_verdicts.verdicts(tmp_path)
    assert set(per_conv) == {t for _, t in transitions()}
    for conv, v in per_conv.items():
        recorded = [r["hypernet_gate"][conv] for r in rows[1:]]  # round 1: nothing trained yet
        assert v["rounds"] == 2 and v["opened"] == sum(g["open"] for g in recorded)
        assert v["median_global_err"] == np.median([g["global_err"] for g in recorded])
        assert 0 <= v["beat_global"] <= 2
    for r in rows:  # a shut gate generates nothing
        if not any(g["open"] for g in r["hypernet_gate"].values()):
            assert r["generated_tensors"] == 0
