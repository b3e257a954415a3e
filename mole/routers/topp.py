"""Top-p routing (Huang et al. 2024, "Harder Tasks Need More Experts"; DynMoLE eq. 7).

``p = softmax(W_g x)``; sort ``p`` and keep the smallest prefix whose cumulative sum reaches ``top_p``,
so confident tokens use few experts and uncertain ones more; the kept probabilities are renormalised by
their sum. The number of experts varies per token, so the balance loss counts the slots from the chosen
set (``BalanceStats.k = None``). Rounding, tie and ``top_p = 1`` rules: :func:`mole.routers.select.keep_top_p`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mole.routers.base import BalanceStats, LinearGate, RouterOutput
from mole.routers.select import TopP


class TopPRouter(LinearGate):
    """Sparse softmax routing to the most probable experts until their probability reaches ``top_p``.

    Args:
        in_features: width of the token features the router reads.
        num_experts: number of experts E.
        top_p: cumulative-probability target in (0, 1]. Default 0.75, the best value of DynMoLE's top-p
            sweep for MoLE fine-tuning (DynMoLE Fig. 4d; its "DynMoLE (Top-p)" baseline).
        keep_top_k: never fewer experts than this (1: plain top-p, DynMoLE's top-p baseline).
        top_p_keep_crossing: keep the expert whose probability carries the sum across ``top_p`` (Huang et
            al. 2024's definition); ``False`` drops it (DynMoLE's released code, ``cumsum <= top_p``).
        renormalize: divide the kept probabilities by their sum; ``False`` uses them as they are
            (DynMoLE's released code).
        dropout: dropout on the router's input.
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        top_p: float = 0.75,
        keep_top_k: int = 1,
        top_p_keep_crossing: bool = True,
        renormalize: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__(in_features, num_experts, dropout)
        self.selection = TopP(num_experts, top_p, keep_top_k, top_p_keep_crossing, renormalize)

    def forward(self, x: Tensor) -> RouterOutput:
        probs = torch.softmax(self.logits(x), dim=-1)  # (N, E)
        gates, selected = self.selection(probs)  # (N, E), (N, E)
        return RouterOutput(gates=gates, probs=probs, selected=selected, balance=[BalanceStats(probs, selected, None)])
