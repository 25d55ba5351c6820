"""The multi-exit VGG family of HypeMeFed, one builder per dataset, in a registry.

A model of depth k holds the stem, blocks 1..k and exit heads 1..k, and nothing else: tier k of
the global model *is* ``build_model(name, depth=k)``. Parameter names are identical across
depths (``blocks.1.conv1.weight`` is the same tensor in tier 2 and tier 3), so converting between
a tier's state and the global state is a matter of selecting names (``tier_state``).

Every module is registered exactly once, so each tensor has exactly one name in the state dict
(the authors' release registered exit blocks twice and averaged them twice).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

NUM_BLOCKS = 3  # exit blocks after the stem; tiers are 1..NUM_BLOCKS


@dataclass(frozen=True)
class ModelSpec:
    """What fixes a multi-exit VGG: input layout, widths and classes."""

    name: str
    input_shape: tuple[int, ...]  # shape of one sample as the data holds it
    image_shape: tuple[int, int, int]  # (C, H, W) the stem sees
    widths: tuple[int, int, int, int]  # stem, block 1, block 2, block 3
    num_classes: int
    class_names: tuple[str, ...] = ()
    width_fraction: float = 1.0  # < 1 for HeteroFL's width-scaled submodels

    def channels(self) -> tuple[int, ...]:
        return tuple(max(1, math.ceil(w * self.width_fraction)) for w in self.widths)


class ConvBlock(nn.Module):
    """Two 3x3 conv + BatchNorm + ReLU, then 2x2 max-pool."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.pool(torch.relu(self.bn2(self.conv2(x))))


class ExitHead(nn.Module):
    """Flatten (no pooling), dropout 0.5, linear, as the authors' exits."""

    def __init__(self, features: int, num_classes: int) -> None:
        super().__init__()
        self.dropout = nn.Dropout(0.5)
        self.fc = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(torch.flatten(x, 1)))


class InputView(nn.Module):
    """Turns a raw sample into the stem's image. Accelerometer windows (3 x 151) drop their last
    sample on each axis and are read row-major as 1 x 18 x 25, as the authors did for UniMiB."""

    def __init__(self, input_shape: tuple[int, ...], image_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.reshape = tuple(input_shape) != tuple(image_shape)
        self.image_shape = image_shape
        self.keep = math.prod(image_shape) // input_shape[0] if self.reshape else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.reshape:
            return x
        return x[:, :, : self.keep].reshape(x.shape[0], *self.image_shape)


def _spatial_after(hw: tuple[int, int], pools: int) -> tuple[int, int]:
    h, w = hw
    for _ in range(pools):
        h, w = h // 2, w // 2
    return h, w


class MultiExitVGG(nn.Module):
    """Stem + ``depth`` exit blocks; ``forward`` returns the logits of every exit, shallow first."""

    def __init__(self, spec: ModelSpec, depth: int = NUM_BLOCKS) -> None:
        super().__init__()
        if not 1 <= depth <= NUM_BLOCKS:
            raise ValueError(f"depth must be 1..{NUM_BLOCKS}, got {depth}")
        self.spec, self.depth = spec, depth
        ch = spec.channels()
        self.view = InputView(spec.input_shape, spec.image_shape)
        self.stem = ConvBlock(spec.image_shape[0], ch[0])
        self.blocks = nn.ModuleList(ConvBlock(ch[i], ch[i + 1]) for i in range(depth))
        heads = []
        for i in range(depth):
            h, w = _spatial_after(spec.image_shape[1:], i + 2)
            heads.append(ExitHead(ch[i + 1] * h * w, spec.num_classes))
        self.heads = nn.ModuleList(heads)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(self.view(x))
        logits = []
        for block, head in zip(self.blocks, self.heads, strict=True):
            x = block(x)
            logits.append(head(x))
        return logits


# ---------------------------------------------------------------------------------------------
# Registry: keyword-only public builders over one private builder, as torchvision does.

_HAPT_CLASSES = ("WALKING", "WALKING_UPSTAIRS", "WALKING_DOWNSTAIRS", "SITTING", "STANDING",
                 "LAYING")
_UNIMIB_FALL = ("FallingForw", "FallingRight", "FallingBack", "HittingObstacle",
                "FallingWithPS", "FallingBackSC", "Syncope", "FallingLeft")
_UNIMIB_ADL = ("StandingUpFS", "StandingUpFL", "Walking", "Running", "GoingUpS", "Jumping",
               "GoingDownS", "LyingDownFS", "SittingDown")
_DIGITS = tuple(str(i) for i in range(10))
_CIFAR = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
          "truck")
_STL = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")

SMALL, LARGE = (32, 64, 128, 256), (64, 128, 256, 512)
ACC_WINDOW, ACC_IMAGE = (3, 151), (1, 18, 25)

SPECS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec("svhn", (3, 32, 32), (3, 32, 32), SMALL, 10, _DIGITS),
        ModelSpec("stl10", (3, 96, 96), (3, 96, 96), LARGE, 10, _STL),
        ModelSpec("unimib", ACC_WINDOW, ACC_IMAGE, LARGE, 8, _UNIMIB_FALL),
        ModelSpec("unimib_adl", ACC_WINDOW, ACC_IMAGE, LARGE, 9, _UNIMIB_ADL),
        ModelSpec("unimib_full", ACC_WINDOW, ACC_IMAGE, LARGE, 17, _UNIMIB_ADL + _UNIMIB_FALL),
        ModelSpec("cifar10", (3, 32, 32), (3, 32, 32), SMALL, 10, _CIFAR),
        ModelSpec("hapt", ACC_WINDOW, ACC_IMAGE, LARGE, 6, _HAPT_CLASSES),
        ModelSpec("mnist", (1, 28, 28), (1, 28, 28), SMALL, 10, _DIGITS),
    )
}


def _build(name: str, depth: int, width_fraction: float) -> MultiExitVGG:
    if name not in SPECS:
        raise KeyError(f"unknown model {name!r}; choose one of {', '.join(SPECS)}")
    return MultiExitVGG(replace(SPECS[name], width_fraction=width_fraction), depth)


def build_model(name: str, *, depth: int = NUM_BLOCKS, width_fraction: float = 1.0) -> MultiExitVGG:
    """The model ``name`` cut to ``depth`` exit blocks (tier ``depth``), optionally width-scaled."""
    return _build(name, depth, width_fraction)


MODELS: dict[str, Callable[..., MultiExitVGG]] = {
    name: (lambda n: lambda *, depth=NUM_BLOCKS, width_fraction=1.0: _build(n, depth,
                                                                           width_fraction))(name)
    for name in SPECS
}


# ---------------------------------------------------------------------------------------------
# Tiers and states

State = dict[str, torch.Tensor]


def depth_of(name: str) -> int:
    """The tier that first holds parameter ``name`` (0 for the stem)."""
    if name.startswith(("blocks.", "heads.")):
        return int(name.split(".")[1]) + 1
    return 0


def tier_state(state: State, tier: int) -> State:
    """The entries of a global state that a tier-``tier`` model holds, by name."""
    return {k: v for k, v in state.items() if depth_of(k) <= tier}


def param_count(model: nn.Module) -> int:
    """Trainable parameters (BatchNorm running buffers excluded, as in method.md's table)."""
    return sum(p.numel() for p in model.parameters())


def macs_per_sample(model: MultiExitVGG) -> int:
    """Multiply-accumulates of one forward pass through every exit the model holds."""
    total, (h, w) = 0, model.spec.image_shape[1:]
    for block in [model.stem, *model.blocks]:
        for conv in (block.conv1, block.conv2):
            total += conv.weight.numel() * h * w
        h, w = h // 2, w // 2
    return total + sum(head.fc.weight.numel() for head in model.heads)
