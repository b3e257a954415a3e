"""Soft routing: ``g = softmax(W_g x)``, every expert active (LoRAMoE, MoLoRA, HydraLoRA; HMoRA eq. 14)."""

from __future__ import annotations

import torch
from torch import Tensor

from mole.routers.base import LinearGate, RouterOutput


class SoftRouter(LinearGate):
    """Dense softmax mixture over all experts.

    Args:
        in_features: width of the token features the router reads.
        num_experts: number of experts E.
        dropout: dropout on the router's input (SPEC §2), 0 by default.
    """

    def forward(self, x: Tensor) -> RouterOutput:
        # softmax in fp32 whatever the activation dtype: gates feed the losses and analyses
        probs = torch.softmax(self.logits(x), dim=-1)  # (N, E)
        return RouterOutput(gates=probs, probs=probs)
