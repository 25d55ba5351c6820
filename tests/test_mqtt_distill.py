"""Server-side distillation in a real fleet (cloud/distillation.py): the cloud runs every
accepted update through its submodel on the proxy data as it arrives, sums the teacher in the
round's task order, and ends with ``hmf simulate``'s weights (to 1e-6) and distillation figures,
against a real mosquitto."""

from __future__ import annotations

from test_mqtt_fleet import config, fleet_run, max_diff, simulate  # noqa: F401 (fixture)

from cloud.checkpoint import load_checkpoint
from cloud.runlog import read_metrics

DISTILL = dict(generate="distill", untrained="global", distill_steps=5, proxy_size=64)


def test_distilling_fleet_equals_hmf_simulate(tiny_hapt, tmp_path, fleet_run):  # noqa: F811
    cfg = config(tiny_hapt, clients=3, participants=3, rounds=1, **DISTILL)
    reference = simulate(cfg, tmp_path / "sim")
    run = fleet_run(cfg)
    run.all_devices_to_the_end(run.start_cloud(
        "--min-updates", "3", "--round-timeout", "120", "--generate", "distill",
        "--untrained", "global", "--distill-steps", "5", "--proxy-size", "64"))
    _, state, _ = load_checkpoint(run.out)
    assert max_diff(state, reference) <= 1e-6
    (row,), (sim_row,) = read_metrics(run.out), read_metrics(tmp_path / "sim")
    assert row["generated_tensors"] == sim_row["generated_tensors"] == 0
    assert abs(row["distill_kl"][0] - sim_row["distill_kl"][0]) < 1e-6
    assert abs(row["distill_kl"][1] - sim_row["distill_kl"][1]) < 1e-6
