"""The torch modules that become ONNX graphs: one per exit, and one per segment.

ONNX Runtime evaluates a whole graph even when only one of its outputs is requested, so a single
multi-output graph would always pay for the deepest block. Instead:

* ``ExitGraph(k)`` holds the input view, the stem, blocks 1..k and head k only, so exit k costs
  exactly the blocks it needs (a device that stops at exit 1 never runs block 2).
* ``SegmentGraph(k)`` holds block k and head k (segment 1 also the view and the stem) and returns
  the block's features *and* the head's logits, so a device can run segment after segment and
  stop as soon as an exit is confident (``device.runtime``'s cascade).

Both are built from ``build_model(name, depth=k)`` loaded with the tier's state, so their
parameter names (``blocks.1.conv1.weight``) match the global model's.
"""

from __future__ import annotations

import torch
from torch import nn

from common.models import MultiExitVGG, State, build_model, tier_state


class ExitGraph(nn.Module):
    """Raw input -> logits of exit ``k``: view, stem, blocks 1..k, head k (no other head)."""

    def __init__(self, model: MultiExitVGG, k: int) -> None:
        super().__init__()
        if not 1 <= k <= model.depth:
            raise ValueError(f"exit {k} is not in a depth-{model.depth} model")
        self.k = k
        self.view, self.stem = model.view, model.stem
        self.blocks = nn.ModuleList(model.blocks[:k])
        self.head = model.heads[k - 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.view(x))
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class SegmentGraph(nn.Module):
    """Block ``k`` and head ``k`` (segment 1 also the view and the stem): -> (features, logits)."""

    def __init__(self, model: MultiExitVGG, k: int) -> None:
        super().__init__()
        if not 1 <= k <= model.depth:
            raise ValueError(f"segment {k} is not in a depth-{model.depth} model")
        self.k = k
        self.front = nn.Sequential(model.view, model.stem) if k == 1 else nn.Identity()
        self.block, self.head = model.blocks[k - 1], model.heads[k - 1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.block(self.front(x))
        return features, self.head(features)


def tier_model(name: str, state: State, tier: int) -> MultiExitVGG:
    """``build_model(name, depth=tier)`` holding the tier's part of a global ``state``, in eval
    mode (dropout off, BatchNorm on its running statistics), as it is deployed."""
    model = build_model(name, depth=tier)
    model.load_state_dict(tier_state(state, tier), strict=True)
    return model.eval()


def exit_graph(name: str, state: State, k: int) -> ExitGraph:
    """Exit ``k`` of the global model ``state``, built from the depth-k model."""
    return ExitGraph(tier_model(name, state, k), k).eval()


def segment_graph(name: str, state: State, k: int) -> SegmentGraph:
    """Segment ``k`` of the global model ``state``, built from the depth-k model."""
    return SegmentGraph(tier_model(name, state, k), k).eval()


def graph_params(module: nn.Module) -> int:
    """Trainable parameters a graph holds (BatchNorm running buffers excluded, as
    ``common.models.param_count``)."""
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def graph_macs(module: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates per sample of ``module``'s convolutions and linear layers, counted
    from the shapes of one forward pass (so segments and exits need no bookkeeping of their own).
    Uses the same convention as ``common.models.macs_per_sample``: weight size x output pixels."""
    total = 0

    def count(layer: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        pixels = output.shape[2] * output.shape[3] if isinstance(layer, nn.Conv2d) else 1
        total += layer.weight.numel() * pixels

    hooks = [m.register_forward_hook(count) for m in module.modules()
             if isinstance(m, nn.Conv2d | nn.Linear)]
    try:
        module(example[:1])
    finally:
        for h in hooks:
            h.remove()
    return total
