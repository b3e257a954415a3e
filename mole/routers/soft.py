"""Soft routing: ``g = softmax(W_g x)``, every expert active (LoRAMoE, MoLoRA, HydraLoRA; HMoRA eq. 14)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mole.routers.base import RouterOutput


class SoftRouter(nn.Module):
    """Dense softmax mixture over all experts.

    Args:
        in_features: width of the token features the router reads.
        num_experts: number of experts E.
        dropout: dropout on the router's input (SPEC §2), 0 by default.
    """

    def __init__(self, in_features: int, num_experts: int, dropout: float = 0.0):
        super().__init__()
        self.num_experts = num_experts
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.gate = nn.Linear(in_features, num_experts, bias=False)

    def forward(self, x: Tensor) -> RouterOutput:
        # softmax in fp32 whatever the activation dtype: gates feed the losses and analyses
        probs = torch.softmax(self.gate(self.dropout(x)).float(), dim=-1)  # (N, E)
        return RouterOutput(gates=probs, probs=probs)
