import json

import pytest
import torch
from click.testing import CliRunner

from cloud.cli import hmf
from common.models import (
    MODELS,
    NUM_BLOCKS,
    SPECS,
    build_model,
    depth_of,
    macs_per_sample,
    param_count,
    tier_state,
)

# method.md's table: conv + BN affine + heads of the blocks a tier holds.
PAPER_PARAMS = {
    "svhn": (106_922, 349_364, 1_245_886),
    "stl10": (998_218, 2_253_140, 5_979_486),
    "unimib": (284_360, 1_182_928, 4_729_048),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_tiers(name):
    spec = SPECS[name]
    full = build_model(name)
    names = list(full.state_dict())
    assert len(names) == len(set(names))  # each tensor registered once
    # state-dict tensors are distinct storage (no module registered twice under two names)
    ptrs = [t.data_ptr() for t in full.state_dict().values() if t.numel() > 1]
    assert len(ptrs) == len(set(ptrs))
    x = torch.randn(3, *spec.input_shape)
    for tier in range(1, NUM_BLOCKS + 1):
        m = MODELS[name](depth=tier)
        out = m.eval()(x)
        assert len(out) == tier and all(o.shape == (3, spec.num_classes) for o in out)
        # a tier allocates exactly the layers it runs, under the global names
        assert set(m.state_dict()) == set(tier_state(full.state_dict(), tier))
        assert all(depth_of(k) <= tier for k in m.state_dict())
    # the same weights give the same shallow logits whatever the tier
    full.eval()
    shallow = build_model(name, depth=1).eval()
    shallow.load_state_dict(tier_state(full.state_dict(), 1))
    torch.testing.assert_close(shallow(x)[0], full(x)[0])


@pytest.mark.parametrize("name", list(PAPER_PARAMS))
def test_paper_parameter_counts(name):
    counts = tuple(param_count(build_model(name, depth=t)) for t in (1, 2, 3))
    assert counts == PAPER_PARAMS[name]


def test_accelerometer_view_drops_last_sample_per_axis():
    m = build_model("unimib", depth=1)
    x = torch.arange(2 * 3 * 151, dtype=torch.float32).reshape(2, 3, 151)
    img = m.view(x)
    assert img.shape == (2, 1, 18, 25)
    expected = x[:, :, :150].reshape(2, 450)
    assert torch.equal(img.reshape(2, 450), expected)
    assert img[0, 0, 6, 0] == 151  # row 6 starts the y axis (150 samples per axis, 25 a row)


def test_macs_count_convs_and_heads():
    m = build_model("svhn", depth=1)
    # stem 3->32 and 32->32 at 32x32, block 1 32->64 and 64->64 at 16x16, head 4096->10
    expected = (3 * 32 * 9 + 32 * 32 * 9) * 1024 + (32 * 64 * 9 + 64 * 64 * 9) * 256 + 4096 * 10
    assert macs_per_sample(m) == expected


def test_width_fraction_scales_channels():
    m = build_model("svhn", width_fraction=0.5)
    assert m.stem.conv1.out_channels == 16 and m.blocks[2].conv2.out_channels == 128
    assert m(torch.randn(2, 3, 32, 32))[2].shape == (2, 10)


def test_models_cli_json_matches_paper():
    out = CliRunner().invoke(hmf, ["models", "--json", "--model", "svhn", "--model", "stl10",
                                   "--model", "unimib"])
    assert out.exit_code == 0, out.output
    for line in out.output.strip().splitlines():
        row = json.loads(line)
        assert tuple(t["params"] for t in row["tiers"]) == PAPER_PARAMS[row["model"]]
        assert [t["tier"] for t in row["tiers"]] == [1, 2, 3]
        assert all(t["bytes"] > 4 * t["params"] for t in row["tiers"])  # + BN running stats
