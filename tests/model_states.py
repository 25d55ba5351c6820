"""Model states for tests that compare exported graphs with torch."""

import torch

from common.models import build_model


def perturbed_state(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with BatchNorm statistics far from the identity, so that folding BatchNorm
    into the convolutions is really exercised."""
    torch.manual_seed(seed)
    model = build_model(name)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.2)
                m.bias.normal_(0, 0.2)
    return model.state_dict()
