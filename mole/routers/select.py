"""Selection functions on router probability rows, shared by the routers (all vectorised, no host syncs).

* :func:`keep_top_p` — top-p routing (Huang et al. 2024; DynMoLE eq. 7).
* :func:`tsallis_entropy`, :func:`max_tsallis_entropy` — Tsallis entropy (DynMoLE eq. 9; Shannon at q=1).
* :func:`dynamic_select` — DynMoLE's entropy-switched hybrid routing (eq. 17-18).
* :func:`threshold_select` — threshold routing (Sparse MoA eq. 4-5, AdaMoLE).
* ``check_*`` — argument validation that names the config key.
* :class:`TopK`, :class:`Soft`, :class:`TopP`, :class:`Dynamic` — the selection rules as objects, shared by
  the plain routers and MoR/CRW's ``router.selection``.

Top-k lives in :func:`mole.routers.base.keep_top_k`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mole.routers.base import check_renorm, check_top_k, keep_top_k
from mole.utils.errors import MoleConfigError

# Prefix sums are compared with p up to this slack: a prefix that reaches p up to fp32 rounding of the
# cumulative sum (e.g. 0.5 + 0.3 against p = 0.8) counts as reaching it.
TOP_P_TOLERANCE = 1e-6
# Smallest probability fed to log (Shannon entropy), so that 0 * log 0 = 0 with a finite gradient.
_TINY = 1e-30


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_flag(value: object, key: str) -> None:
    """Reject a switch that is not ``true`` or ``false``."""
    if not isinstance(value, bool):
        raise MoleConfigError(f"{key} must be true or false, got {value!r}")


def check_top_p(top_p: float, key: str = "router.top_p") -> None:
    """Reject a top-p outside ``(0, 1]``."""
    if not _is_number(top_p) or not 0.0 < top_p <= 1.0:
        raise MoleConfigError(f"{key} must be in (0, 1], got {top_p!r}")


def check_q(q: float, key: str = "router.q") -> None:
    """Reject a Tsallis entropic index that is not a positive number."""
    if not _is_number(q) or q <= 0:
        raise MoleConfigError(f"{key} (the Tsallis entropic index) must be a positive number, got {q!r}")


def check_threshold(threshold: float, key: str = "router.threshold") -> None:
    """Reject an entropy threshold that is not a non-negative number."""
    if not _is_number(threshold) or threshold < 0:
        raise MoleConfigError(f"{key} must be a non-negative number, got {threshold!r}")


def check_keep_top_k(keep_top_k: int, num_experts: int, key: str = "router.keep_top_k") -> None:
    """Reject a minimum expert count that is not a positive integer or exceeds the experts of a layer."""
    if keep_top_k is None:
        raise MoleConfigError(f"{key} must be a positive integer, got None")
    check_top_k(keep_top_k, num_experts, key=key)


def keep_top_p(
    probs: Tensor, p: float, min_k: int = 1, keep_crossing: bool = True, renormalize: bool = True
) -> tuple[Tensor, Tensor]:
    """Top-p routing: keep the smallest prefix of the sorted probabilities whose sum reaches ``p``.

    Huang et al. 2024 ("Harder Tasks Need More Experts"); DynMoLE eq. 7. The probabilities are sorted in
    descending order; the expert at rank r is kept iff the sum of the ranks before it is still below ``p``
    (so the expert whose probability carries the sum across ``p`` is kept), or ``r < min_k``. The kept
    probabilities are renormalised by their sum.

    ``keep_crossing=False`` keeps rank r iff the sum *up to and including* it is at most ``p``, so the
    expert that carries the sum across ``p`` is dropped (DynMoLE's released code: ``cumsum <= top_p``).
    ``renormalize=False`` leaves the kept probabilities as they are (also the released code's rule).

    Rules where the definition is silent:

    * a prefix that reaches ``p`` up to fp32 rounding (``TOP_P_TOLERANCE``) counts as reaching it:
      ``[0.5, 0.3, ...]`` with ``p = 0.8`` keeps 2 experts;
    * ties are broken by expert index (stable sort: the lower index ranks first), so the *number* kept does
      not depend on the tie order and the chosen set is deterministic;
    * ``p = 1`` keeps every expert.

    Args:
        probs: ``(N, M)`` probabilities (rows sum to 1).
        p: cumulative-probability target in ``(0, 1]``.
        min_k: never keep fewer than this many (DynMoLE's Keep-Top-k, eq. 18).
        keep_crossing: keep the expert whose probability carries the sum across ``p``.
        renormalize: divide the kept probabilities by their sum.

    Returns:
        ``(weights, selected)``: ``(N, M)`` weights, exactly 0 outside the kept set, and the
        ``(N, M)`` bool mask of kept entries.
    """
    m = probs.shape[-1]
    if p >= 1.0 or min_k >= m:
        selected = torch.ones_like(probs, dtype=torch.bool)  # (N, M)
    else:
        sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)  # (N, M), (N, M)
        upto = sorted_p.cumsum(dim=-1)  # (N, M) inclusive prefix sums
        rank = torch.arange(m, device=probs.device)  # (M,)
        if keep_crossing:
            before = F.pad(upto[..., :-1], (1, 0))  # (N, M) exclusive prefix sums
            in_prefix = before < p - TOP_P_TOLERANCE
        else:
            in_prefix = upto <= p + TOP_P_TOLERANCE
        keep_sorted = in_prefix | (rank < min_k)  # (N, M) in sorted order
        selected = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)  # (N, M) in expert order
    # the kept probabilities (finite, so the product is where(selected, probs, 0)): one operation forward
    # and one backward, against where's zeros, scalar and second where
    weights = probs * selected  # (N, M)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(_TINY)
    return weights, selected


def shannon_entropy(probs: Tensor) -> Tensor:
    """Shannon entropy (natural log) of each row of ``probs`` ``(..., M)``, in fp32; ``0 log 0 = 0``."""
    p = probs.float()
    return -(p * p.clamp_min(_TINY).log()).sum(dim=-1)


def balance_and_certainty(probs: Tensor) -> tuple[Tensor, Tensor]:
    """``(H(mean_n g_n), mean_n H(g_n))`` of gate rows ``(N, E)`` (HMoRA eq. 10; its Fig. 3 statistics)."""
    return shannon_entropy(probs.float().mean(dim=0)), shannon_entropy(probs).mean()


def tsallis_entropy(probs: Tensor, q: float) -> Tensor:
    """Tsallis entropy of each row, ``S_q(p) = (1 - sum_i p_i^q) / (q - 1)`` (DynMoLE eq. 9), in fp32.

    At ``q = 1`` it is the Shannon entropy ``-sum_i p_i log p_i`` (the limit, DynMoLE eq. 32), with
    ``0 log 0 = 0``.

    Args:
        probs: ``(N, M)`` probabilities.
        q: entropic index, > 0.

    Returns:
        ``(N,)`` entropies.
    """
    if q == 1:
        return shannon_entropy(probs)
    p = probs.float()
    return (1.0 - p.pow(q).sum(dim=-1)) / (q - 1.0)


def max_tsallis_entropy(num_experts: int, q: float) -> float:
    """The largest Tsallis entropy over ``M`` outcomes, reached at the uniform distribution.

    ``(1 - M^(1-q)) / (q - 1)``; ``log M`` at ``q = 1``. E.g. ``M = 6, q = 1.1``: about 1.641.
    """
    if q == 1:
        return math.log(num_experts)
    return (1.0 - num_experts ** (1.0 - q)) / (q - 1.0)


def dynamic_select(
    probs: Tensor,
    q: float,
    threshold: float,
    top_p: float,
    keep_top_k: int,
    normalized: bool = False,
    keep_crossing: bool = True,
    renormalize: bool = True,
) -> tuple[Tensor, Tensor]:
    """DynMoLE hybrid routing (eq. 17-18), token by token.

    * ``S_q(p) > threshold``: soft routing, every expert with its probability (eq. 17, first case);
    * otherwise ``Top_(p,k)``: top-p, but never fewer than ``keep_top_k`` experts, renormalised.

    NOTE(deviation): eq. 18 literally switches to Top-k when ``p_(j) < p_(k)`` with ``p_(j)`` the last
    probability top-p keeps, i.e. when top-p keeps *more* than k experts, which contradicts the text around
    it ("Top_k ensures that at least k experts are selected", Sec. 5.3.2 "Keep-Top-k means the minimum
    number of activated experts"). We follow the text: the kept set is the top ``max(j, keep_top_k)``
    experts (the larger of the top-p and top-k sets).

    Args:
        probs: ``(N, M)`` probabilities (rows sum to 1).
        q: Tsallis entropic index.
        threshold: entropy above which a token is routed softly.
        top_p: the top-p target.
        keep_top_k: the least number of experts in the top-p branch.
        normalized: compare ``S_q / max S_q`` (in [0, 1]) with the threshold instead of ``S_q``.
        keep_crossing, renormalize: the top-p branch's rules (:func:`keep_top_p`).

    Returns:
        ``(gates, selected)``: ``(N, M)`` gates (exactly 0 outside the chosen set) and bool mask (a soft
        token selects every expert).
    """
    if torch.compiler.is_compiling() or probs.dim() != 2:
        return dynamic_select_reference(probs, q, threshold, top_p, keep_top_k, normalized, keep_crossing, renormalize)
    # eager: the same gates and mask, with a backward of its own in fewer dispatched operations
    return _DynamicGates.apply(probs, q, threshold, top_p, keep_top_k, normalized, keep_crossing, renormalize)


def _soft_rows(probs: Tensor, q: float, threshold: float, normalized: bool) -> Tensor:
    """``(N, 1)`` bool, the rows routed softly: ``S_q(p) > threshold`` (eq. 17), ``S_q / max S_q`` if ``normalized``."""
    entropy = tsallis_entropy(probs, q)  # (N,)
    if normalized:
        top = max_tsallis_entropy(probs.shape[-1], q)
        entropy = entropy / top if top > 0 else torch.zeros_like(entropy)
    return (entropy > threshold).unsqueeze(-1)


def dynamic_select_reference(
    probs: Tensor,
    q: float,
    threshold: float,
    top_p: float,
    keep_top_k: int,
    normalized: bool = False,
    keep_crossing: bool = True,
    renormalize: bool = True,
) -> tuple[Tensor, Tensor]:
    """:func:`dynamic_select` written with autograd's operations (compiled code, and the reference of the
    eager fast path :class:`_DynamicGates`)."""
    soft = _soft_rows(probs, q, threshold, normalized)  # (N, 1)
    sparse_gates, sparse_selected = keep_top_p(
        probs, top_p, min_k=keep_top_k, keep_crossing=keep_crossing, renormalize=renormalize
    )  # (N, M), (N, M)
    gates = torch.where(soft, probs, sparse_gates)  # (N, M)
    return gates, sparse_selected | soft


def _top_p_mask(probs: Tensor, p: float, min_k: int, keep_crossing: bool) -> Tensor:
    """:func:`keep_top_p`'s kept mask ``(N, M)`` in fewer operations: the ranks below ``min_k`` are set in
    place (no rank vector and no second compare), and the sorted mask goes back to expert order with one
    scatter into an uninitialised tensor (the sort order is a permutation: every entry is written)."""
    m = probs.shape[-1]
    if p >= 1.0 or min_k >= m:
        return torch.ones_like(probs, dtype=torch.bool)
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)  # (N, M), (N, M)
    upto = sorted_p.cumsum(dim=-1)  # (N, M) inclusive prefix sums
    if keep_crossing:
        keep_sorted = F.pad(upto[..., :-1], (1, 0)) < p - TOP_P_TOLERANCE  # exclusive prefix below p
    else:
        keep_sorted = upto <= p + TOP_P_TOLERANCE
    keep_sorted[..., :min_k] = True  # Keep-Top-k (eq. 18): never fewer than min_k
    return torch.empty_like(keep_sorted).scatter_(-1, order, keep_sorted)  # (N, M) in expert order


class _DynamicGates(torch.autograd.Function):
    """:func:`dynamic_select`'s ``(gates, selected)`` of ``(N, M)`` probabilities with a backward of its own.

    Forward: the entropy switch (eq. 17) and the top-p mask with Keep-Top-k (eq. 18) as in the reference
    (:func:`dynamic_select_reference`: the same operations on the same values, so the same choices), the
    kept probabilities ``p 1[kept] / S`` (``S`` their sum; the top probability is always kept, so ``S > 0``
    for rows that sum to 1 and the reference's ``clamp_min`` never acts). Backward: a soft row passes the
    gradient through (``g = p``); a top-p row with renormalisation has the Jacobian of a softmax restricted
    to the kept set, ``dL/dp = 1[kept] / S * (dL/dg - <g, dL/dg>)``; without it, ``dL/dp = 1[kept] dL/dg``.
    Four operations instead of autograd's where/division/clamp chain.
    """

    @staticmethod
    def forward(ctx, probs: Tensor, q: float, threshold: float, top_p: float, keep_top_k: int, normalized: bool,
                keep_crossing: bool, renormalize: bool):
        soft = _soft_rows(probs, q, threshold, normalized)  # (N, 1)
        kept_mask = _top_p_mask(probs, top_p, keep_top_k, keep_crossing)  # (N, M)
        kept = probs * kept_mask  # (N, M)
        if renormalize:
            factor = kept_mask / kept.sum(dim=-1, keepdim=True)  # (N, M) 1[kept] / S
            sparse = probs * factor
        else:
            factor, sparse = kept_mask, kept
        gates = torch.where(soft, probs, sparse)  # (N, M)
        selected = kept_mask | soft
        ctx.renormalize = renormalize
        ctx.mark_non_differentiable(selected)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(soft, factor, sparse if renormalize else None)
        return gates, selected

    @staticmethod
    def backward(ctx, grad: Tensor | None, _grad_selected: Tensor | None):
        if grad is None:
            return (None,) * 8
        soft, factor, sparse = ctx.saved_tensors
        if ctx.renormalize:
            dot = torch.bmm(sparse.unsqueeze(1), grad.unsqueeze(-1)).squeeze(-1)  # (N, 1) <g, dL/dg>
            from_sparse = (grad - dot) * factor
        else:
            from_sparse = grad * factor
        return (torch.where(soft, grad, from_sparse),) + (None,) * 7


def threshold_select(gates: Tensor, tau: Tensor | float, renorm: bool, subtract: bool = False) -> tuple[Tensor, Tensor]:
    """Threshold routing: expert i is kept iff ``g_i >= tau`` (Sparse MoA eq. 4; AdaMoLE).

    Kept experts keep their gate (MoA: "its weight is still used to control its influence"); with
    ``subtract`` they weigh ``g_i - tau`` instead (AdaMoLE's released implementation, which also gives the
    threshold network a gradient). With ``renorm`` the kept weights are divided by their sum (AdaMoLE,
    softmax gates). A token whose gates all fall below ``tau`` keeps no expert: its weights are all 0
    (the layer returns the frozen base output for it, as Sparse MoA intends for tokens that "require no
    expert intervention"); renormalisation then leaves the zeros as they are.

    Args:
        gates: ``(N, M)`` gate values (softmax probabilities or sigmoid scores).
        tau: the threshold, a float or ``(N, 1)`` per token.
        renorm: divide the kept weights by their sum.
        subtract: weigh a kept expert by ``g_i - tau`` instead of ``g_i``.

    Returns:
        ``(weights, selected)``, both ``(N, M)``; weights exactly 0 outside ``selected``.
    """
    selected = gates >= tau  # (N, M)
    weights = gates - tau if subtract else gates
    weights = weights * selected  # (N, M) where(selected, weights, 0) for finite weights, in one operation
    if renorm:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(_TINY)
    return weights, selected


# ------------------------------------------------------------------------------------- selections
# One selection rule each, as an object built once per router: the plain routers apply it to their softmax
# (TopPRouter, DynamicRouter; TopKRouter's fused softmax + top-k computes what TopK does), and MoR/CRW apply
# it to their combined expert scores F' (``router.selection``, conf/router/selection/). Built with the layer's
# expert count and the config key their errors name (``router`` for a plain router, ``router.selection``
# for MoR); called on ``(N, E)`` probability rows, they return ``(gates, selected)``, ``selected`` ``None``
# when every expert takes part with its probability (soft routing). ``slots`` is the experts kept per token,
# ``None`` where it varies by token (the balance loss then counts them from ``selected``).


class TopK:
    """The ``top_k`` most probable experts, renormalised by ``renorm`` (:func:`mole.routers.base.keep_top_k`;
    MoR eq. 2 / Algorithm 1 line 7 with ``"sum"``, HMoRA eq. 15 with ``"softmax"``)."""

    def __init__(self, num_experts: int, top_k: int = 2, renorm: str = "sum", key: str = "router"):
        if top_k is None:
            raise MoleConfigError(f"{key}.top_k must be a positive integer, got None "
                                  "(soft routing, every expert: router/selection=soft)")
        check_top_k(top_k, num_experts, key=f"{key}.top_k")
        check_renorm(renorm, key=f"{key}.renorm")
        self.top_k, self.renorm, self.slots = top_k, renorm, top_k

    def __call__(self, probs: Tensor) -> tuple[Tensor, Tensor]:
        return keep_top_k(probs, self.top_k, self.renorm)


class Soft:
    """Every expert with its probability (LoRAMoE; HMoRA eq. 14)."""

    slots = None

    def __init__(self, num_experts: int, key: str = "router"):
        pass

    def __call__(self, probs: Tensor) -> tuple[Tensor, None]:
        return probs, None


class TopP:
    """Top-p with at least ``keep_top_k`` experts (:func:`keep_top_p`; Huang et al. 2024, DynMoLE eq. 7)."""

    slots = None

    def __init__(
        self,
        num_experts: int,
        top_p: float = 0.75,
        keep_top_k: int = 1,
        top_p_keep_crossing: bool = True,
        renormalize: bool = True,
        key: str = "router",
    ):
        check_top_p(top_p, key=f"{key}.top_p")
        check_keep_top_k(keep_top_k, num_experts, key=f"{key}.keep_top_k")
        check_flag(top_p_keep_crossing, f"{key}.top_p_keep_crossing")
        check_flag(renormalize, f"{key}.renormalize")
        self.top_p, self.keep_top_k = float(top_p), keep_top_k
        self.keep_crossing, self.renormalize = top_p_keep_crossing, renormalize

    def __call__(self, probs: Tensor) -> tuple[Tensor, Tensor]:
        return keep_top_p(probs, self.top_p, min_k=self.keep_top_k, keep_crossing=self.keep_crossing,
                          renormalize=self.renormalize)


class Dynamic(TopP):
    """DynMoLE's entropy-switched soft / top-p selection (:func:`dynamic_select`, eq. 17-18): a token whose
    Tsallis entropy exceeds ``threshold`` takes every expert, the others :class:`TopP` with at least
    ``keep_top_k`` (default 2, the paper's)."""

    def __init__(
        self,
        num_experts: int,
        q: float = 1.1,
        threshold: float = 0.9,
        top_p: float = 0.75,
        keep_top_k: int = 2,
        normalized_entropy: bool = True,
        top_p_keep_crossing: bool = True,
        renormalize: bool = True,
        key: str = "router",
    ):
        check_q(q, key=f"{key}.q")
        check_threshold(threshold, key=f"{key}.threshold")
        super().__init__(num_experts, top_p, keep_top_k, top_p_keep_crossing, renormalize, key=key)
        self.q, self.threshold, self.normalized_entropy = float(q), float(threshold), bool(normalized_entropy)

    def __call__(self, probs: Tensor) -> tuple[Tensor, Tensor]:
        return dynamic_select(probs, self.q, self.threshold, self.top_p, self.keep_top_k, self.normalized_entropy,
                              keep_crossing=self.keep_crossing, renormalize=self.renormalize)
