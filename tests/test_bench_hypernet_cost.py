"""bench/hypernet_cost.py on a synthetic round of the smallest model: every variant runs a round
through the same calls as the benchmark, and the held-out error is the relative error of the
generated conv, computed here by hand."""

import sys
from pathlib import Path

import pytest
import torch

from cloud.strategies.hypemefed import transitions
from common.models import build_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import hypernet_cost as hc  # noqa: E402

MODEL = "mnist"


def synthetic_round():
    """A round's global convs and 3 tiers of participants plus one held-out tier-3 client, each
    the global convs plus noise, cut to the client's tier."""
    torch.manual_seed(0)
    start = hc.conv_weights(build_model(MODEL).state_dict())
    clients = []
    for i, (tier, held_out) in enumerate([(1, False), (2, False), (3, False), (3, False),
                                          (3, True)]):
        g = torch.Generator().manual_seed(i)
        convs = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in start.items()
                 if int(k.split(".")[1]) < tier}
        clients.append({"tier": tier, "held_out": held_out, "convs": convs})
    return {"global": start, "clients": clients}


@pytest.mark.parametrize("variant", ["lrf", "lrf-batch1", "naive"])
def test_a_round_generates_every_missing_conv_and_reports_its_error(variant):
    rnd = synthetic_round()
    step = (hc.ProductionStep(MODEL) if variant == "lrf"
            else hc.AuthorsStep(MODEL, variant.split("-")[0], 16, 1, svd_once=True))
    train_s, gen_s = hc.run_round(step, rnd, 1)
    assert train_s > 0 and gen_s > 0
    tier1 = step.generate(rnd["clients"][0]["convs"], rnd["global"])
    assert set(tier1) == {t for _, t in transitions()}  # blocks 2 and 3, chained
    for name, value in tier1.items():
        assert value.shape == rnd["global"][name].shape and torch.isfinite(value).all()
    held_out = rnd["clients"][-1]["convs"]
    errors = hc.generation_error(step, rnd)
    with torch.no_grad():
        for s, t in transitions():
            generated = step.generator_for(t).eval()(held_out[s])
            by_hand = float((generated - held_out[t]).norm() / held_out[t].norm())
            assert errors[t] == pytest.approx(by_hand, rel=1e-5)
