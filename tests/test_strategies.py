"""Aggregation maths against independent references (by hand, tensor by tensor)."""

import pytest
import torch

from cloud.checkpoint import load_checkpoint, save_checkpoint
from cloud.config import RunConfig
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


@pytest.mark.parametrize("opts", [{}, {"generate": "all"}, {"reset": True}])
def test_hypernetworks_persist_through_checkpoint(tmp_path, opts):
    s = build_strategy("hypemefed", MODEL, rank=8, hidden=32, epochs=2, **opts)
    g = fresh_state(0)
    s.aggregate(g, [update(s, g, 0, 1, 1), update(s, g, 1, 3, 2)], 1)
    save_checkpoint(tmp_path, 1, g, s, {"x": 1})
    t = build_strategy("hypemefed", MODEL, rank=8, hidden=32, epochs=2, **opts)
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


def hypemefed_round(s, g, server_round, seeds=(1, 2, 3)):
    """A tier-1, a tier-2 and a tier-3 participant."""
    ups = [update(s, g, c, t, seed) for c, t, seed in zip((0, 1, 2), (1, 2, 3), seeds,
                                                           strict=True)]
    return ups, s.aggregate(g, ups, server_round)


def test_hypernetwork_reset_equals_a_fresh_start_on_the_round_s_pairs():
    g = fresh_state(0)
    opts = dict(rank=8, hidden=32, epochs=2, reset=True)
    reset = build_strategy("hypemefed", MODEL, **opts)
    hypemefed_round(reset, g, 1, seeds=(1, 2, 3))
    ups, (new, _) = hypemefed_round(reset, g, 2, seeds=(4, 5, 6))
    fresh = build_strategy("hypemefed", MODEL, **opts)
    fresh_new, _ = fresh.aggregate(g, ups, 2)  # round 2's pairs only, from the seed init
    for a, b in zip(reset.hypernets.parameters(), fresh.hypernets.parameters(), strict=True):
        assert torch.equal(a, b)
    assert all(torch.equal(new[k], fresh_new[k]) for k in new)
    # kept across rounds (the default), round 1 leaves its mark
    kept = build_strategy("hypemefed", MODEL, **{**opts, "reset": False})
    hypemefed_round(kept, g, 1, seeds=(1, 2, 3))
    hypemefed_round(kept, g, 2, seeds=(4, 5, 6))
    assert not all(torch.equal(a, b) for a, b in zip(kept.hypernets.parameters(),
                                                     fresh.hypernets.parameters(), strict=True))


def test_reset_hypernetwork_without_pairs_generates_nothing():
    s = build_strategy("hypemefed", MODEL, rank=8, hidden=32, reset=True)
    g = fresh_state(0)
    hypemefed_round(s, g, 1)  # every hypernetwork trained once
    new, metrics = s.aggregate(g, [update(s, g, 0, 1, 7), update(s, g, 1, 2, 8)], 2)
    assert metrics["generated_tensors"] == 2  # block 2 for tier 1 only: block 3 is untrained
    assert torch.equal(new["blocks.2.conv1.weight"], g["blocks.2.conv1.weight"])


def by_hand_vectors(state, block, j):
    """Block ``block``'s per-channel vectors of conv j, as the hypernetwork sees them."""
    b = f"blocks.{block - 1}"
    return torch.cat([state[f"{b}.conv{j}.bias"], state[f"{b}.bn{j}.weight"],
                      state[f"{b}.bn{j}.bias"], state[f"{b}.bn{j}.running_mean"],
                      torch.log(state[f"{b}.bn{j}.running_var"] + 1e-8)])


def test_generate_convs_and_bn_averages_trained_and_generated_vectors():
    s = build_strategy("hypemefed", MODEL, rank=8, hidden=32, generate="convs+bn")
    g = fresh_state(0)
    (shallow, middle, deep), (new, metrics) = hypemefed_round(s, g, 1)
    assert metrics["hypernet_pairs"]["blocks.1.bn1"] == 2  # tiers 2 and 3 hold blocks 1-2
    assert metrics["hypernet_pairs"]["blocks.2.bn2"] == 1
    # 2 convs + 2 x 5 vectors for each generated block: tier 1 gets 2 blocks, tier 2 one
    assert metrics["generated_tensors"] == 3 * 12
    with torch.no_grad():
        to2 = s.hypernets["blocks_1_bn1"].eval()
        to3 = s.hypernets["blocks_2_bn1"].eval()
        gen2_shallow = to2(by_hand_vectors(shallow.state, 1, 1))
        gen3_shallow = to3(gen2_shallow)  # chained from the generated block 2
        gen3_middle = to3(by_hand_vectors(middle.state, 2, 1))
    c = g["blocks.2.bn1.weight"].numel()
    names = ["conv1.bias", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var"]
    for i, name in enumerate(names):
        parts = [gen3_shallow[i * c:(i + 1) * c], gen3_middle[i * c:(i + 1) * c]]
        if name.endswith("running_var"):
            parts = [p.exp() - 1e-8 for p in parts]
        expected = (deep.state[f"blocks.2.{name}"] + parts[0] + parts[1]) / 3
        torch.testing.assert_close(new[f"blocks.2.{name}"], expected)
    assert (new["blocks.2.bn1.running_var"] > 0).all()
    # the integer batch counter is not generated: the deep client's alone
    assert torch.equal(new["blocks.2.bn1.num_batches_tracked"],
                       deep.state["blocks.2.bn1.num_batches_tracked"])
    # heads are not generated under convs+bn
    assert torch.equal(new["heads.2.fc.weight"], deep.state["heads.2.fc.weight"])


def test_generate_all_averages_trained_and_generated_heads():
    s = build_strategy("hypemefed", MODEL, rank=8, hidden=32, generate="all")
    g = fresh_state(0)
    (shallow, middle, deep), (new, metrics) = hypemefed_round(s, g, 1)
    assert metrics["hypernet_pairs"]["heads.1"] == 2 and metrics["hypernet_pairs"]["heads.2"] == 1
    with torch.no_grad():
        rows = torch.cat([middle.state["heads.1.fc.weight"],
                          middle.state["heads.1.fc.bias"][:, None]], dim=1)  # a row per class
        generated = s.hypernets["heads_2"].eval()(rows)
        from_shallow = s.hypernets["heads_2"](s.hypernets["heads_1"](torch.cat(
            [shallow.state["heads.0.fc.weight"], shallow.state["heads.0.fc.bias"][:, None]], 1)))
    torch.testing.assert_close(new["heads.2.fc.weight"], (deep.state["heads.2.fc.weight"]
                               + generated[:, :-1] + from_shallow[:, :-1]) / 3)
    torch.testing.assert_close(new["heads.2.fc.bias"], (deep.state["heads.2.fc.bias"]
                               + generated[:, -1] + from_shallow[:, -1]) / 3)


def test_generate_setting_is_validated_and_convs_come_first():
    with pytest.raises(ValueError, match="generate"):
        build_strategy("hypemefed", MODEL, generate="bn")
    convs = build_strategy("hypemefed", MODEL, rank=8, hidden=32)
    every = build_strategy("hypemefed", MODEL, rank=8, hidden=32, generate="all")
    for key, h in convs.hypernets.items():  # the conv hypernetworks' seeded init is shared
        assert all(torch.equal(a, b) for a, b in zip(h.parameters(),
                                                     every.hypernets[key].parameters(),
                                                     strict=True))
    assert convs.needed_tensors() == {n for pair in transitions() for n in pair}
    assert {"blocks.2.bn2.running_var", "heads.0.fc.bias"} <= every.needed_tensors()


def test_run_config_reaches_the_strategy():
    from cloud.simulation import strategy_for

    cfg = RunConfig(hypernet_reset=True, generate="convs+bn", hypernet_ridge=0.5,
                    hypernet_sweeps=2, hypernet_epochs=3, rank=7, hidden=16, untrained="global",
                    hypernet_residual=True)
    s = strategy_for(cfg)
    assert (s.reset, s.generate, s.ridge, s.sweeps, s.epochs, s.rank, s.hidden, s.untrained,
            s.residual) == (True, "convs+bn", 0.5, 2, 3, 7, 16, "global", True)
    with pytest.raises(ValueError, match="generate"):
        RunConfig(generate="heads")


def test_simulate_flags_for_the_ablations():
    from click.testing import CliRunner

    from cloud.cli import hmf
    from cloud.options import resolve_flags

    cfg = resolve_flags(None, None, {"hypernet_reset": True, "generate": "all", "rank": None})
    assert cfg.hypernet_reset and cfg.generate == "all" and cfg.rank == 100
    help_text = CliRunner().invoke(hmf, ["simulate", "--help"]).output
    for flag in ("--hypernet-reset", "--generate", "--hypernet-ridge", "--hypernet-sweeps",
                 "--untrained", "--hypernet-residual"):
        assert flag in help_text
    res = CliRunner().invoke(hmf, ["simulate", "--generate", "heads"])
    assert res.exit_code == 2 and "convs+bn" in res.output


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
    assert set(STRATEGIES) == {"fedavg", "fedavg-small", "depthwise", "hypemefed", "heterofl",
                               "depthfl", "scalefl", "hypemefed-release"}
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


def test_hypemefed_release_averages_stale_global_tensors_of_shallow_clients():
    """What the authors' release computes: every participant's full state, a shallow client's
    untrained tensors being the global model's."""
    s = build_strategy("hypemefed-release", MODEL)
    g = fresh_state(0)
    u1, u3 = update(s, g, 0, 1, 1), update(s, g, 1, 3, 2)
    new, _ = s.aggregate(g, [u1, u3], 1)
    for name in ("blocks.2.conv1.weight", "blocks.2.bn1.running_var", "heads.2.fc.weight"):
        assert name not in u1.state
        torch.testing.assert_close(new[name], (g[name] + u3.state[name]) / 2)
    name = "blocks.0.conv1.weight"
    torch.testing.assert_close(new[name], (u1.state[name] + u3.state[name]) / 2)
    dw, _ = build_strategy("depthwise", MODEL).aggregate(g, [u1, u3], 1)
    assert torch.equal(dw["blocks.2.conv1.weight"], u3.state["blocks.2.conv1.weight"])
    weighted = build_strategy("hypemefed-release", MODEL, weighting="samples")
    u1.num_samples, u3.num_samples = 30, 10
    new, _ = weighted.aggregate(g, [u1, u3], 1)
    name = "blocks.2.conv1.weight"
    torch.testing.assert_close(new[name], (30 * g[name] + 10 * u3.state[name]) / 40)


PARTICIPANTS = [(0, 1), (1, 1), (2, 2), (3, 2), (4, 3), (5, 3)]


def test_hypemefed_untrained_global_with_the_gate_shut_is_the_release():
    """Round 1: the gate is shut (no hypernetwork trained yet), so nothing is generated and a
    shallow client's every missing tensor is the global one: the release's aggregate."""
    s = build_strategy("hypemefed", MODEL, rank=8, hidden=32, gate=True, untrained="global")
    g = fresh_state(0)
    ups = [update(s, g, c, t, 30 + c) for c, t in PARTICIPANTS]
    new, metrics = s.aggregate(g, ups, 1)
    assert metrics["generated_tensors"] == 0
    release, _ = build_strategy("hypemefed-release", MODEL).aggregate(g, ups, 1)
    for k in g:
        torch.testing.assert_close(new[k], release[k], rtol=1e-6, atol=1e-7, msg=k)
    skip, _ = build_strategy("hypemefed", MODEL, rank=8, hidden=32, gate=True).aggregate(g, ups, 1)
    assert not torch.allclose(skip["blocks.2.conv1.weight"], new["blocks.2.conv1.weight"])


def test_hypemefed_untrained_global_keeps_generated_convs_and_fills_the_rest():
    s = build_strategy("hypemefed", MODEL, rank=8, hidden=32, untrained="global")
    g = fresh_state(0)
    ups = [update(s, g, c, t, 30 + c) for c, t in PARTICIPANTS]
    new, metrics = s.aggregate(g, ups, 1)
    assert metrics["generated_tensors"] > 0
    deep = [u.state for u in ups if u.task.tier == 3]
    for name in ("blocks.2.bn1.running_var", "heads.2.fc.weight", "blocks.2.conv1.bias"):
        torch.testing.assert_close(new[name], (4 * g[name] + sum(d[name] for d in deep)) / 6)
    name = "blocks.2.conv1.weight"  # 4 generated + 2 trained, the global one nowhere
    with torch.no_grad():
        gen = [s.generator_for(name).eval()(s.generator_for("blocks.1.conv1.weight").eval()(
            u.state["blocks.0.conv1.weight"])) if u.task.tier == 1
            else s.generator_for(name).eval()(u.state["blocks.1.conv1.weight"])
            for u in ups if u.task.tier < 3]
    torch.testing.assert_close(new[name], (sum(gen) + sum(d[name] for d in deep)) / 6)
    with pytest.raises(ValueError, match="untrained must be one of"):
        RunConfig(untrained="zeros")


def deviations(state, origin):
    return {k: v - origin[k] if v.is_floating_point() else v for k, v in state.items()}


def test_hypemefed_residual_maps_deviations_and_generates_global_plus_prediction():
    """With ``residual`` the hypernetworks are those a plain HypeMeFed fits to the clients'
    deviations from the global model, and a generated conv is the global one plus the predicted
    deviation, chained for tier 1."""
    s = build_strategy("hypemefed", MODEL, rank=8, hidden=32, residual=True)
    plain = build_strategy("hypemefed", MODEL, rank=8, hidden=32)
    g = fresh_state(0)
    ups = [update(s, g, c, t, 30 + c) for c, t in PARTICIPANTS]
    new, metrics = s.aggregate(g, ups, 1)
    assert metrics["generated_tensors"] == 2 * 4 + 2 * 2  # 2 convs: blocks 2-3 tier 1, 3 tier 2
    plain.train_hypernets([ClientUpdate(u.task, u.num_samples, deviations(u.state, g))
                           for u in ups], 1, g)
    for key, h in s.hypernets.items():
        for a, b in zip(h.parameters(), plain.hypernets[key].parameters(), strict=True):
            torch.testing.assert_close(a, b, msg=key)
    b1, b2, b3 = (f"blocks.{i}.conv1.weight" for i in range(3))
    with torch.no_grad():
        h2, h3 = s.generator_for(b2).eval(), s.generator_for(b3).eval()
        gen = []
        for u in ups:
            if u.task.tier == 1:
                block2 = g[b2] + h2(u.state[b1] - g[b1])
                gen.append(g[b3] + h3(block2 - g[b2]))
            elif u.task.tier == 2:
                gen.append(g[b3] + h3(u.state[b2] - g[b2]))
    trained = [u.state[b3] for u in ups if u.task.tier == 3]
    torch.testing.assert_close(new[b3], (sum(gen) + sum(trained)) / 6)
    weights, _ = build_strategy("hypemefed", MODEL, rank=8, hidden=32).aggregate(g, ups, 1)
    assert not torch.allclose(weights[b3], new[b3])


def test_hypemefed_residual_gate_judges_weights_not_deviations():
    """The gate's references (the other trainers' mean, the global tensor) are errors of the
    weights, so they do not depend on ``residual``; only the generated error does."""
    g = fresh_state(0)
    verdicts = []
    for residual in (False, True):
        s = build_strategy("hypemefed", MODEL, rank=8, hidden=32, gate=True, residual=residual)
        s.aggregate(g, [update(s, g, c, t, 30 + c) for c, t in PARTICIPANTS], 1)
        _, metrics = s.aggregate(g, [update(s, g, c, t, 50 + c) for c, t in PARTICIPANTS], 2)
        verdicts.append(metrics["hypernet_gate"]["blocks.2.conv1.weight"])
    plain, residual = verdicts
    assert plain["mean_err"] == pytest.approx(residual["mean_err"])
    assert plain["global_err"] == pytest.approx(residual["global_err"])
    assert plain["generated_err"] != pytest.approx(residual["generated_err"])
