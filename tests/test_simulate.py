import json

import pytest
import torch
from click.testing import CliRunner

from cloud.checkpoint import load_checkpoint
from cloud.cli import hmf
from cloud.config import RunConfig, resolve
from cloud.simulation import Simulation, initial_state
from cloud.strategies import STRATEGIES


def tiny(data_dir, **kw) -> RunConfig:
    settings = dict(model="hapt", data_dir=str(data_dir), clients=6, participants=3,
                    partition="iid", rounds=2, local_epochs=1, batch_size=32, lr=5e-3,
                    hypernet_epochs=2, rank=16, hidden=32, seed=3)
    settings.update(kw)
    return RunConfig(**settings)


def quiet(_line: str) -> None:
    pass


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_every_strategy_runs_and_logs(tiny_hapt, tmp_path, strategy):
    rows = Simulation(tiny(tiny_hapt, strategy=strategy, rounds=1), tmp_path, quiet).run()
    (row,) = rows
    for key in ("round", "strategy", "elapsed_s", "server_s", "hypernet_s", "bytes_down",
                "bytes_up", "train_loss", "acc"):
        assert key in row, key
    assert row["strategy"] == strategy and row["round"] == 1
    acc = row["acc"]
    assert set(acc["global"]) == set(acc["clients"]) == set(acc["tier"]) == {"1", "2", "3"}
    assert all(0 <= v <= 1 for v in acc["tier"].values())
    if strategy == "fedavg-small":
        assert acc["global"]["3"] is None and acc["global"]["1"] is not None
    if strategy == "fedavg":  # only the tier-3 participant trains: 1 full model each way
        assert row["bytes_up"] == row["bytes_down"] > 18_000_000
    if strategy == "hypemefed":
        assert row["generated_tensors"] == 6  # tier 1: 2 + 2 convs, tier 2: 2 convs
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["strategy"] == strategy
    assert json.loads((tmp_path / "summary.json").read_text())["rounds"] == 1


def test_resume_gives_the_weights_of_an_uninterrupted_run(tiny_hapt, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    Simulation(tiny(tiny_hapt, rounds=4), straight, quiet).run()
    Simulation(tiny(tiny_hapt, rounds=2), split, quiet).run()
    # a fresh process would start with another torch RNG state: scramble ours
    torch.manual_seed(12345)
    Simulation(tiny(tiny_hapt, rounds=4), split, quiet).run(resume=True)
    r1, s1, _ = load_checkpoint(straight)
    r2, s2, _ = load_checkpoint(split)
    assert r1 == r2 == 4
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    rows = [json.loads(x) for x in (split / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3, 4]


def test_resume_refuses_other_settings(tiny_hapt, tmp_path):
    Simulation(tiny(tiny_hapt, rounds=1), tmp_path, quiet).run()
    with pytest.raises(ValueError, match="lr"):
        Simulation(tiny(tiny_hapt, rounds=2, lr=0.1), tmp_path, quiet).run(resume=True)


def test_cli_simulate_config_file_and_plot(tiny_hapt, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'model = "hapt"\ndata-dir = "{tiny_hapt}"\nclients = 6\nparticipants = 3\n'
                   'partition = "iid"\nlocal_epochs = 1\nbatch_size = 32\nrank = 8\n'
                   'hidden = 16\nhypernet_epochs = 1\nrounds = 5\n')
    out = tmp_path / "run"
    res = CliRunner().invoke(hmf, ["simulate", "--config", str(cfg), "--rounds", "2",
                                   "--tier-mix", "0.34,0.33,0.33", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "round   2/2" in res.output and "global[1:" in res.output
    config = json.loads((out / "config.json").read_text())
    assert config["rounds"] == 2 and config["clients"] == 6  # flag beats file beats default
    res = CliRunner().invoke(hmf, ["plot", str(out), str(out), "--out", str(tmp_path / "a.png")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"


def test_server_lr_moves_the_global_model_that_fraction_of_the_way_to_the_aggregate(
        tiny_hapt, tmp_path):
    """One round from the same start with the same training: lr 0.25's global model is the
    start plus a quarter of the way to lr 1's (the aggregate), tensor by tensor."""
    full = tiny(tiny_hapt, strategy="depthwise", rounds=1)
    quarter = tiny(tiny_hapt, strategy="depthwise", rounds=1, server_lr=0.25)
    Simulation(full, tmp_path / "full", quiet).run()
    Simulation(quarter, tmp_path / "quarter", quiet).run()
    start, aggregate = initial_state(full), load_checkpoint(tmp_path / "full")[1]
    stepped = load_checkpoint(tmp_path / "quarter")[1]
    moved = 0
    for k, a in aggregate.items():
        if a.is_floating_point():
            want = start[k] + 0.25 * (a - start[k])
            assert torch.allclose(stepped[k], want, atol=1e-6), k
            moved += not torch.equal(a, start[k])
        else:  # BatchNorm's batch counts are counts, not a step
            assert torch.equal(stepped[k], a), k
    assert moved > 10  # the round trained something, so the check compared real steps


def test_presets_and_bad_settings():
    assert resolve("svhn").batch_size == 128 and resolve("unimib").partition == "subject"
    assert resolve("stl10", overrides={"rounds": 3}).rounds == 3
    with pytest.raises(ValueError, match="tier_mix"):
        RunConfig(tier_mix=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="server_lr must be a finite number above 0"):
        RunConfig(server_lr=0)
    res = CliRunner().invoke(hmf, ["simulate", "--tier-mix", "a,b"])
    assert res.exit_code != 0 and "tier-mix" in res.output
    res = CliRunner().invoke(hmf, ["simulate", "--model", "svhn", "--data-dir", "/nonexistent"])
    assert res.exit_code == 1 and "train_32x32.mat" in res.output
