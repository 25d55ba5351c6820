"""Static BatchNorm in a real fleet: the cloud combines the statistics that devices computed on
their own data (``common.calibration.bn_statistics``); no data leaves a device.

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

COUNT = ".num_batches_tracked"


class BnStatsSum:
    """Running batch-weighted sums of devices' statistics: memory is one float64 copy of the
    statistics, whatever the number of devices."""

    def __init__(self, reference: State) -> None:
        """``reference``: the aggregated global state whose statistics are being recomputed."""
        self.reference = reference
        self.sums: dict[str, torch.Tensor] = {}
        self.batches = 0  # over all devices
        self.devices = 0

    def add(self, stats: State) -> None:
        """One device's statistics, validated by ``common.protocol.check_bn_statistics``: every
        layer saw the same number of batches, the device's weight."""
        k = next(int(t) for name, t in stats.items() if name.endswith(COUNT))
        for name, t in stats.items():
            if not name.endswith(COUNT):
                weighted = t.double() * k
                self.sums[name] = self.sums[name] + weighted if name in self.sums else weighted
        self.batches += k
        self.devices += 1

    def result(self) -> State:
        """The reference with every layer's statistics combined; unchanged if nobody answered."""
        out = dict(self.reference)
        if not self.devices:
            return out
        for name, ref in bn_statistics_of(self.reference).items():
            out[name] = (torch.tensor(self.batches, dtype=ref.dtype) if name.endswith(COUNT)
                         else (self.sums[name] / self.batches).to(ref.dtype))
        return out


def combine_bn_statistics(state: State, stats: list[State]) -> State:
    """``state`` with its BatchNorm statistics replaced by the combination of ``stats``."""
    acc = BnStatsSum(state)
    for s in stats:
        acc.add(s)
    return acc.result()
