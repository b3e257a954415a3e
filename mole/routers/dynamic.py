"""DynMoLE hybrid routing (Li et al. 2025, "DynMoLE", eq. 9 and 17-18).

``p = softmax(W_g x)``. Each token's Tsallis entropy ``S_q(p) = (1 - sum_i p_i^q) / (q - 1)`` decides its
routing: above ``threshold`` the router is uncertain and the token goes to every expert (soft routing,
gates = p); otherwise top-p routing, but never fewer than ``keep_top_k`` experts, renormalised. Defaults
are the paper's (Table 3 / Fig. 4): q = 1.1, threshold 0.9, top_p 0.75, keep_top_k 2.

Raw or normalised entropy (``normalized_entropy``): eq. 17 compares ``S(x) = S_q(R(x))`` with
``H_threshold`` and eq. 9 has no normalisation, but the authors' released code divides the entropy by its
maximum ``(1 - E^(1-q)) / (q - 1)`` (and skips soft routing unless ``threshold < 1``), and the paper's
threshold grid (Fig. 4c, 0.7 to 0.95) only makes sense on that scale: with E = 6 and q = 1.1 the largest
raw entropy is about 1.64, so a raw threshold of 0.9 sends a token to all experts once its mass is spread
over more than about 2.6 equally likely experts, and at q = 2 (max 0.83) no token ever passes a raw 0.9.
So the default is the normalised entropy (``normalized_entropy=True``); ``False`` is eq. 17 read
literally. NOTE(deviation): the released code adds 1e-5 to every probability before taking the entropy;
mole does not (the difference is measured in docs/reference-differences.md).

Top-p branch (``top_p_keep_crossing``, ``renormalize``): the paper's top-p (eq. 7, after Huang et al.
2024) keeps the expert that carries the sum across p; the paper does not say whether the kept
probabilities are renormalised, and mole renormalises them as its top-p router does. The released code
drops that expert (``cumsum <= top_p``) and uses the kept probabilities as they are. Defaults: mole's
reading of the paper (keep, renormalise).

The number of experts varies per token; the balance loss counts the slots from the chosen set, a soft
token taking one slot on every expert (``BalanceStats.k = None``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mole.routers.base import BalanceStats, LinearGate, RouterOutput
from mole.routers.select import Dynamic


class DynamicRouter(LinearGate):
    """Entropy-switched soft / top-p routing (DynMoLE eq. 17-18).

    Args:
        in_features: width of the token features the router reads.
        num_experts: number of experts E (at least ``keep_top_k``).
        q: Tsallis entropic index (> 0; 1 is Shannon).
        threshold: entropy above which a token is routed to all experts.
        top_p: top-p target for the other tokens, in (0, 1].
        keep_top_k: the least number of experts a top-p token uses.
        normalized_entropy: compare the entropy divided by its maximum (in [0, 1]) with ``threshold``.
        top_p_keep_crossing: keep the expert that carries the top-p sum across ``top_p``.
        renormalize: divide the top-p branch's kept probabilities by their sum.
        dropout: dropout on the router's input.
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        q: float = 1.1,
        threshold: float = 0.9,
        top_p: float = 0.75,
        keep_top_k: int = 2,
        normalized_entropy: bool = True,
        top_p_keep_crossing: bool = True,
        renormalize: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__(in_features, num_experts, dropout)
        self.selection = Dynamic(num_experts, q, threshold, top_p, keep_top_k, normalized_entropy,
                                 top_p_keep_crossing, renormalize)

    def forward(self, x: Tensor) -> RouterOutput:
        probs = torch.softmax(self.logits(x), dim=-1)  # (N, E)
        gates, selected = self.selection(probs)  # (N, E), (N, E)
        return RouterOutput(gates=gates, probs=probs, selected=selected, balance=[BalanceStats(probs, selected, None)])
