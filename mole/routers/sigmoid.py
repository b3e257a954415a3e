"""Sigmoid routing (Soft MoA, Cao et al. 2025, eq. 2-3): ``g = sigmoid(W_g x)``, every expert active.

Each gate lies in (0, 1) independently: no normalisation across experts, so experts cooperate rather than
compete (MoA Sec. 3.1). MoA uses no load-balancing loss, and the gates are not a distribution, so the
router exposes nothing to balance; ``probs`` holds the sigmoid scores themselves.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mole.routers.base import LinearGate, RouterOutput


class SigmoidRouter(LinearGate):
    """Independent sigmoid gate per expert.

    Args:
        in_features: width of the token features the router reads.
        num_experts: number of experts E.
        dropout: dropout on the router's input.
    """

    def forward(self, x: Tensor) -> RouterOutput:
        gates = torch.sigmoid(self.logits(x))  # (N, E), eq. 2
        return RouterOutput(gates=gates, probs=gates)
