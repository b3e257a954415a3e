"""DynMoLE hybrid routing (Li et al. 2025, "DynMoLE", eq. 9 and 17-18).

``p = softmax(W_g x)``. Each token's Tsallis entropy ``S_q(p) = (1 - sum_i p_i^q) / (q - 1)`` decides its
routing: above ``threshold`` the router is uncertain and the token goes to every expert (soft routing,
gates = p); otherwise top-p routing, but never fewer than ``keep_top_k`` experts, renormalised. Defaults
are the paper's (Table 3 / Fig. 4): q = 1.1, threshold 0.9, top_p 0.75, keep_top_k 2.

Raw or normalised entropy (``normalized_entropy``): eq. 17 compares ``S(x) = S_q(R(x))`` itself with
``H_threshold``, and eq. 9 has no normalisation; the paper only speaks of "normalized entropy" for the
word-embedding plots of its appendix A.6. So the default (``normalized_entropy=False``) is the raw
entropy, as in the equations. The two readings differ a lot: with E = 6 and q = 1.1, the paper's setting,
the largest entropy is about 1.64, so a raw threshold of 0.9 sends a token to all experts once its mass
is spread over more than about 2.6 equally likely experts (S is 0.67 for two equal experts and 1.04 for
three), while a normalised 0.9 (raw 1.48) sends only nearly uniform tokens. With fewer experts the raw
threshold can exceed the maximum (0.67 at E = 2, 1.29 at E = 4): such layers never route softly, which is
harmless at E <= keep_top_k (top-p then keeps every expert anyway). ``normalized_entropy=True`` divides by
``(1 - E^(1-q)) / (q - 1)`` so one threshold means the same in layers with different numbers of experts.

The number of experts varies per token; the balance loss counts the slots from the chosen set, a soft
token taking one slot on every expert (``BalanceStats.k = None``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mole.routers.base import BalanceStats, LinearGate, RouterOutput
from mole.routers.select import check_keep_top_k, check_q, check_threshold, check_top_p, dynamic_select


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
        normalized_entropy: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__(in_features, num_experts, dropout)
        check_q(q)
        check_threshold(threshold)
        check_top_p(top_p)
        check_keep_top_k(keep_top_k, num_experts)
        self.q, self.threshold, self.top_p = float(q), float(threshold), float(top_p)
        self.keep_top_k, self.normalized_entropy = keep_top_k, bool(normalized_entropy)

    def forward(self, x: Tensor) -> RouterOutput:
        probs = torch.softmax(self.logits(x), dim=-1)  # (N, E)
        gates, selected = dynamic_select(
            probs, self.q, self.threshold, self.top_p, self.keep_top_k, self.normalized_entropy
        )  # (N, E), (N, E)
        return RouterOutput(gates=gates, probs=probs, selected=selected, balance=[BalanceStats(probs, selected, None)])
