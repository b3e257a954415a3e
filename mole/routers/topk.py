"""Top-k routing (MoLA, MixLoRA; MoR eq. 2 and HMoRA eq. 15-16).

``p = softmax(W_g x)``; keep the k largest entries of ``p``, set the rest to 0 and renormalise the kept
ones, either by their sum (MoR eq. 2, Mixtral; ``renorm="sum"``) or by a second softmax over them
(HMoRA eq. 15; ``renorm="softmax"``). The chosen set feeds the Switch-style balance loss (HMoRA eq. 17-19).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mole.routers.base import (
    BalanceStats,
    LinearGate,
    RouterOutput,
    check_renorm,
    check_top_k,
    kept_softmax,
    softmax_top_k,
)
from mole.utils.errors import MoleConfigError


class TopKRouter(LinearGate):
    """Sparse softmax routing to the k most probable experts.

    Args:
        in_features: width of the token features the router reads.
        num_experts: number of experts E (at least ``top_k``).
        top_k: experts per token.
        renorm: ``"sum"`` (MoR eq. 2) or ``"softmax"`` (HMoRA eq. 15).
        dropout: dropout on the router's input.
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        top_k: int = 2,
        renorm: str = "sum",
        dropout: float = 0.0,
    ):
        super().__init__(in_features, num_experts, dropout)
        if top_k is None:
            raise MoleConfigError("router.top_k must be set for router=topk (router=soft uses all experts)")
        check_top_k(top_k, num_experts)
        check_renorm(renorm)
        self.top_k, self.renorm = top_k, renorm

    def forward(self, x: Tensor) -> RouterOutput:
        # p = softmax(W_g x) and its top-k, renormalised: (N, E) each; the kept experts (N, k), whose mask
        # is built only where read (the balance loss counts the slots from the index)
        logits = self.logits(x)
        if self.renorm == "sum" and logits.dim() == 2 and not torch.compiler.is_compiling():
            # eager: p = softmax(logits) computed where read; the balance loss computes it for all routers of
            # a width in one softmax, whose backward joins the logits' gradient from the gates
            gates, index = kept_softmax(logits, self.top_k)  # (N, E), (N, k)
            return RouterOutput(
                gates=gates,
                probs=None,
                index=index,
                logits=logits,
                balance=[BalanceStats(None, None, self.top_k, index=index, logits=logits)],
            )
        probs, gates, index = softmax_top_k(logits, self.top_k, self.renorm)
        return RouterOutput(
            gates=gates,
            probs=probs,
            index=index,
            balance=[BalanceStats(probs, None, self.top_k, index=index)],
        )
