"""Aggregation maths against independent references (by hand, tensor by tensor)."""

import pytest
import torch

from cloud.checkpoint import load_checkpoint, save_checkpoint
from cloud.strategies import STRATEGIES, ClientTask, ClientUpdate, build_strategy
from cloud.strategies.heterofl import tier_width_fractions
from cloud.strategies.hypemefed import transitions
from common.models import build_model, param_count, tier_state

MODEL = "mnist"  # smallest model: fast


def fresh_state(seed):
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in build_model(MODEL).state_dict().items()}


def perturbed(state, seed):
    """A 'trained' state: the global one plus noise (BN counters untouched)."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + torch.randn(v.shape, generator=g) * 0.01 if v.is_floating_point() else v
            for k, v in state.items()}


def update(strategy, global_state, client, tier, seed, samples=10):
    task = next(t for t in strategy.tasks([(client, tier)]))
    _, sent = strategy.submodel(global_state, task)
    return ClientUpdate(task, samples, perturbed(sent, seed))


def test_depthwise_averages_each_tensor_over_its_trainers():
    s = build_strategy("depthwise", MODEL)
    g = fresh_state(0)
    u1, u2, u3 = (update(s, g, c, t, 10 + c) for c, t in [(0, 1), (1, 2), (2, 3)])
    new, _ = s.aggregate(g, [u1, u2, u3], 1)
    for name in g:
        holders = [u.state[name] for u in (u1, u2, u3) if name in u.state]
        if g[name].is_floating_point():
            torch.testing.assert_close(new[name], sum(holders) / len(holders))
    assert torch.equal(new["blocks.2.conv1.weight"], u3.state["blocks.2.conv1.weight"])


def test_tensor_nobody_trained_keeps_global_value():
    s = build_strategy("depthwise", MODEL)
    g = fresh_state(0)
    new, _ = s.aggregate(g, [update(s, g, 0, 1, 1)], 1)
    assert torch.equal(new["blocks.2.conv1.weight"], g["blocks.2.conv1.weight"])
    assert not torch.equal(new["blocks.0.conv1.weight"], g["blocks.0.conv1.weight"])


def test_sample_weighting():
    s = build_strategy("depthwise", MODEL, weighting="samples")
    g = fresh_state(0)
    a, b = update(s, g, 0, 3, 1, samples=30), update(s, g, 1, 3, 2, samples=10)
    new, _ = s.aggregate(g, [a, b], 1)
    name = "heads.2.fc.weight"
    torch.testing.assert_close(new[name], (30 * a.state[name] + 10 * b.state[name]) / 40)


def test_fedavg_uses_only_full_model_clients_and_fedavg_small_only_tier1():
    fedavg, small = build_strategy("fedavg", MODEL), build_strategy("fedavg-small", MODEL)
    parts = [(0, 1), (1, 2), (2, 3), (3, 3)]
    assert [(t.client, t.depth) for t in fedavg.tasks(parts)] == [(2, 3), (3, 3)]
    assert {t.depth for t in small.tasks(parts)} == {1} and len(small.tasks(parts)) == 4
    assert small.evaluated_exits() == 1


def test_generated_weights_reach_the_aggregate():
    """The release's main defect: generated weights never reached the model."""
    s = build_strategy("hypemefed", MODEL, rank=8, hidden=32, epochs=3)
    g = fresh_state(0)
    shallow, deep = update(s, g, 0, 1, 1), update(s, g, 1, 3, 2)
    new, metrics = s.aggregate(g, [shallow, deep], 1)
    assert metrics["hypernet_pairs"] == {t: 1 for _, t in transitions()}
    with torch.no_grad():
        block1 = shallow.state["blocks.0.conv1.weight"]
        gen2 = s.generator_for("blocks.1.conv1.weight").eval()(block1)
        gen3 = s.generator_for("blocks.2.conv1.weight").eval()(gen2)  # chained from generated
    torch.testing.assert_close(new["blocks.1.conv1.weight"],
                               (deep.state["blocks.1.conv1.weight"] + gen2) / 2)
    torch.testing.assert_close(new["blocks.2.conv1.weight"],
                               (deep.state["blocks.2.conv1.weight"] + gen3) / 2)
    # nothing generates BatchNorm, conv bias or heads: those come from the deep client alone
    for name in ("blocks.1.bn1.weight", "blocks.1.conv1.bias", "heads.2.fc.weight"):
        assert torch.equal(new[name], deep.state[name])
    # and the depthwise baseline differs exactly there
    plain, _ = build_strategy("depthwise", MODEL).aggregate(g, [shallow, deep], 1)
    assert torch.equal(plain["blocks.1.conv1.weight"], deep.state["blocks.1.conv1.weight"])


def test_round_without_deep_clients_does_not_crash_or_generate():
    s = build_strategy("hypemefed", MODEL, rank=8, hidden=32, epochs=2)
    g = fresh_state(0)
    new, metrics = s.aggregate(g, [update(s, g, 0, 1, 1), update(s, g, 1, 1, 2)], 1)
    assert metrics["generated_tensors"] == 0 and "note" in metrics
    assert set(metrics["hypernet_pairs"].values()) == {0}
    assert torch.equal(new["blocks.1.conv1.weight"], g["blocks.1.conv1.weight"])
    # only tier-2 clients: block 1->2 hypernetworks train, 2->3 do not, tier 2 has nothing to get
    new, metrics = s.aggregate(g, [update(s, g, 0, 2, 3)], 2)
    assert metrics["hypernet_pairs"]["blocks.1.conv1.weight"] == 1
    assert metrics["hypernet_pairs"]["blocks.2.conv1.weight"] == 0
    assert torch.equal(new["blocks.2.conv1.weight"], g["blocks.2.conv1.weight"])


def test_hypernetworks_persist_through_checkpoint(tmp_path):
    s = build_strategy("hypemefed", MODEL, rank=8, hidden=32, epochs=2)
    g = fresh_state(0)
    s.aggregate(g, [update(s, g, 0, 1, 1), update(s, g, 1, 3, 2)], 1)
    save_checkpoint(tmp_path, 1, g, s, {"x": 1})
    t = build_strategy("hypemefed", MODEL, rank=8, hidden=32, epochs=2)
    rnd, state, meta = load_checkpoint(tmp_path, t)
    assert rnd == 1 and meta["config"] == {"x": 1}
    assert all(torch.equal(state[k], g[k]) for k in g)
    for (ka, a), (kb, b) in zip(s.hypernets.state_dict().items(), t.hypernets.state_dict().items(),
                                strict=True):
        assert ka == kb and torch.equal(a, b)
    assert t.rounds_trained == s.rounds_trained
    # the restored optimizers continue exactly as the originals
    us = [update(s, g, 0, 1, 5), update(s, g, 1, 3, 6)]
    a, _ = s.aggregate(g, us, 2)
    b, _ = t.aggregate(g, us, 2)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_heterofl_slices_and_elementwise_average():
    s = build_strategy("heterofl", MODEL)
    fr = tier_width_fractions(MODEL)
    assert fr[-1] == 1.0 and fr[0] < fr[1] < 1.0
    for tier, f in enumerate(fr, start=1):  # budgets close to the depth tiers'
        ratio = param_count(build_model(MODEL, width_fraction=f)) / param_count(
            build_model(MODEL, depth=tier))
        assert 0.85 < ratio < 1.15
    g = fresh_state(0)
    small, big = update(s, g, 0, 1, 1), update(s, g, 1, 3, 2)
    module, _ = s.submodel(g, small.task)
    module.load_state_dict(small.state)  # the sliced state fits the width-scaled module
    new, _ = s.aggregate(g, [small, big], 1)
    name = "blocks.1.conv1.weight"
    co, ci = small.state[name].shape[:2]
    both = (small.state[name] + big.state[name][:co, :ci]) / 2
    torch.testing.assert_close(new[name][:co, :ci], both)
    torch.testing.assert_close(new[name][co:], big.state[name][co:])


def test_registry_and_unknown_strategy():
    assert set(STRATEGIES) == {"fedavg", "fedavg-small", "depthwise", "hypemefed", "heterofl"}
    with pytest.raises(ValueError, match="unknown strategy"):
        build_strategy("fedprox", MODEL)
    assert tier_state(fresh_state(0), 1).keys() == build_model(MODEL, depth=1).state_dict().keys()
    assert ClientTask(0, 1, 1).width_fraction == 1.0


def test_heterofl_static_bn_recomputes_running_statistics():
    s = build_strategy("heterofl", MODEL)
    g = fresh_state(0)
    g["stem.bn1.running_mean"] += 5.0  # stale statistics from mixed widths
    x = torch.randn(64, 1, 28, 28)
    new = s.calibrate(g, iter([x[:32], x[32:]]))
    conv = torch.nn.functional.conv2d(x, g["stem.conv1.weight"], g["stem.conv1.bias"], padding=1)
    batch_means = torch.stack([conv[:32].mean((0, 2, 3)), conv[32:].mean((0, 2, 3))])
    torch.testing.assert_close(new["stem.bn1.running_mean"], batch_means.mean(0))
    assert torch.equal(new["stem.conv1.weight"], g["stem.conv1.weight"])  # weights untouched
    # strategies without static BN leave the state alone
    assert build_strategy("depthwise", MODEL).calibrate(g, iter([x])) is g
