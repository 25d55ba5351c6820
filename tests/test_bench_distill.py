"""bench/distill.py's verdict: paired gaps over fresh seeds and the issue's bar."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))  # distill.py imports accuracy.py as a sibling
spec = importlib.util.spec_from_file_location("bench_distill", BENCH / "distill.py")
distill = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = distill
spec.loader.exec_module(distill)

OURS = f"hypemefed-{distill.FROZEN[0]}"
REF = f"hypemefed-{distill.REFERENCE[1]}"


def summary(e1, e2, e3, done=15):
    return {"rounds_done": done, "rounds_planned": 15,
            "final_global": {"1": e1, "2": e2, "3": e3}}


def runs_with(gains: dict[str, tuple[float, float, float]], seeds=(3, 4, 5)):
    """Per setting, ours = reference + gains (points) at every seed; the reference differs
    by seed, so only pairing gives the gain back exactly."""
    runs = {}
    for setting, (g1, g2, g3) in gains.items():
        for s in seeds:
            base = 0.3 + 0.1 * s
            runs[f"{setting}/{REF}/s{s}"] = summary(base, base, base)
            runs[f"{setting}/{OURS}/s{s}"] = summary(base + g1 / 100, base + g2 / 100,
                                                      base + g3 / 100)
    return runs


def test_gaps_are_paired_by_seed_and_skip_unfinished_runs():
    runs = runs_with({"hapt-subject": (0.0, 3.0, 5.0)})
    runs[f"hapt-subject/{OURS}/s5"]["rounds_done"] = 7  # cut short: not compared
    g = distill.gaps(runs, "hapt-subject", OURS, REF, distill.FRESH_SEEDS)
    assert g["3"]["mean"] == pytest.approx(5.0) and g["3"]["std"] == pytest.approx(0.0)
    assert g["3"]["n"] == 2 and g["2"]["mean"] == pytest.approx(3.0)


def test_bar_needs_two_points_at_exits_2_and_3_and_no_loss_at_exit_1_in_three_settings():
    met = {"hapt-subject": (0.0, 2.5, 4.0), "hapt-dir1.0": (0.1, 2.0, 2.0),
           "hapt-dir0.1": (0.5, 3.0, 9.0)}
    _, rows = distill.fresh_table(runs_with(met))
    assert distill.bar(rows).split(":")[1].strip() == "met"
    short = dict(met, **{"hapt-dir0.1": (-0.5, 3.0, 9.0)})  # loses at exit 1
    _, rows = distill.fresh_table(runs_with(short))
    assert "not met: 2 of 3" in distill.bar(rows)
    short = dict(met, **{"hapt-dir1.0": (0.1, 1.9, 20.0)})  # exit 2 short of 2 points
    _, rows = distill.fresh_table(runs_with(short))
    assert "not met: 2 of 3" in distill.bar(rows)
