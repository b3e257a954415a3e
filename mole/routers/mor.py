"""Mixture of Routers (MoR) and Consistent Routing Weighting (CRW).

Source: Xia et al., "Mixture of Routers", arXiv:2503.23362.

* ``n_routers`` sub-routers, each an independent Linear ``d_in -> E`` with its own softmax ``r^j``.
* MoR (eq. 5-6): a main router ``R = softmax(W_R x)`` over the sub-routers weighs them; the expert
  scores are ``F' = sum_j R^j / (sum_{j kept} R^j) * r^j`` over the sub-routers the main router keeps;
  then the top-k experts are chosen from ``F'`` and renormalised as in eq. 2 (Algorithm 1, line 7).
* CRW (eq. 7): every sub-router weighs ``1 / n_routers``; there is no main router.
* A load-balancing loss on the main router keeps sub-router use balanced (Sec. 3.2).

MoR is a plug-in: it replaces the router of any method, so the selection applied to the combined scores
``F'`` is the plugged method's: ``selection``, one of the selection rules the plain routers use
(:mod:`mole.routers.select`; config group ``conf/router/selection/``):

* :class:`~mole.routers.select.TopK` (default, ``top_k: 2``, ``renorm: sum``): MoLA + MoR.
* :class:`~mole.routers.select.Soft`: every expert with its score (LoRAMoE + MoR).
* :class:`~mole.routers.select.TopP`: top-p on ``F'``, at least ``keep_top_k`` experts.
* :class:`~mole.routers.select.Dynamic`: DynMoLE's entropy-switched soft / top-p routing on ``F'``.

``F'`` is a mixture of distributions, so it sums to 1 like a softmax row.

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

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mole.routers.base import BalanceStats, RouterOutput, check_top_k, keep_top_k
from mole.routers.select import TopK
from mole.utils.dropout import ExpertDropout
from mole.utils.errors import MoleConfigError

# the selection when none is given: MoLA + MoR's top-2, renormalised by the sum (MoR eq. 2)
DEFAULT_SELECTION = partial(TopK, top_k=2, renorm="sum")


class MoRRouter(nn.Module):
    """Mixture of Routers over E experts.

    Args:
        in_features: width of the token features.
        num_experts: number of experts E.
        n_routers: number of sub-routers (the paper sweeps 2, 3, 4).
        main_top_k: sub-routers the main router keeps per token; ``None`` keeps all.
        expert_balance: also expose the expert choice to the balance loss (MoLA's own loss), besides
            the main router's choice of sub-routers.
        equal_weights: CRW (eq. 7): weigh sub-routers equally and build no main router.
        dropout: dropout on the routers' input.
        selection: the selection on the combined scores, a callable ``(num_experts, key=...)`` returning a
            selection rule of :mod:`mole.routers.select` (a class or a ``functools.partial`` of one, as
            Hydra builds ``router.selection``); ``None``: top-2, renormalised by the sum.
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        n_routers: int = 2,
        main_top_k: int | None = None,
        expert_balance: bool = False,
        equal_weights: bool = False,
        dropout: float = 0.0,
        selection: Callable | None = None,
    ):
        super().__init__()
        if not isinstance(n_routers, int) or n_routers < 1:
            raise MoleConfigError(f"router.n_routers must be a positive integer, got {n_routers!r}")
        make = DEFAULT_SELECTION if selection is None else selection
        if not callable(make):
            raise MoleConfigError("router.selection must be a selection config (conf/router/selection/: topk, soft, "
                                  f"topp, dynamic), got {selection!r}")
        self.selection = make(num_experts, key="router.selection")
        if main_top_k is not None and not equal_weights:
            check_top_k(main_top_k, n_routers, key="router.main_top_k", of="router.n_routers")
        self.num_experts, self.n_routers, self.main_top_k = num_experts, n_routers, main_top_k
        self.expert_balance, self.equal_weights = expert_balance, equal_weights
        self.dropout = ExpertDropout(dropout) if dropout > 0 else nn.Identity()
        # all sub-routers in one matmul: (d_in) -> (n_routers * E)
        self.sub_routers = nn.Linear(in_features, n_routers * num_experts, bias=False)
        self.main_router = None if equal_weights else nn.Linear(in_features, n_routers, bias=False)

    @property
    def top_k(self) -> int | None:
        """Experts kept per token when the selection keeps a fixed number (top-k), else ``None``."""
        return self.selection.slots

    def forward(self, x: Tensor) -> RouterOutput:
        n, R, E = x.shape[0], self.n_routers, self.num_experts
        x = self.dropout(x)
        balance: list[BalanceStats] = []
        if self.equal_weights:
            # CRW, eq. 7: F' = sum_j (1/R) r^j, each sub-router's own distribution over experts
            sub_probs = torch.softmax(self.sub_routers(x).float().view(n, R, E), dim=-1)  # (N, R, E)
            scores = sub_probs.mean(dim=1)  # (N, E)
            return self._select(scores, balance)
        # the sub-routers and the main router read the same x: one matrix product for both
        fused = torch.cat([self.sub_routers.weight, self.main_router.weight])  # (R*E + R, d_in)
        logits = F.linear(x, fused)  # (N, R*E + R)
        keep_all = self.main_top_k is None or self.main_top_k == R
        if keep_all and logits.dim() == 2 and not torch.compiler.is_compiling():
            # eager: eq. 5-6 as one autograd function with a shorter backward (compiled code fuses)
            scores, main_probs = _MixedRouters.apply(logits.float(), R, E)  # (N, E), (N, R)
        else:
            sub_logits, main_logits = logits.split([R * E, R], dim=-1)  # (N, R*E), (N, R)
            sub_probs = torch.softmax(sub_logits.float().view(n, R, E), dim=-1)  # (N, R, E)
            main_probs = torch.softmax(main_logits.float(), dim=-1)  # (N, R), eq. 5
            if keep_all:
                weights = main_probs  # eq. 6 over all sub-routers (their weights already sum to 1)
            else:
                weights, chosen = keep_top_k(main_probs, self.main_top_k, "sum")  # eq. 6
                balance.append(BalanceStats(main_probs, chosen, self.main_top_k))
            # (N, E), eq. 6; a broadcast product and a sum over the R sub-routers
            scores = (weights.unsqueeze(-1) * sub_probs).sum(dim=1)
        if keep_all:
            # NOTE(deviation): top-1 slot for the balance loss, see the module docstring; each token's top
            # sub-router (N, 1), its mask built only where read (the balance loss counts from the index)
            balance.append(BalanceStats(main_probs, None, 1, index=main_probs.argmax(dim=-1, keepdim=True)))
        return self._select(scores, balance)

    def _select(self, scores: Tensor, balance: list[BalanceStats]) -> RouterOutput:
        """The selection on the combined expert scores ``F'`` (N, E); Algorithm 1 line 7 for top-k."""
        gates, selected = self.selection(scores)  # (N, E) each
        if selected is None:  # soft: every expert with its score
            return RouterOutput(gates=gates, probs=scores, balance=balance)
        if self.expert_balance or self.equal_weights:
            balance.append(BalanceStats(scores, selected, self.selection.slots))
        return RouterOutput(gates=gates, probs=scores, selected=selected, balance=balance)


class _MixedRouters(torch.autograd.Function):
    """MoR eq. 5-6 with every sub-router kept: ``r^j = softmax(z_j)``, ``R = softmax(z_R)`` and
    ``F' = sum_j R^j r^j``, from the fused logits ``(N, R*E + R)`` (sub-routers' then the main router's).

    Returns ``(F', R)``: ``(N, E)`` and ``(N, R)``. The mixture is one batched product ``(1 x R) (R x E)`` per
    token. Backward: ``dL/dR = dL/dF' r^T (+ the gradient a loss sends to R)``, one ``baddbmm`` that also adds
    the balance loss's gradient; ``dL/dr^j = R^j dL/dF'``, one ``bmm``; then each softmax's own backward and one
    ``cat`` into the fused logits' layout (5 operations, against autograd's 7; the forward 3 against 4).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, n_routers: int, num_experts: int):
        n, R, E = logits.shape[0], n_routers, num_experts
        sub_logits, main_logits = logits.split([R * E, R], dim=-1)
        sub_probs = torch.softmax(sub_logits.view(n, R, E), dim=-1)  # (N, R, E) r^j
        main_probs = torch.softmax(main_logits, dim=-1)  # (N, R) eq. 5
        scores = torch.bmm(main_probs.unsqueeze(1), sub_probs).view(n, E)  # (N, E) eq. 6
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(sub_probs, main_probs)
        return scores, main_probs

    @staticmethod
    def backward(ctx, grad_scores: Tensor | None, grad_main: Tensor | None):
        sub_probs, main_probs = ctx.saved_tensors
        n, R, E = sub_probs.shape
        if grad_scores is None and grad_main is None:
            return None, None, None
        if grad_scores is None:
            grad_scores = torch.zeros(n, E, dtype=sub_probs.dtype, device=sub_probs.device)
        g = grad_scores.reshape(n, 1, E)
        # dL/dR (N, R): through F' (dL/dF' r^T) plus what the losses send to R directly
        if grad_main is None:
            grad_r = torch.bmm(g, sub_probs.transpose(1, 2))
        else:
            grad_r = torch.baddbmm(grad_main.unsqueeze(1), g, sub_probs.transpose(1, 2))
        grad_main_logits = torch._softmax_backward_data(grad_r.view(n, R), main_probs, -1, main_probs.dtype)
        grad_sub = torch.bmm(main_probs.view(n, R, 1), g)  # (N, R, E) dL/dr^j = R^j dL/dF'
        grad_sub_logits = torch._softmax_backward_data(grad_sub, sub_probs, -1, sub_probs.dtype)
        return torch.cat([grad_sub_logits.view(n, R * E), grad_main_logits], dim=-1), None, None


class CRWRouter(MoRRouter):
    """Consistent Routing Weighting (MoR eq. 7): a :class:`MoRRouter` whose sub-routers weigh equally
    (``equal_weights=True``; ``conf/router/crw.yaml`` is ``mor.yaml`` with that key set).

    With no main router, the balance loss (if configured) acts on the expert choice, as in the method
    CRW plugs into (MoLA's top-k balance loss).
    """

    def __init__(self, in_features: int, num_experts: int, **kwargs):
        super().__init__(in_features, num_experts, **{**kwargs, "equal_weights": True})
