"""DepthFL and ScaleFL: their distillation losses, splits and aggregation, against references
computed independently (by hand, or in plain Python floats)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from cloud.cli import hmf
from cloud.config import RunConfig
from cloud.simulation import Simulation
from cloud.strategies import ClientTask, ClientUpdate, build_strategy
from cloud.strategies.heterofl import tier_width_fractions
from cloud.strategies.scalefl import tier_splits
from common.models import build_model, param_count
from common.training import (
    TrainConfig,
    deepest_exit_distillation_loss,
    joint_loss,
    local_loss,
    mutual_distillation_loss,
    train_local,
)

# ---------------------------------------------------------------------------------------------
# Plain-Python references: softmax, cross-entropy and KL on lists of floats.


def softmax(z, t=1.0):
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def ce(z, y):
    return -math.log(softmax(z)[y])


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def mutual_reference(exits, ys, w, t):
    """DepthFL Eq. 1, sample by sample, averaged over the batch."""
    n, total = len(exits), 0.0
    for b, y in enumerate(ys):
        zs = [e[b] for e in exits]
        loss = sum(ce(z, y) for z in zs)
        if n > 1:
            loss += w / (n - 1) * sum(t * t * kl(softmax(zs[j], t), softmax(zs[i], t))
                                      for i in range(n) for j in range(n) if i != j)
        total += loss
    return total / len(ys)


def deepest_reference(exits, ys, w, t):
    n, total = len(exits), 0.0
    for b, y in enumerate(ys):
        zs = [e[b] for e in exits]
        teacher = softmax(zs[-1], t)
        loss = n * ce(zs[-1], y)
        for k in range(1, n):
            loss += k * (ce(zs[k - 1], y) + w * t * t * kl(teacher, softmax(zs[k - 1], t)))
        total += loss / (n * (n + 1) / 2)
    return total / len(ys)


def random_exits(n, batch=5, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = [torch.randn(batch, classes, generator=g, dtype=torch.float64) * 2 for _ in range(n)]
    target = torch.randint(0, classes, (batch,), generator=g)
    return logits, target


# ---------------------------------------------------------------------------------------------
# Losses


def test_distillation_losses_on_a_case_worked_by_hand():
    # two exits, one sample, two classes: p1 = (1/2, 1/2), p2 = (3/4, 1/4), label 0, T = 1
    z1 = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    z2 = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    y = torch.tensor([0])
    ce1, ce2 = math.log(2), math.log(4 / 3)
    kl21 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # KL(p2 || p1): exit 1 learns from 2
    kl12 = 0.5 * math.log(2 / 3) + 0.5 * math.log(2)  # KL(p1 || p2): exit 2 learns from 1
    mutual = mutual_distillation_loss([z1, z2], y)
    assert mutual.item() == pytest.approx(ce1 + ce2 + kl21 + kl12, abs=1e-12)
    deepest = deepest_exit_distillation_loss([z1, z2], y)
    assert deepest.item() == pytest.approx((1 * (ce1 + kl21) + 2 * ce2) / 3, abs=1e-12)


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("w,t", [(1.0, 1.0), (0.5, 3.0)])
def test_distillation_losses_match_the_plain_python_reference(n, w, t):
    logits, y = random_exits(n, seed=n)
    lists, ys = [z.tolist() for z in logits], y.tolist()
    got = mutual_distillation_loss(logits, y, w, t).item()
    assert got == pytest.approx(mutual_reference(lists, ys, w, t), rel=1e-10)
    got = deepest_exit_distillation_loss(logits, y, w, t).item()
    assert got == pytest.approx(deepest_reference(lists, ys, w, t), rel=1e-10)


def test_one_exit_trains_plain_cross_entropy():
    (z,), y = random_exits(1)
    for loss in (mutual_distillation_loss, deepest_exit_distillation_loss):
        assert torch.equal(loss([z], y, 1.0, 3.0), F.cross_entropy(z, y))


def test_teachers_are_detached():
    """ScaleFL: the deepest exit gets only its own cross-entropy's gradient. DepthFL: an exit's
    gradient is its CE plus its KL towards the others, never the others' KL towards it."""
    logits, y = random_exits(3, seed=7)
    zs = [z.clone().requires_grad_(True) for z in logits]
    deepest_exit_distillation_loss(zs, y, 1.0, 3.0).backward()
    ref = logits[-1].clone().requires_grad_(True)
    (3 * F.cross_entropy(ref, y) / 6).backward()
    torch.testing.assert_close(zs[-1].grad, ref.grad)

    zs = [z.clone().requires_grad_(True) for z in logits]
    mutual_distillation_loss(zs, y, 1.0, 1.0).backward()
    student = logits[0].clone().requires_grad_(True)
    teachers = [F.softmax(z, 1) for z in logits[1:]]
    own = F.cross_entropy(student, y) + 0.5 * sum(
        (p * (p.log() - F.log_softmax(student, 1))).sum(1).mean() for p in teachers)
    own.backward()
    torch.testing.assert_close(zs[0].grad, student.grad)


def test_without_distillation_the_loss_is_the_old_joint_loss_bit_for_bit():
    logits, y = random_exits(3, seed=3)
    assert torch.equal(local_loss(logits, y, TrainConfig()), joint_loss(logits, y))
    weighted = TrainConfig(exit_weights=(0.2, 0.3, 0.5))
    assert torch.equal(local_loss(logits, y, weighted), joint_loss(logits, y, (0.2, 0.3, 0.5)))


def _old_train_local(model, x, y, cfg, generator):
    """train_local as it was before distillation existed (the joint loss, inline), with the
    default layout and the per-tensor Adam: the reference for the fused, channels-last one."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=0.1 * cfg.lr)
    model.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            if len(idx) < 2:
                continue
            loss = sum(F.cross_entropy(z, y[idx]) for z in model(x[idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def test_default_training_gives_the_plain_loops_weights_and_distillation_changes_them():
    # float64: in float32 Adam turns rounding noise into lr-sized steps wherever a gradient is
    # ~0 (conv biases under BatchNorm get ~1e-7), so two correct orders of summation diverge
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 1, 28, 28, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (20,), generator=g)
    cfg = TrainConfig(epochs=1, batch_size=8, lr=1e-3)
    torch.manual_seed(1)
    start = build_model("mnist", depth=2).double().state_dict()

    def trained(fn, c):
        model = build_model("mnist", depth=2).double()
        model.load_state_dict(start)
        torch.manual_seed(2)
        fn(model, x, y, c, torch.Generator().manual_seed(3))
        return model.state_dict()

    new, old = trained(train_local, cfg), trained(_old_train_local, cfg)
    assert all(new[k].is_contiguous() for k in new)  # the layout is put back
    for k in old:  # fused Adam and NHWC convolutions: the same training to float rounding
        torch.testing.assert_close(new[k], old[k], rtol=1e-9, atol=1e-9)
    distilled = trained(train_local, TrainConfig(1, 8, 1e-3, distill="mutual"))
    assert not torch.allclose(distilled["stem.conv1.weight"], old["stem.conv1.weight"])


def test_train_config_validation_and_wire_round_trip():
    with pytest.raises(ValueError, match="distill"):
        TrainConfig(distill="everything")
    with pytest.raises(ValueError, match="exit_weights"):
        TrainConfig(exit_weights=(1.0, 1.0), distill="mutual")
    cfg = TrainConfig(2, 16, 5e-3, distill="deepest", distill_weight=0.5, temperature=3.0)
    wire = json.loads(json.dumps(cfg.to_json()))
    assert TrainConfig.from_json(wire) == cfg
    assert TrainConfig.from_json(json.loads(json.dumps(TrainConfig(exit_weights=(1, 2)).to_json()))
                                 ).exit_weights == (1.0, 2.0)
    # a task from a cloud that sends only epochs, batch and lr trains as before
    assert TrainConfig.from_json({"epochs": 2, "batch_size": 16, "lr": 5e-3}) == TrainConfig(
        2, 16, 5e-3)


# ---------------------------------------------------------------------------------------------
# Strategies


def fresh_state(model="mnist", seed=0):
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in build_model(model).state_dict().items()}


def perturbed(state, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: v + torch.randn(v.shape, generator=g) * 0.01 if v.is_floating_point() else v
            for k, v in state.items()}


def update(strategy, global_state, client, tier, seed):
    (task,) = strategy.tasks([(client, tier)])
    return ClientUpdate(task, 10, perturbed(strategy.submodel(global_state, task)[1], seed))


def test_train_config_hooks():
    base = TrainConfig(2, 16, 5e-3)
    assert build_strategy("depthwise", "hapt").train_config(base) is base
    assert build_strategy("heterofl", "hapt").train_config(base) is base
    assert build_strategy("depthfl", "hapt").train_config(base) == TrainConfig(
        2, 16, 5e-3, distill="mutual", distill_weight=1.0, temperature=1.0)
    assert build_strategy("scalefl", "hapt").train_config(base) == TrainConfig(
        2, 16, 5e-3, distill="deepest", distill_weight=1.0, temperature=3.0)


def test_depthfl_trains_depthwise_tiers_and_aggregates_as_depthwise():
    dfl, dw = build_strategy("depthfl", "mnist"), build_strategy("depthwise", "mnist")
    parts = [(0, 1), (1, 2), (2, 3), (3, 1)]
    assert dfl.tasks(parts) == dw.tasks(parts)
    assert dfl.evaluated_exits() == dw.evaluated_exits() == 3 and not dfl.static_bn
    g = fresh_state()
    updates = [update(dfl, g, c, t, 20 + c) for c, t in parts]
    a, _ = dfl.aggregate(g, updates, 1)
    b, _ = dw.aggregate(g, updates, 1)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# (depth, width) per tier and the parameter counts documented in cloud/strategies/scalefl.py
DOCUMENTED_SPLITS = {
    "svhn": [(2, 0.504, 107_470), (3, 0.516, 350_418), (3, 1.0, 1_245_886)],
    "stl10": [(2, 0.564, 1_000_910), (3, 0.568, 2_256_651), (3, 1.0, 5_979_486)],
    "unimib": [(2, 0.479, 284_737), (3, 0.498, 1_188_339), (3, 1.0, 4_729_048)],
    "hapt": [(2, 0.479, 280_281), (3, 0.496, 1_172_271), (3, 1.0, 4_718_802)],
}


@pytest.mark.parametrize("model", list(DOCUMENTED_SPLITS))
def test_scalefl_tiers_have_the_documented_split_and_the_depthwise_budget(model):
    s = build_strategy("scalefl", model)
    tasks = s.tasks([(0, 1), (1, 2), (2, 3)])
    assert [t.tier for t in tasks] == [1, 2, 3]
    for task, (depth, width, params) in zip(tasks, DOCUMENTED_SPLITS[model], strict=True):
        assert task.depth == depth and task.width_fraction == pytest.approx(width, abs=5e-4)
        sub = param_count(build_model(model, depth=task.depth, width_fraction=task.width_fraction))
        assert sub == params
        budget = param_count(build_model(model, depth=task.tier))
        assert abs(sub / budget - 1) < 0.01  # within 1 % of the depth-wise tier
    # tier 2 is HeteroFL's tier 2; tier 1 is not (HeteroFL keeps all three blocks)
    assert tier_splits(model)[1][1] == tier_width_fractions(model)[1]
    assert s.evaluated_exits() == 3 and s.static_bn


def test_scalefl_submodel_state_fits_its_module():
    s, g = build_strategy("scalefl", "mnist"), fresh_state()
    for tier in (1, 2, 3):
        (task,) = s.tasks([(0, tier)])
        module, sent = s.submodel(g, task)
        module.load_state_dict(sent)  # strict: names and shapes fit
        assert len(module.heads) == task.depth
        name = "blocks.0.conv1.weight"
        co, ci = sent[name].shape[:2]
        assert torch.equal(sent[name], g[name][:co, :ci])


def test_scalefl_averages_each_element_over_the_clients_covering_it():
    """Hand-made case: each element's expected value written out."""
    s = build_strategy("scalefl", "mnist")
    g = {"w": torch.full((3, 3), 9.0), "deep": torch.full((2,), 9.0), "unused": torch.zeros(1)}
    a = ClientUpdate(ClientTask(0, 1, 2, 0.5), 10, {"w": torch.full((2, 2), 1.0)})
    b = ClientUpdate(ClientTask(1, 3, 3, 1.0), 10, {"w": torch.full((3, 3), 3.0),
                                                    "deep": torch.tensor([4.0, 6.0])})
    c = ClientUpdate(ClientTask(2, 2, 3, 0.4), 10, {"w": torch.full((1, 3), 5.0),
                                                    "deep": torch.tensor([2.0])})
    new, _ = s.aggregate(g, [a, b, c], 1)
    expected = torch.tensor([[(1 + 3 + 5) / 3, (1 + 3 + 5) / 3, (3 + 5) / 2],
                             [(1 + 3) / 2, (1 + 3) / 2, 3.0],
                             [3.0, 3.0, 3.0]])
    torch.testing.assert_close(new["w"], expected)
    torch.testing.assert_close(new["deep"], torch.tensor([(4.0 + 2.0) / 2, 6.0]))
    assert torch.equal(new["unused"], g["unused"])


def test_scalefl_aggregates_real_submodels_elementwise():
    s, g = build_strategy("scalefl", "mnist"), fresh_state()
    t1, t2, t3 = (update(s, g, c, t, 30 + c) for c, t in [(0, 1), (1, 2), (2, 3)])
    new, _ = s.aggregate(g, [t1, t2, t3], 1)
    # block 2 (index 1): every tier holds it, tiers 1 and 2 a leading slice
    name = "blocks.1.conv1.weight"
    co, ci = t1.state[name].shape[:2]
    torch.testing.assert_close(new[name][:co, :ci], (t1.state[name] + t2.state[name][:co, :ci]
                                                     + t3.state[name][:co, :ci]) / 3)
    torch.testing.assert_close(new[name][co:, ci:], t3.state[name][co:, ci:])
    # block 3: tier 1 lacks it
    name = "blocks.2.conv2.weight"
    assert name not in t1.state
    co, ci = t2.state[name].shape[:2]
    torch.testing.assert_close(new[name][:co, :ci], (t2.state[name] + t3.state[name][:co, :ci]) / 2)
    torch.testing.assert_close(new[name][co:], t3.state[name][co:])


# ---------------------------------------------------------------------------------------------
# End to end


@pytest.mark.parametrize("strategy,distill", [("depthfl", "mutual"), ("scalefl", "deepest")])
def test_two_round_simulate(tiny_hapt, tmp_path, strategy, distill):
    out = tmp_path / strategy
    res = CliRunner().invoke(hmf, [
        "simulate", "--strategy", strategy, "--model", "hapt", "--data-dir", str(tiny_hapt),
        "--clients", "6", "--participants", "3", "--partition", "iid", "--rounds", "2",
        "--local-epochs", "1", "--batch-size", "32", "--seed", "3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and rows[-1]["strategy"] == strategy
    for row in rows:
        acc = row["acc"]
        assert all(0 <= acc["global"][e] <= 1 for e in ("1", "2", "3"))
        assert all(0 <= v <= 1 for v in acc["tier"].values())
        assert math.isfinite(row["train_loss"])
    sim = Simulation(RunConfig(model="hapt", data_dir=str(tiny_hapt), clients=6, participants=3,
                               partition="iid", strategy=strategy), tmp_path / "x", print)
    assert sim.train_cfg.distill == distill
