"""bench/poisoning.py: each attack does what RESULTS says it does to the malicious participant's
update, and the attacker is drawn every round (the first tier-1 participant)."""

import sys
from pathlib import Path

import torch

from cloud.robust import screen

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import poisoning  # noqa: E402

GLOBAL = {"conv.weight": torch.zeros(3, 2), "bn.running_var": torch.ones(2),
          "bn.num_batches_tracked": torch.tensor(4)}
TRAINED = {"conv.weight": torch.full((3, 2), 0.1), "bn.running_var": torch.full((2,), 0.9),
           "bn.num_batches_tracked": torch.tensor(9)}


def test_attacks_transform_the_update_as_documented():
    scaled = poisoning.poison("scaled", TRAINED, GLOBAL, 0)
    assert torch.equal(scaled["conv.weight"], TRAINED["conv.weight"] * 1e30)
    assert torch.equal(scaled["bn.running_var"], TRAINED["bn.running_var"] * 1e30)
    flipped = poisoning.poison("sign-flip", TRAINED, GLOBAL, 0)
    assert torch.allclose(flipped["conv.weight"], torch.full((3, 2), -1.0))
    noisy = poisoning.poison("noise", TRAINED, GLOBAL, 0)
    assert 0.3 < float(noisy["conv.weight"].std()) < 3
    for attacked in (scaled, flipped, noisy):  # statistics a device could have computed:
        assert screen(attacked) is None  # the attacks pass the screening, as designed
        assert torch.equal(attacked["bn.num_batches_tracked"], torch.tensor(9))
    for attack in ("sign-flip", "noise"):
        assert torch.equal(poisoning.poison(attack, TRAINED, GLOBAL, 0)["bn.running_var"],
                           TRAINED["bn.running_var"])


def test_table_shows_the_change_against_the_clean_run():
    runs = [{"defence": d, "attack": a, "final": {"1": acc, "2": acc, "3": None},
             "final_mean": acc, "not_committed": [2] if a == "scaled" else []}
            for d in poisoning.DEFENCES for a, acc in (("none", 0.7), ("scaled", 0.5))]
    table = poisoning.table(runs)
    assert "| none | 70.0/70.0 |" in table
    assert "50.0/50.0 (-20.0) [1 refused]" in table
