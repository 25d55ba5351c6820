"""bench/accuracy.py's plan and summaries: what the evidence tables are computed from."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location(
    "bench_accuracy", Path(__file__).resolve().parents[1] / "bench" / "accuracy.py")
acc = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = acc  # its dataclasses look their module up
spec.loader.exec_module(acc)


def row(rnd, e3, local=0.5, e1=0.6):
    return {"round": rnd, "server_s": 0.1 * rnd, "elapsed_s": 2.0 * rnd,
            "acc": {"global": {"1": e1, "2": None, "3": e3}, "tier": {"1": e1, "2": 0.4, "3": e3},
                    "local_mean": local}}


def test_final_is_the_mean_of_the_last_three_evaluations_and_best_the_maximum():
    rows = [row(3, 0.9), {"round": 4, "server_s": 0.4, "elapsed_s": 8.0}, row(6, 0.1),
            row(9, 0.2), row(12, 0.6)]
    s = acc.run_summary(rows, 12)
    assert s["final_global"]["3"] == pytest.approx((0.1 + 0.2 + 0.6) / 3)
    assert s["best_global"]["3"] == 0.9 and s["final_global"]["2"] is None
    assert s["final_tier"]["2"] == pytest.approx(0.4)
    assert s["server_s"] == pytest.approx(0.1 * (3 + 4 + 6 + 9 + 12) / 5)
    assert s["run_s"] == pytest.approx(2.0 * (3 + 4 + 6 + 9 + 12))
    assert s["rounds_done"] == 12 and [c[0] for c in s["curve"]] == [3, 6, 9, 12]
    assert acc.rounds_to(s["curve"], 0.5) == 3
    assert s["late_global"]["3"] == pytest.approx((0.9 + 0.1 + 0.2 + 0.6) / 4)  # < SMOOTH_EVALS


def test_late_is_the_mean_of_the_last_smooth_evals_evaluations(monkeypatch):
    monkeypatch.setattr(acc, "SMOOTH_EVALS", 2)
    s = acc.run_summary([row(3, 0.9, local=0.1), row(6, 0.1, local=0.3), row(9, 0.2, local=0.5)], 9)
    assert s["late_global"]["3"] == pytest.approx(0.15)
    assert s["late_local_mean"] == pytest.approx(0.4)


def test_trailing_mean_averages_each_point_with_those_before_it():
    pts = [(5, 0.2), (10, 0.4), (15, 0.9), (20, 0.1)]
    smooth = acc.trailing_mean(pts, 3)
    assert [r for r, _ in smooth] == [5, 10, 15, 20]
    assert [v for _, v in smooth] == pytest.approx([0.2, 0.3, 0.5, (0.4 + 0.9 + 0.1) / 3])


def test_core_plan_is_the_issues_runs_and_extras_add_the_analysis_runs():
    core = {r.name for r in acc.plan()}
    assert len(core) == 5 * (3 * 3 + 4) + 7  # 5 settings, MAIN x 3 seeds + OTHERS, ablations
    assert not any("-sbn" in n or "tiered" in n or "gate" in n or "adam25" in n for n in core)
    assert {f"hapt-subject/hypemefed-{a}/s0" for a in acc.CORE_ABLATIONS} <= core
    runs = acc.plan(extras=True)
    assert [r.name for r in runs[: len(core)]] == [r.name for r in acc.plan()]  # core first
    names = {r.name for r in runs}
    assert len(names) == len(runs)  # no run planned twice
    for setting in acc.SETTINGS:
        for strategy in acc.MAIN:
            assert {f"{setting}/{strategy}/s{s}" for s in acc.SEEDS} <= names
            assert {f"{setting}/{strategy}-sbn/s{s}" for s in acc.SEEDS} <= names
        for strategy in acc.OTHERS:
            assert f"{setting}/{strategy}/s0" in names
        if setting not in acc.TIERED_SETTINGS:  # the bar's baselines with a spread over seeds
            assert {f"{setting}/{b}/s{s}" for b in acc.BAR_BASELINES for s in acc.SEEDS} <= names
            assert {f"{setting}/depthfl-sbn/s{s}" for s in acc.SEEDS} <= names
            assert {f"{setting}/fedavg-slr{v}/s{s}" for v in ("", "-sbn")
                    for s in acc.SEEDS} <= names
    assert {f"hapt-dir0.1-tiered/hypemefed-gen-all/s{s}" for s in acc.SEEDS} <= names
    assert {f"{setting}/hypemefed-release/s{s}" for setting in acc.SETTINGS
            for s in acc.SEEDS} <= names
    assert not any("release" in n for n in core)
    assert {f"{setting}/hypemefed-release-sbn/s{s}" for setting in acc.SETTINGS
            if setting not in acc.TIERED_SETTINGS for s in acc.SEEDS} <= names
    assert {f"hapt-subject/hypemefed-gate-sbn/s{s}" for s in acc.SEEDS} <= names
    rank8 = "hapt-subject/hypemefed-rank8/s"
    assert rank8 + "0" in names and rank8 + "1" not in names
    by_name = {r.name: r for r in runs}
    assert acc.run_config(by_name["cifar10-dir1.0/hypemefed-untrained-global/s2"], "cpu", "cpu",
                          None)["untrained"] == "global"
    cfg = acc.run_config(by_name["hapt-dir0.1/fedavg/s1"], "cpu", "cpu", None)
    assert cfg["rounds"] == acc.CPU_ROUNDS_AT_ALPHA_01 and cfg["seed"] == 1
    assert acc.run_config(by_name["hapt-subject/fedavg/s0"], "cpu", "cpu", None)["rounds"] == 15
    slr = acc.run_config(by_name["hapt-subject/fedavg-slr-sbn/s1"], "cpu", "cpu", None)
    assert (slr["server_lr"], slr["static_bn"], slr["strategy"]) == (1 / 3, True, "fedavg")
    full = acc.run_config(by_name["hapt-dir0.1/fedavg/s0"], "full", "cuda", None)
    assert full["rounds"] == 300 and full["local_epochs"] == 5
    tiered = acc.run_config(by_name["cifar10-dir0.1-tiered/hypemefed-gen-all/s2"], "cpu", "cpu",
                            "DIR")
    assert (tiered["tier_by"], tiered["generate"], tiered["data_dir"]) == ("label", "all", "DIR")
    # the ceiling: the same setting with every client in tier 3, so fedavg trains them all
    ceiling = acc.run_config(by_name["hapt-dir0.1/fedavg-ceiling/s2"], "cpu", "cpu", None)
    assert ceiling == {**acc.run_config(by_name["hapt-dir0.1/fedavg/s2"], "cpu", "cpu", None),
                       "tier_mix": (0.0, 0.0, 1.0)}
    assert {r.setting for r in runs if r.variant == "ceiling"} == set(acc.CEILING_SETTINGS)


def test_groups_average_over_seeds_and_targets_follow_the_settings_best_run():
    curve = [row(3, 0.2), row(6, 0.4), row(9, 0.8), row(12, 0.6)]
    per_run = {"hapt-subject/depthwise/s0": acc.run_summary(curve, 12),
               "hapt-subject/depthwise/s1": acc.run_summary([row(3, 0.3), row(6, 0.5)], 12),
               "hapt-dir0.1/fedavg/s0": acc.run_summary([row(3, 0.1)], 12)}
    for s in per_run.values():
        s["device"] = "cpu"
    result = acc.collect(per_run, "cpu")
    dw = result["groups"]["hapt-subject/depthwise"]
    final = [(0.4 + 0.8 + 0.6) / 3, (0.3 + 0.5) / 2]
    assert dw["seeds"] == 2 and not dw["complete"] and dw["rounds_done"] == 6
    assert dw["final_global"]["3"]["mean"] == pytest.approx(sum(final) / 2)
    assert dw["final_global"]["3"]["std"] == pytest.approx(abs(final[0] - final[1]) / 2)
    # target: 90 % of the best exit 3 in the setting (0.8), reached at round 9 by s0 only
    assert result["runs"]["hapt-subject/depthwise/s1"]["target"] == pytest.approx(0.72)
    assert [result["runs"][f"hapt-subject/depthwise/s{s}"]["rounds_to_target"]
            for s in (0, 1)] == [9, None]
    assert result["runs"]["hapt-dir0.1/fedavg/s0"]["rounds_to_target"] == 3  # its own setting


def test_table_has_a_late_column_only_when_asked(monkeypatch):
    monkeypatch.setattr(acc, "SMOOTH_EVALS", 2)
    curve = [row(5, 0.2), row(10, 0.4), row(15, 0.8), row(20, 0.5)]
    s = acc.run_summary(curve, 20)
    s["device"] = "cpu"
    result = acc.collect({"hapt-dir0.1/hypemefed/s0": s}, "full")
    plain, late = acc.table(result).splitlines(), acc.table(result, late=True).splitlines()
    assert "late" not in plain[0] and "| exit 3 (late) |" in late[0]
    head, cells = late[0].split("|"), late[2].split("|")
    assert len(head) == len(cells) == len(plain[2].split("|")) + 1
    col = {h.strip(): c.strip() for h, c in zip(head, cells, strict=True)}
    assert col["exit 3 (late)"] == "65.0"  # (0.8 + 0.5) / 2
    assert col["exit 3 (final)"] == "56.7" and col["exit 3 (best)"] == "80.0"


def finals(e1, e2, e3, rounds=30):
    return {"final_global": {"1": e1, "2": e2, "3": e3}, "rounds_done": rounds}


def test_bar_pairs_seeds_and_judges_fedavg_at_exit_3_and_the_rest_at_exits_1_and_2():
    runs = {"hapt-dir0.1/hypemefed/s0": finals(0.50, 0.40, 0.30),
            "hapt-dir0.1/hypemefed/s1": finals(0.60, 0.45, 0.36),
            "hapt-dir0.1/hypemefed/s2": finals(0.70, 0.70, 0.70),  # no fedavg s2: not paired
            "hapt-dir0.1/fedavg/s0": finals(0.40, 0.30, 0.20),
            "hapt-dir0.1/fedavg/s1": finals(0.40, 0.30, 0.33),
            "hapt-dir0.1/depthwise/s0": finals(0.45, 0.41, 0.10),
            "hapt-dir1.0/hypemefed/s0": finals(0.9, 0.9, 0.9),
            "hapt-dir1.0/fedavg/s0": finals(0.1, 0.1, 0.1)}
    rows = {(r["setting"], r["baseline"]): r for r in acc.bar_rows(runs)}
    assert set(rows) == {("hapt-dir0.1", "fedavg"), ("hapt-dir0.1", "depthwise"),
                         ("hapt-dir1.0", "fedavg")}
    fedavg = rows["hapt-dir0.1", "fedavg"]
    assert fedavg["seeds"] == 2
    assert fedavg["gap"]["3"] == pytest.approx((10 + 3) / 2)  # 6.5 points: >= 5
    assert (fedavg["gap_min"]["3"], fedavg["gap_max"]["3"]) == pytest.approx((3, 10))
    assert fedavg["bar"] == "met"
    # above at exit 1 (+5) but below at exit 2 (-1): tier 2's exit fails the bar
    depthwise = rows["hapt-dir0.1", "depthwise"]
    assert depthwise["gap"]["2"] == pytest.approx(-1) and depthwise["bar"] == "not met"
    assert rows["hapt-dir1.0", "fedavg"]["bar"] == ""  # the 5 points are asked at alpha 0.1
    line = acc.bar_table([fedavg]).splitlines()[2]
    assert "| +6.5 [+3.0, +10.0] | met |" in line


def test_the_full_scales_bar_also_shows_the_late_gap_at_exit_3():
    def run(e3_final, e3_late):
        return {**finals(0.5, 0.5, e3_final, 300), "late_global": {"3": e3_late}}

    runs = {"hapt-dir0.1/hypemefed/s0": run(0.20, 0.40), "hapt-dir0.1/fedavg/s0": run(0.30, 0.30),
            "hapt-dir0.1/hypemefed/s1": run(0.25, 0.50), "hapt-dir0.1/fedavg/s1": run(0.30, 0.32),
            "hapt-dir0.1/depthwise/s0": finals(0.5, 0.5, 0.5, 300)}  # recorded without late
    rows = {r["baseline"]: r for r in acc.bar_rows(runs)}
    assert rows["fedavg"]["gap"]["3"] == pytest.approx((-10 - 5) / 2)
    assert rows["fedavg"]["late_gap_3"] == pytest.approx((10 + 18) / 2)
    assert rows["fedavg"]["bar"] == "not met"  # the bar is judged on final accuracy
    assert rows["depthwise"]["late_gap_3"] is None
    plain = acc.bar_table([rows["fedavg"]]).splitlines()
    late = acc.bar_table([rows["fedavg"], rows["depthwise"]], late=True)
    head, _, line, blank = late.splitlines()
    assert "late" not in plain[0] and "| exit 3 | exit 3 (late) | bar |" in head
    assert line.endswith("| -7.5 [-10.0, -5.0] | +14.0 | not met |")
    assert blank.endswith("| - | not met |") and len(blank.split("|")) == len(head.split("|"))


def test_a_run_cut_short_is_compared_only_at_the_round_its_whole_setting_reached():
    def run(rounds, curve, planned=300):
        return {**finals(0.5, 0.5, curve[-1][1], rounds), "rounds_planned": planned,
                "device": "cuda", "curve": curve}

    # evaluations every 5 rounds; fedavg finished, hypemefed cut at round 60
    fedavg = run(300, [(r, r / 1000, 0.5) for r in range(5, 305, 5)])
    cut = run(60, [(r, 0.9 if r <= 5 else 0.3, r / 100) for r in range(5, 65, 5)])
    runs = {"hapt-dir0.1/fedavg/s0": fedavg, "hapt-dir0.1/hypemefed/s0": cut,
            "hapt-dir1.0/fedavg/s0": run(300, [(300, 0.4, 0.5)])}
    assert acc.bar_rows(runs) == []  # round 60 against round 300: no pair
    rows = {r["run"]: r for r in acc.equal_round_rows(runs)}
    assert set(rows) == {"hapt-dir0.1/fedavg/s0", "hapt-dir0.1/hypemefed/s0"}  # dir1.0 whole
    assert {r["round"] for r in rows.values()} == {60}
    # the last 10 evaluations up to round 60: rounds 15..60
    assert rows["hapt-dir0.1/fedavg/s0"]["exit3"] == pytest.approx(sum(range(15, 65, 5)) / 10000)
    assert rows["hapt-dir0.1/hypemefed/s0"]["exit3"] == pytest.approx(0.3)
    assert rows["hapt-dir0.1/hypemefed/s0"]["local_mean"] == pytest.approx(0.375)  # 15..60
    line = acc.equal_round_table([rows["hapt-dir0.1/hypemefed/s0"]]).splitlines()[2]
    assert line == "| hapt-dir0.1/hypemefed/s0 | 60 | 60 | 30.0 | 37.5 | cuda |"


def test_recorded_runs_are_the_records_complete_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(acc, "ROOT", tmp_path)
    assert acc.recorded("cpu") == set()
    (tmp_path / "bench" / "results").mkdir(parents=True)
    acc.record_path("cpu").write_text(json.dumps({"runs": {
        "a/b/s0": {"rounds_done": 30, "rounds_planned": 30},
        "a/b/s1": {"rounds_done": 12, "rounds_planned": 30}}}))
    assert acc.recorded("cpu") == {"a/b/s0"}
