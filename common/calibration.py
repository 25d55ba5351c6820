"""BatchNorm statistics recomputed on local data (HeteroFL's "static BN"), one implementation for
the simulator (``cloud.aggregation.static_bn_statistics``, on participants' batches) and for a
device of a real fleet (``device/agent.py``, on its own train data, uploading only statistics).

With ``momentum=None`` a BatchNorm layer's running mean after k batches is the plain mean of its
k batch means (likewise the variance), so statistics computed on separate devices combine
exactly by a batch-weighted mean (``cloud/calibration.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from common.models import State, build_model

BATCH = 256  # samples per calibration batch, on the simulator and on devices alike
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def is_bn_statistic(name: str) -> bool:
    """Whether a state entry is a BatchNorm running statistic (``<layer>.running_mean``, ...)."""
    return name.rsplit(".", 1)[-1] in BN_BUFFERS


def bn_statistics_of(state: State) -> State:
    """The BatchNorm running statistics of ``state``: what a device uploads."""
    return {k: v for k, v in state.items() if is_bn_statistic(k)}


def batches(x: torch.Tensor, size: int = BATCH) -> Iterator[torch.Tensor]:
    """Consecutive batches of ``x`` in order (the last one may be smaller)."""
    for start in range(0, len(x), size):
        yield x[start : start + size]


@torch.no_grad()
def bn_statistics(model_name: str, state: State, data: Iterable[torch.Tensor]) -> State:
    """The BatchNorm running statistics of the full model ``state`` recomputed as their
    cumulative average over the batches of ``data`` (train-mode forward passes, no weight
    changes): on a device its own train data in ``batches``, on the simulator every
    participant's."""
    model = build_model(model_name)
    model.load_state_dict(state)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches, not an exponential one
    model.train()
    for batch in data:
        model(batch)
    return {k: v.detach().clone() for k, v in bn_statistics_of(model.state_dict()).items()}
