"""Mixture of Routers (MoR) and Consistent Routing Weighting (CRW).

Source: Xia et al., "Mixture of Routers", arXiv:2503.23362.

* ``n_routers`` sub-routers, each an independent Linear ``d_in -> E`` with its own softmax ``r^j``.
* MoR (eq. 5-6): a main router ``R = softmax(W_R x)`` over the sub-routers weighs them; the expert
  scores are ``F' = sum_j R^j / (sum_{j kept} R^j) * r^j`` over the sub-routers the main router keeps;
  then the top-k experts are chosen from ``F'`` and renormalised as in eq. 2 (Algorithm 1, line 7).
* CRW (eq. 7): every sub-router weighs ``1 / n_routers``; there is no main router.
* A load-balancing loss on the main router keeps sub-router use balanced (Sec. 3.2).

MoR is a plug-in: it replaces the router of any method, so the selection applied to the combined scores
``F'`` is the plugged method's (``select``):

* ``topk`` (default): the top-k experts, renormalised (MoLA + MoR); ``top_k=None`` keeps every expert.
* ``soft``: every expert with its score (LoRAMoE + MoR).
* ``topp``: top-p on ``F'`` (:func:`mole.routers.select.keep_top_p`), at least ``keep_top_k`` experts.
* ``dynamic``: DynMoLE's entropy-switched soft / top-p routing on ``F'``
  (:func:`mole.routers.select.dynamic_select`; ``q``, ``threshold``, ``top_p``, ``keep_top_k``,
  ``normalized_entropy`` as in :class:`mole.routers.dynamic.DynamicRouter`).

``keep_top_k=None`` takes each selection's own default: 1 for ``topp`` (plain top-p), 2 for ``dynamic``
(DynMoLE). ``F'`` is a mixture of distributions, so it sums to 1 like a softmax row.

Decisions where the paper is silent, marked NOTE(deviation) below:

* ``main_top_k=None`` (the default) keeps every sub-router, so eq. 6's denominator sums over all of them.
  Eq. 6 writes the sum up to k; set ``main_top_k`` to keep only the main router's top ones.
* The Switch balance loss (HMoRA eq. 17-19) on the main router counts, for ``F``, the main router's kept
  sub-routers. When it keeps all of them, ``F`` would be uniform and the loss a constant with no
  gradient, so ``F`` then counts each token's top-1 sub-router (Fedus et al.'s original top-1 form).
* The sub-routers are computed as one stacked Linear ``d_in -> n_routers * E``: the same parameters and
  initialisation distribution as ``n_routers`` separate Linears, in one matrix product; the main router's
  weight is concatenated to it in the forward, so MoR costs one router product like a single router.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mole.routers.base import BalanceStats, RouterOutput, check_renorm, check_top_k, keep_top_k
from mole.routers.select import (
    check_keep_top_k,
    check_q,
    check_threshold,
    check_top_p,
    dynamic_select,
    keep_top_p,
)
from mole.utils.dropout import ExpertDropout
from mole.utils.errors import MoleConfigError

SELECTS = ("topk", "soft", "topp", "dynamic")
# keep_top_k=None: the least number of experts each selection keeps by default
DEFAULT_KEEP_TOP_K = {"topp": 1, "dynamic": 2}


class MoRRouter(nn.Module):
    """Mixture of Routers over E experts.

    Args:
        in_features: width of the token features.
        num_experts: number of experts E.
        n_routers: number of sub-routers (the paper sweeps 2, 3, 4).
        top_k: experts kept per token from the combined scores (``select="topk"``); ``None`` keeps all.
        renorm: renormalisation of the kept top-k expert scores, ``"sum"`` or ``"softmax"``.
        main_top_k: sub-routers the main router keeps per token; ``None`` keeps all.
        expert_balance: also expose the expert choice to the balance loss (MoLA's own loss), besides
            the main router's choice of sub-routers.
        equal_weights: CRW (eq. 7): weigh sub-routers equally and build no main router.
        dropout: dropout on the routers' input.
        select: selection on the combined scores: ``"topk"``, ``"soft"``, ``"topp"`` or ``"dynamic"``.
        top_p: top-p target (``topp``, ``dynamic``).
        keep_top_k: least number of experts (``topp``, ``dynamic``); ``None`` for 1 (topp) / 2 (dynamic).
        q: Tsallis entropic index (``dynamic``).
        threshold: entropy above which a token goes to every expert (``dynamic``).
        normalized_entropy: compare the entropy divided by its maximum with ``threshold`` (``dynamic``).
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        n_routers: int = 2,
        top_k: int | None = 2,
        renorm: str = "sum",
        main_top_k: int | None = None,
        expert_balance: bool = False,
        equal_weights: bool = False,
        dropout: float = 0.0,
        select: str = "topk",
        top_p: float = 0.75,
        keep_top_k: int | None = None,
        q: float = 1.1,
        threshold: float = 0.9,
        normalized_entropy: bool = True,
    ):
        super().__init__()
        if not isinstance(n_routers, int) or n_routers < 1:
            raise MoleConfigError(f"router.n_routers must be a positive integer, got {n_routers!r}")
        if select not in SELECTS:
            raise MoleConfigError(f"router.select must be one of {list(SELECTS)}, got {select!r}")
        if select == "topk":
            check_top_k(top_k, num_experts)
            check_renorm(renorm)
            if top_k is None:
                select = "soft"  # top_k: null keeps every expert
        if select in DEFAULT_KEEP_TOP_K:
            keep_top_k = DEFAULT_KEEP_TOP_K[select] if keep_top_k is None else keep_top_k
            check_top_p(top_p)
            check_keep_top_k(keep_top_k, num_experts)
        if select == "dynamic":
            check_q(q)
            check_threshold(threshold)
        # stored as given: the keys of a selection that is not used are not checked
        self.select, self.top_p, self.keep_top_k = select, top_p, keep_top_k
        self.q, self.threshold, self.normalized_entropy = q, threshold, bool(normalized_entropy)
        if main_top_k is not None and not equal_weights:
            check_top_k(main_top_k, n_routers, key="router.main_top_k", of="router.n_routers")
        self.num_experts, self.n_routers = num_experts, n_routers
        self.top_k, self.renorm, self.main_top_k = top_k, renorm, main_top_k
        self.expert_balance, self.equal_weights = expert_balance, equal_weights
        self.dropout = ExpertDropout(dropout) if dropout > 0 else nn.Identity()
        # all sub-routers in one matmul: (d_in) -> (n_routers * E)
        self.sub_routers = nn.Linear(in_features, n_routers * num_experts, bias=False)
        self.main_router = None if equal_weights else nn.Linear(in_features, n_routers, bias=False)

    def forward(self, x: Tensor) -> RouterOutput:
        n, R, E = x.shape[0], self.n_routers, self.num_experts
        x = self.dropout(x)
        if self.main_router is None:
            sub_logits = self.sub_routers(x)  # (N, R*E)
        else:
            # the sub-routers and the main router read the same x: one matrix product for both
            fused = torch.cat([self.sub_routers.weight, self.main_router.weight])  # (R*E + R, d_in)
            sub_logits, main_logits = F.linear(x, fused).split([R * E, R], dim=-1)  # (N, R*E), (N, R)
        # each sub-router's own distribution over experts
        sub_probs = torch.softmax(sub_logits.float().view(n, R, E), dim=-1)  # (N, R, E)
        balance: list[BalanceStats] = []
        if self.equal_weights:
            # CRW, eq. 7: F' = sum_j (1/R) r^j
            scores = sub_probs.mean(dim=1)  # (N, E)
        else:
            main_probs = torch.softmax(main_logits.float(), dim=-1)  # (N, R), eq. 5
            if self.main_top_k is None or self.main_top_k == R:
                weights = main_probs  # eq. 6 over all sub-routers (their weights already sum to 1)
                # NOTE(deviation): top-1 slot for the balance loss, see the module docstring; each token's top
                # sub-router (N, 1), its mask built only where read (the balance loss counts from the index)
                balance.append(BalanceStats(main_probs, None, 1, index=main_probs.argmax(dim=-1, keepdim=True)))
            else:
                weights, chosen = keep_top_k(main_probs, self.main_top_k, "sum")  # eq. 6
                balance.append(BalanceStats(main_probs, chosen, self.main_top_k))
            # (N, E), eq. 6; a broadcast product and a sum over the R sub-routers, cheaper than einsum's
            # batched matrix product of (1 x R) by (R x E) per token
            scores = (weights.unsqueeze(-1) * sub_probs).sum(dim=1)
        if self.select == "soft":
            return RouterOutput(gates=scores, probs=scores, balance=balance)
        k = None  # slots per token vary for topp / dynamic
        if self.select == "topk":
            gates, selected = keep_top_k(scores, self.top_k, self.renorm)  # (N, E), Algorithm 1 line 7
            k = self.top_k
        elif self.select == "topp":
            gates, selected = keep_top_p(scores, self.top_p, min_k=self.keep_top_k)  # (N, E)
        else:
            gates, selected = dynamic_select(
                scores, self.q, self.threshold, self.top_p, self.keep_top_k, self.normalized_entropy
            )  # (N, E)
        if self.expert_balance or self.equal_weights:
            balance.append(BalanceStats(scores, selected, k))
        return RouterOutput(gates=gates, probs=scores, selected=selected, balance=balance)


def CRWRouter(  # noqa: N802 - a constructor, named like the class it builds for `_target_`
    in_features: int,
    num_experts: int,
    n_routers: int = 2,
    top_k: int | None = 2,
    renorm: str = "sum",
    dropout: float = 0.0,
    select: str = "topk",
    top_p: float = 0.75,
    keep_top_k: int | None = None,
    q: float = 1.1,
    threshold: float = 0.9,
    normalized_entropy: bool = True,
) -> MoRRouter:
    """Consistent Routing Weighting (MoR eq. 7): a :class:`MoRRouter` whose sub-routers weigh equally.

    With no main router, the balance loss (if configured) acts on the expert choice, as in the method
    CRW plugs into (MoLA's top-k balance loss). ``select`` and its keys as in :class:`MoRRouter`.
    """
    return MoRRouter(
        in_features,
        num_experts,
        n_routers=n_routers,
        top_k=top_k,
        renorm=renorm,
        equal_weights=True,
        dropout=dropout,
        select=select,
        top_p=top_p,
        keep_top_k=keep_top_k,
        q=q,
        threshold=threshold,
        normalized_entropy=normalized_entropy,
    )
