"""DepthFL (Kim et al., "DepthFL: Depthwise Federated Learning for Heterogeneous Clients",
ICLR 2023): every client trains its own tier's depth, as ``depthwise``, and each tensor is
averaged over exactly the clients that trained it, by name. What DepthFL adds is the local loss,
mutual self-distillation among the exits a client holds (paper Eq. 1):

    L = sum_i [ CE(z_i, y) + w / (n - 1) * sum_{j != i} T^2 KL(p_j || p_i) ],
    p_k = softmax(z_k / T),

over the client's n exits, the teacher side p_j detached, with T = 1 and w = 1
(``common.training.mutual_distillation_loss``). A tier-1 client has one exit and trains plain
cross-entropy. T = 1 and the detached teacher are those of the authors' code as ported to the
Flower baselines (adap/flower, baselines/depthfl), which also adds 1e-7 to the teacher
probabilities (not needed here: the KL is computed from log-probabilities).

Left out, to compare aggregation and loss alone against ``depthwise``: the paper's default pairs
DepthFL with FedDyn regularisation, and that code ramps w up over the first 300 rounds
(w = exp(-5 (1 - r/300)^2)); Eq. 1 has a constant weight, which we use.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from cloud.strategies.base import Strategy
from common.training import TrainConfig


@dataclass
class DepthFL(Strategy):
    distill_weight: float = 1.0
    temperature: float = 1.0
    name: str = field(default="depthfl", init=False)

    def train_config(self, base: TrainConfig) -> TrainConfig:
        return replace(base, distill="mutual", distill_weight=self.distill_weight,
                       temperature=self.temperature)
