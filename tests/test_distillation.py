"""Server-side ensemble distillation (cloud/distillation.py): the proxy data, the teacher, the
fine-tuning step, and the step inside a simulated round."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cloud.checkpoint import load_checkpoint
from cloud.config import RunConfig
from cloud.distillation import (
    SHIPPED_PROXY,
    DistillConfig,
    Distiller,
    TeacherEnsemble,
    distill,
    load_proxy,
)
from cloud.runlog import read_metrics
from cloud.simulation import Simulation
from cloud.strategies import ClientTask, ClientUpdate
from common.data import SHIPPED_HAPT
from common.models import build_model, tier_state

MODEL = "mnist"  # the smallest model


def trained_like(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.3 * torch.randn(v.shape, generator=g)
            if v.is_floating_point() and "running_var" not in k else v for k, v in state.items()}


def participant(client: int, tier: int, seed: int) -> ClientUpdate:
    torch.manual_seed(100 + seed)
    full = build_model(MODEL).state_dict()
    return ClientUpdate(ClientTask(client, tier, tier), 10, trained_like(tier_state(full, tier),
                                                                         seed))


def reference_probs(update: ClientUpdate, x: torch.Tensor, t: float) -> torch.Tensor:
    """Independently: the submodel, its state, its last exit, softmax at temperature t."""
    m = build_model(MODEL, depth=update.task.depth)
    m.load_state_dict(update.state)
    with torch.no_grad():
        return F.softmax(m.eval()(x)[-1] / t, dim=1)


# ---- proxy data -------------------------------------------------------------------------------
def test_shipped_hapt_proxy_shares_no_sample_with_any_dataset_window():
    """Every proxy window lies outside every labelled window of its recording (the windows are
    located by experiment and start row, as the dataset's own are), and none equals one."""
    with np.load(SHIPPED_PROXY["hapt"]) as p, np.load(SHIPPED_HAPT /
                                                      "hapt_windows_acc151.npz") as d:
        px, pexp, pstart = p["x"], p["exp_id"], p["start"].astype(np.int64)
        dexp, dstart = d["exp_id"], d["start"].astype(np.int64)
        dx = d["x"]
    assert px.shape[1:] == (3, 151) and len(px) > 1000
    for e in np.unique(pexp):
        a, b = pstart[pexp == e], dstart[dexp == e]
        # intervals [a, a+151) and [b, b+151) overlap iff |a - b| < 151
        assert np.abs(a[:, None] - b[None, :]).min() >= 151 if len(b) else True
    dset = {w.tobytes() for w in dx[:, :, :8]}
    assert not any(w.tobytes() in dset for w in px[:, :, :8])
    # same sensor, same units: gravity's magnitude about 1 g on average
    assert 0.8 < float(np.linalg.norm(px.mean(2), axis=1).mean()) < 1.2


def test_load_proxy_subset_is_seeded_and_images_are_normalised(tmp_path):
    full = load_proxy("hapt")
    a, b, c = (load_proxy("hapt", size=100, seed=s) for s in (1, 1, 2))
    assert a.shape == (100, 3, 151) and torch.equal(a, b) and not torch.equal(a, c)
    rows = {r.numpy().tobytes() for r in full}
    assert all(r.numpy().tobytes() in rows for r in a)
    pixels = np.zeros((2, 1, 28, 28), np.uint8)
    pixels[1] = 255
    np.savez(tmp_path / "p.npz", x=pixels)
    x = load_proxy("mnist", tmp_path / "p.npz")
    assert x.dtype == torch.float32 and float(x[0].max()) == -1.0 and float(x[1].min()) == 1.0


@pytest.mark.parametrize("content,message", [
    (dict(y=np.zeros(3)), "array 'x'"),
    (dict(x=np.zeros((3, 3, 150), np.float32)), "(N, 3, 151)"),
    (dict(x=np.full((3, 3, 151), np.nan, np.float32)), "NaN"),
])
def test_bad_proxy_files_are_refused_with_what_is_wrong(tmp_path, content, message):
    np.savez(tmp_path / "p.npz", **content)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_proxy("hapt", tmp_path / "p.npz")


def test_a_model_without_shipped_proxy_asks_for_one():
    with pytest.raises(ValueError, match="--proxy"):
        load_proxy("cifar10")


# ---- the teacher ------------------------------------------------------------------------------
def test_teacher_is_the_weighted_mean_of_each_participants_deepest_exit_in_any_order():
    x = torch.randn(40, 1, 28, 28)
    updates = [participant(c, t, c) for c, t in [(0, 1), (1, 2), (2, 3), (3, 3)]]
    weights = [1.0, 2.0, 3.0, 4.0]
    expected = sum(w * reference_probs(u, x, 2.0) for w, u in zip(weights, updates,
                                                                 strict=True)) / 10.0
    order = [u.task.client for u in updates]
    a, b = (TeacherEnsemble(MODEL, x, 2.0, order=order) for _ in range(2))
    for u, w in zip(updates, weights, strict=True):
        a.add(u, w)
    for u, w in reversed(list(zip(updates, weights, strict=True))):
        b.add(u, w)
    # the reference runs in the default memory layout, the ensemble in channels-last
    torch.testing.assert_close(a.teacher(), expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(a.teacher(), b.teacher())  # arrival order changes nothing
    assert TeacherEnsemble(MODEL, x, 1.0).teacher() is None


def test_teacher_probe_accuracy_per_tier_and_overall():
    x = torch.randn(60, 1, 28, 28)
    updates = [participant(0, 1, 0), participant(1, 3, 1)]
    labels = reference_probs(updates[1], x, 1.0).argmax(1)  # tier 3's own answers
    ens = TeacherEnsemble(MODEL, x[:5], 1.0, probe=(x, labels))
    for u in updates:
        ens.add(u, 1.0)
    got = ens.probe_accuracy()
    assert got["3"] == 1.0
    tier1 = float((reference_probs(updates[0], x, 1.0).argmax(1) == labels).float().mean())
    assert got["1"] == pytest.approx(tier1)
    both = reference_probs(updates[0], x, 1.0) + reference_probs(updates[1], x, 1.0)
    assert got["all"] == pytest.approx(float((both.argmax(1) == labels).float().mean()))


# ---- the fine-tuning step ---------------------------------------------------------------------
def kl_to(state, x, teacher, exits):
    m = build_model(MODEL)
    m.load_state_dict(state)
    with torch.no_grad():
        logits = m.train()(x)  # batch statistics, as distillation runs the trained blocks
    return [float(F.kl_div(F.log_softmax(logits[e - 1], 1), teacher, reduction="batchmean"))
            for e in exits]


@pytest.mark.parametrize("first_block", [1, 2, 3])
def test_distill_moves_only_the_blocks_it_tunes_and_brings_them_to_the_teacher(first_block):
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in build_model(MODEL).state_dict().items()}
    x = torch.randn(64, 1, 28, 28)
    teacher = F.softmax(3 * torch.randn(64, 10), dim=1)
    cfg = DistillConfig(steps=60, lr=3e-3, batch=64, temperature=1.0, first_block=first_block)
    out, metrics = distill(MODEL, state, x, teacher, cfg, seed=1)
    tuned = ([f"blocks.{b}." for b in range(first_block - 1, 3)]
             + [f"heads.{b}." for b in range(first_block - 1, 3)])
    for k, v in state.items():
        is_param = not any(s in k for s in ("running_", "num_batches"))
        if is_param and any(k.startswith(p) for p in tuned):
            assert not torch.equal(out[k], v), f"{k} should have been tuned"
        else:
            assert torch.equal(out[k], v), f"{k} should be untouched"
    exits = range(first_block, 4)
    before, after = kl_to(state, x, teacher, exits), kl_to(out, x, teacher, exits)
    assert all(a < 0.8 * b for a, b in zip(after, before, strict=True)), (before, after)
    assert metrics["distill_kl"][1] < metrics["distill_kl"][0]


def test_distill_is_a_pure_function_of_its_seed():
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in build_model(MODEL).state_dict().items()}
    x, teacher = torch.randn(32, 1, 28, 28), F.softmax(torch.randn(32, 10), dim=1)
    cfg = DistillConfig(steps=5, batch=8)
    a, b, c = (distill(MODEL, state, x, teacher, cfg, seed=s)[0] for s in (4, 4, 5))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("bad", [dict(steps=0), dict(lr=0.0), dict(temperature=-1.0),
                                 dict(first_block=4), dict(batch=0)])
def test_bad_distillation_settings_are_refused(bad):
    with pytest.raises(ValueError):
        DistillConfig(**bad)


# ---- inside a simulated round -----------------------------------------------------------------
SMALL = dict(model="hapt", partition="iid", clients=6, participants=3, rounds=1,
             local_epochs=1, batch_size=32, untrained="global", static_bn=True, seed=2,
             hypernet_gate=True)


def test_a_distilled_round_keeps_exit_1_and_reports_what_the_teacher_knew(tmp_path):
    """--generate distill: the aggregate is the stale average (nothing generated); the stem,
    block 1 and head 1 come out exactly as without distillation (static BN recomputes block 1's
    statistics from the same weights), so exit 1's accuracy is identical, while the deep blocks
    move; the row says what the teacher ensemble knew, per tier."""
    plain = Simulation(RunConfig(**SMALL), tmp_path / "plain", log=lambda _: None)
    distilled = Simulation(RunConfig(**SMALL, generate="distill", distill_steps=5,
                                     proxy_size=64), tmp_path / "distill", log=lambda _: None)
    plain.run()
    distilled.run()
    _, sa, _ = load_checkpoint(tmp_path / "plain")
    _, sb, _ = load_checkpoint(tmp_path / "distill")
    shallow = [k for k in sa if k.startswith(("stem.", "blocks.0.", "heads.0."))]
    deep = [k for k in sa if k.startswith(("blocks.2.", "heads.2.")) and "weight" in k]
    assert all(torch.equal(sa[k], sb[k]) for k in shallow)
    assert all(not torch.equal(sa[k], sb[k]) for k in deep)
    (ra,), (rb,) = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "distill")
    assert rb["acc"]["global"]["1"] == ra["acc"]["global"]["1"]
    assert set(rb["teacher_acc"]) == {"1", "2", "3", "all"}
    assert all(0.0 <= v <= 1.0 for v in rb["teacher_acc"].values())
    assert rb["distill_kl"][1] < rb["distill_kl"][0] and rb["distill_s"] > 0
    assert "teacher_acc" not in ra and rb["generated_tensors"] == 0


def test_a_run_distilling_a_model_without_shipped_proxy_data_asks_for_it():
    assert Distiller.for_run(RunConfig(model="cifar10")) is None  # no distillation: no proxy
    with pytest.raises(ValueError, match="--proxy"):
        Distiller.for_run(RunConfig(model="cifar10", distill=True))
    with pytest.raises(ValueError, match="--proxy"):
        Distiller.for_run(RunConfig(model="cifar10", generate="distill"))
