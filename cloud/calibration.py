"""Static BatchNorm in a real fleet: the cloud combines the statistics that devices computed on
their own data (``common.calibration.local_bn_statistics``); no data leaves a device.

A device's running mean of a layer after k batches (momentum None) is the mean of its k batch
means, so the mean over every participant's batches is the batch-weighted mean of the devices'
means: mean = sum_d k_d * mean_d / sum_d k_d, the same for the variance, and the batch count is
sum_d k_d. That is what the simulator's ``static_bn_statistics`` computes from all
participants' batches in one pass, up to float rounding (sums here are in float64).
"""

from __future__ import annotations

import torch

from common.calibration import bn_statistics_of
from common.models import State

COUNT = "num_batches_tracked"


def _layer(name: str) -> str:
    return name.rsplit(".", 1)[0]


class BnStatsSum:
    """Running batch-weighted sums of devices' statistics: memory is one float64 copy of the
    statistics, whatever the number of devices."""

    def __init__(self, reference: State) -> None:
        """``reference``: the aggregated global state whose statistics are being recomputed."""
        self.reference = reference
        self.sums: dict[str, torch.Tensor] = {}
        self.batches: dict[str, int] = {}  # by layer
        self.devices = 0

    def add(self, stats: State) -> None:
        """One device's statistics (validated by ``common.protocol.check_bn_statistics``)."""
        for name, t in stats.items():
            layer = _layer(name)
            if name.endswith(COUNT):
                self.batches[layer] = self.batches.get(layer, 0) + int(t)
                continue
            weighted = t.double() * int(stats[f"{layer}.{COUNT}"])
            self.sums[name] = self.sums[name] + weighted if name in self.sums else weighted
        self.devices += 1

    def result(self) -> State:
        """The reference with every layer's statistics combined; unchanged if nobody answered."""
        out = dict(self.reference)
        if not self.devices:
            return out
        for name, ref in bn_statistics_of(self.reference).items():
            layer = _layer(name)
            total = self.batches[layer]
            if name.endswith(COUNT):
                out[name] = torch.tensor(total, dtype=ref.dtype)
            else:
                out[name] = (self.sums[name] / total).to(ref.dtype)
        return out


def combine_bn_statistics(state: State, stats: list[State]) -> State:
    """``state`` with its BatchNorm statistics replaced by the combination of ``stats``."""
    acc = BnStatsSum(state)
    for s in stats:
        acc.add(s)
    return acc.result()
