"""HypeMeFed's optional gate: generate a tensor only while the hypernetwork, out of sample,
predicts trained weights better than both trivial predictors do: the other trainers' mean and
the global model's tensor."""


import torch
from test_strategies import MODEL, fresh_state, update

from cloud.strategies import build_strategy

PARTICIPANTS = [(0, 1), (1, 1), (2, 2), (3, 2), (4, 3), (5, 3)]
TARGET = "blocks.2.conv1.weight"


def round_updates(strategy, g, seed):
    return [update(strategy, g, c, t, seed + c) for c, t in PARTICIPANTS]


def test_gate_is_shut_before_any_training_and_checks_new_pairs_after():
    s = build_strategy("hypemefed", MODEL, gate=True, seed=0)
    g = fresh_state(0)
    ups1 = round_updates(s, g, 10)
    new1, m1 = s.aggregate(g, ups1, 1)
    assert m1["generated_tensors"] == 0  # never trained: nothing to trust yet
    # with the gate shut HypeMeFed is depth-wise FL, tensor for tensor
    reference, _ = build_strategy("depthwise", MODEL).aggregate(g, ups1, 1)
    assert all(torch.equal(new1[k], reference[k]) for k in reference)
    assert all(not v["open"] for v in m1["hypernet_gate"].values())
    ups = round_updates(s, g, 50)
    _, m2 = s.aggregate(g, ups, 2)
    verdict = m2["hypernet_gate"][TARGET]
    # independent reference: the two tier-3 clients' block-3 conv, each predicted by the other
    t = [u.state[TARGET] for u in ups if u.task.tier == 3]
    mean_err = ((t[1] - t[0]).norm() / t[0].norm() + (t[0] - t[1]).norm() / t[1].norm()) / 2
    global_err = sum((g[TARGET] - ti).norm() / ti.norm() for ti in t) / 2
    assert abs(verdict["mean_err"] - float(mean_err)) < 1e-5
    assert abs(verdict["global_err"] - float(global_err)) < 1e-5
    assert verdict["open"] == (verdict["generated_err"] < min(mean_err, global_err))
    opened = sum(v["open"] for v in m2["hypernet_gate"].values())
    assert (m2["generated_tensors"] > 0) == (opened > 0)


def test_gate_off_generates_as_the_paper():
    s = build_strategy("hypemefed", MODEL, seed=0)
    g = fresh_state(0)
    _, m = s.aggregate(g, round_updates(s, g, 10), 1)
    # tier 1: blocks 2 and 3 (2 convs each), tier 2: block 3, for two clients of each
    assert m["generated_tensors"] == 2 * 4 + 2 * 2 and "hypernet_gate" not in m
