"""Auxiliary routing losses: pure functions of router statistics, plus the weighted terms the config builds.

The total objective is ``L = L_lm + sum_terms weight * reduce_routers L_term(router)``. Padding tokens are
excluded from every statistic. How each term aggregates over a model's routers is its ``reduce`` key:

* ``sum`` (default; HMoRA eq. 13 and its released code): ``sum_r L(r)``; the term grows with the number
  of routers R (e.g. R = 210 on SmolLM2-135M with 7 routed Linears per layer);
* ``mean``: ``(1/R) sum_r L(r)``; the weight is then per model, whatever R;
* ``pooled`` (DynMoLE's released code, Mixtral/MixLoRA's form): one statistic over the rows of every router
  together (routers with the same number of choices), as if they were one router.

Each term logs once, at its first call, its effective weight per router and in all, so a run's log shows
when the auxiliary terms can outweigh the language-modelling loss (the balance loss is 1 per router at
uniform routing: with ``sum`` over 210 routers and weight 0.01 the term is 2.1).
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor

from mole.routers.base import BalanceStats, RouterOutput, autocast_enabled
from mole.utils.errors import MoleConfigError

T = TypeVar("T")
log = logging.getLogger(__name__)

REDUCES = ("sum", "mean", "pooled")
BALANCE_REDUCES = (*REDUCES, "pooled_per_layer")
LOADS = ("slots", "mass")


def check_reduce(reduce: object, key: str, allowed: Sequence[str] = REDUCES) -> None:
    if reduce not in allowed:
        raise MoleConfigError(f"{key} must be one of {list(allowed)}, got {reduce!r}")


def check_weight(weight: object, key: str) -> None:
    ok = isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight)
    if not ok or weight < 0:
        raise MoleConfigError(f"{key} must be a non-negative number, got {weight!r}")


def row_weights(rows: int, level: str, token_mask: Tensor | None, device) -> Tensor:
    """``(rows,)`` fp32 weights of a statistic's rows: the token mask for token rows, 1 for sequence rows."""
    if level == "token" and token_mask is not None:
        return token_mask.to(device=device, dtype=torch.float32)
    return torch.ones(rows, device=device)


def reduce_over_routers(total: Tensor | None, count: int, reduce: str) -> Tensor | None:
    """``total`` (a sum over ``count`` routers) as the ``reduce`` rule asks: unchanged for ``sum``, divided by
    ``count`` for ``mean``. (``pooled`` terms are computed pooled, not reduced here.)"""
    if total is None or reduce != "mean":
        return total
    return total / max(count, 1)


@runtime_checkable
class AuxLoss(Protocol):
    """An auxiliary term of the objective ``L = L_lm + sum_terms weight * term`` (a ``conf/loss/*.yaml`` entry).

    The contract (``tests/unit/conf/test_contracts.py`` checks every ``conf/loss/*.yaml`` against it):

    * Built as ``target(**config keys)`` under ``loss.<name>``; configuration errors are
      :class:`~mole.utils.errors.MoleConfigError` naming the ``loss.<name>.*`` key.
    * ``term(outputs, token_mask)`` takes the forward's router outputs (a sequence of
      :class:`~mole.routers.base.RouterOutput`, one per routing module) and the ``(B*T,)`` bool mask of real
      tokens, and returns the *unweighted* value as a 0-dim float tensor (0 when nothing applies); the
      training loop multiplies it by ``weight``.
    * ``per_step`` true: part of the term is computed once per optimizer step over all its micro-batches by
      ``step_loss(model, batches)`` (:meth:`mole.losses.CGJSLoss.step_loss`), which the loop calls at the
      step's last micro-batch; otherwise ``step_loss`` returns ``None``.
    """

    weight: float
    per_step: bool

    def __call__(self, outputs: Sequence[RouterOutput], token_mask: Tensor | None = None) -> Tensor: ...

    def step_loss(self, model, batches) -> Tensor | None: ...


class AuxTerm:
    """What every auxiliary term shares (:class:`AuxLoss`): its weight, its ``reduce`` rule, the one-time log
    line, and no per-step part unless a term defines one."""

    name = "aux"
    weight: float
    reduce: str
    per_step = False

    def step_loss(self, model, batches) -> Tensor | None:
        """The part computed once per optimizer step (``per_step`` terms); ``None``: none."""
        return None

    def report_once(self, routers: int, terms: int | None = None) -> None:
        """Log, once per term, its effective weight per router and in all (no host read: values stay on the
        device; the step log prints the terms' values). ``terms``: how many statistics are summed (``routers``
        under ``sum``, 1 under ``mean`` and ``pooled``; the default)."""
        if getattr(self, "_reported", False) or routers == 0:
            return
        self._reported = True
        if terms is None:
            terms = routers if self.reduce == "sum" else 1
        per_router = self.weight * terms / routers
        total = self.weight * terms
        log.info(
            "loss.%s: weight %g, reduce=%s over %d routers: effective weight %.3g per router (%.3g in all, the "
            "factor on a per-router loss of 1 against the LM loss)",
            self.name, self.weight, self.reduce, routers, per_router, total,
        )


def sum_over_groups(items: Iterable[T], key: Callable[[T], Hashable], term: Callable[[Hashable, list[T]], Tensor]) -> Tensor | None:
    """``sum_g term(key_g, members_g)`` over the groups of ``items`` that share ``key(item)``; ``None`` if empty.

    The auxiliary losses group a model's routers of equal shape and level so that each group is stacked
    and computed in one set of operations instead of one per router.
    """
    groups: dict[Hashable, list[T]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    terms = [term(k, members) for k, members in groups.items()]
    if not terms:
        return None
    return terms[0] if len(terms) == 1 else torch.stack(terms).sum()


def balance_loss(stats: BalanceStats, token_mask: Tensor | None = None) -> Tensor:
    """Switch load-balancing loss extended to top-k (HMoRA eq. 17-19; Fedus et al. 2022).

    ``L = M * sum_i F_i * P_i``, with ``F_i`` the fraction of the routing slots (``k`` per token, or as many
    as ``selected`` marks when ``k`` is ``None``) that went to choice i (eq. 18) and ``P_i`` the mean router probability of choice i (eq. 19). Its minimum, 1,
    is reached when routing is uniform.

    Args:
        stats: the routing decision (probabilities ``(N, M)``, chosen set ``(N, M)``, k).
        token_mask: ``(N,)`` bool, the real (non-padding) tokens; ``None`` counts every row.
    """
    weight = token_mask if stats.level == "token" else None
    return balance_losses(stats.probs, stats.selected, stats.k, weight)


def balance_losses(
    probs: Tensor, selected: Tensor, k: int | None, row_weight: Tensor | None = None, load: str = "slots"
) -> Tensor:
    """:func:`balance_loss` of one routing decision ``(N, M)``, or of R decisions over the same rows at once.

    ``load="mass"`` replaces eq. 18's slot fraction ``F_i`` by the mean over rows of the kept probability
    ``p_i 1[i chosen]`` (DynMoLE's released code, whose gates are the unrenormalised kept probabilities).

    Args:
        probs: ``(N, M)`` or ``(R, N, M)`` router probabilities.
        selected: the chosen sets, the shape of ``probs``.
        k: routing slots per token, or ``None`` (counted from ``selected``).
        row_weight: ``(N,)`` 1 for real rows, 0 for padding; ``None`` counts every row.
        load: ``"slots"`` (eq. 18) or ``"mass"``.

    Returns:
        A scalar, or ``(R,)`` losses.
    """
    probs = probs.float()
    m, n_rows = probs.shape[-1], probs.shape[-2]
    # padding rows weigh 0 (masked sums instead of boolean indexing: no host synchronisation)
    if row_weight is not None:
        w = row_weight.to(device=probs.device, dtype=probs.dtype).unsqueeze(-1)  # (N, 1)
        n = w.sum()  # real rows, a tensor
    else:
        w, n = None, probs.new_tensor(float(n_rows))
    sel = selected.to(probs.dtype)
    if load == "mass":
        kept = probs * sel  # (..., N, M) the kept probabilities
        frac = (kept if w is None else kept * w).sum(dim=-2) / n.clamp_min(1.0)  # (..., M)
        mean_prob = (probs if w is None else probs * w).sum(dim=-2) / n.clamp_min(1.0)  # (..., M) P_i
        return m * (frac * mean_prob).sum(dim=-1)
    counts = (sel if w is None else sel * w).sum(dim=-2)  # (..., M) slots per choice
    if k is None:
        # a variable number of slots per token: F_i is the fraction of all slots taken (0 if none were)
        frac = counts / counts.sum(dim=-1, keepdim=True).clamp_min(1.0)  # (..., M) F_i, eq. 18
    else:
        frac = counts / (k * n).clamp_min(1.0)  # (..., M) F_i, eq. 18 (no real row: counts are 0)
    mean_prob = (probs if w is None else probs * w).sum(dim=-2) / n.clamp_min(1.0)  # (..., M) P_i, eq. 19
    return m * (frac * mean_prob).sum(dim=-1)


def indexed_slots_balance(decisions: Sequence[BalanceStats], token_mask: Tensor | None = None) -> Tensor:
    """``sum_r`` :func:`balance_loss` of routing decisions that carry their chosen columns (``index``, a fixed
    k), in one set of operations whatever their number of choices M (MoLA's layers route over 2 to 8 experts).

    The decisions' probabilities are put side by side, ``(N, sum_r M_r)`` (or ``(B, ...)`` for sequence
    rows); one scatter marks every decision's slots; one product each with the row weights gives the slot
    counts and the probability sums. With ``n`` real rows, ``L_r = M_r sum_i counts_i / (k_r n) * psum_i / n``
    (eq. 17-19), so the sum over decisions is ``sum_j c_j counts_j psum_j / n^2`` with ``c_j = M_r / k_r`` of
    column j's decision (``0`` when no row is real, as every count then is).
    """
    groups: dict[str, list[BalanceStats]] = {}
    for st in decisions:
        groups.setdefault(st.level, []).append(st)
    # in fp32 whatever autocast says (its products would otherwise run in bf16)
    kind = decisions[0].index.device.type
    with torch.autocast(kind, enabled=False) if autocast_enabled(kind) else contextlib.nullcontext():
        totals = [_indexed_slots_balance(stats, token_mask if level == "token" else None)
                  for level, stats in groups.items()]
    return totals[0] if len(totals) == 1 else torch.stack(totals).sum()


def side_by_side_probs(stats: list[BalanceStats]) -> tuple[list[BalanceStats], Tensor]:
    """The decisions' probabilities side by side, ``(N, sum_r M_r)``, and the decisions in that column order.

    Decisions that carry their logits without probabilities (:class:`BalanceStats` ``logits``) get them here,
    one softmax for all decisions of a width (their logits put side by side and viewed ``(N, R_M, M)``),
    whose backward is then one operation for them all; each decision's ``probs`` is set to its columns.
    """
    order = [st for st in stats if st.has_probs() or st.logits is None]
    blocks = [st.probs.float() for st in order]
    by_width: dict[int, list[BalanceStats]] = {}
    for st in stats:
        if not (st.has_probs() or st.logits is None):
            by_width.setdefault(st.logits.shape[-1], []).append(st)
    for m, group in by_width.items():
        z = torch.cat([st.logits for st in group], dim=-1) if len(group) > 1 else group[0].logits  # (N, R_M * M)
        rows = z.shape[0]
        probs = torch.softmax(z.view(rows, len(group), m), dim=-1).view(rows, -1)  # (N, R_M * M)
        for j, st in enumerate(group):
            st.probs = probs[:, j * m:(j + 1) * m]
        blocks.append(probs.float())
        order.extend(group)
    return order, blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=-1)


def _indexed_slots_balance(stats: list[BalanceStats], row_weight: Tensor | None) -> Tensor:
    stats, probs = side_by_side_probs(stats)
    rows, device = probs.shape[0], probs.device
    widths = [st.probs.shape[-1] for st in stats]
    starts = [0]
    for m in widths[:-1]:
        starts.append(starts[-1] + m)
    # every decision's chosen columns, shifted to its place among the side-by-side columns: one stack and one
    # add per distinct k
    parts = []
    for k in dict.fromkeys(st.k for st in stats):
        members = [(st, start) for st, start in zip(stats, starts, strict=True) if st.k == k]
        index = torch.stack([st.index for st, _ in members], dim=1)  # (N, R_k, k)
        shift = torch.tensor([start for _, start in members], device=device).view(1, -1, 1)
        parts.append((index + shift).view(rows, -1))
    index = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # (N, sum_r k_r)
    slots = torch.zeros_like(probs).scatter_(1, index, 1.0)  # (N, sum M) 1 where a slot went
    scale = torch.tensor([m / st.k for st, m in zip(stats, widths, strict=True) for _ in range(m)], device=device)
    if row_weight is None:
        counts, psum = slots.sum(dim=0), probs.sum(dim=0)  # (sum M,)
        n = probs.new_tensor(float(rows))
    else:
        w = row_weight.to(device=device, dtype=probs.dtype).view(1, rows)  # (1, N)
        counts, psum = torch.mm(w, slots).view(-1), torch.mm(w, probs).view(-1)  # (sum M,)
        n = w.sum()
    return torch.dot(counts * scale, psum) / n.clamp_min(1.0).square()


class BalanceLoss(AuxTerm):
    """The ``loss.balance`` term: ``weight *`` :func:`balance_loss` over every routing decision, reduced over
    routers by ``reduce``.

    Routers expose what should be balanced (top-k expert choices, the MoR main router's choice of
    sub-routers); soft routing exposes nothing, and the term is then 0 (with a warning).

    Args:
        weight: the coefficient (0.01 by default; HMoRA Sec. 4.1).
        reduce: ``sum`` | ``mean`` | ``pooled`` over routers (module notes). ``pooled`` puts the rows of every
            decision with the same number of choices together (DynMoLE's and Mixtral's form).
            ``pooled_per_layer`` pools the decisions of each decoder layer and sums over layers (MoLA's
            released code; the layer is read from the routing module's name,
            :meth:`mole.model.routing.RoutingOutputs.layer_indices`).
        load: ``slots`` (eq. 18: the fraction of routing slots) or ``mass`` (the mean kept probability;
            DynMoLE's released code).
    """

    name = "balance"

    def __init__(self, weight: float = 0.01, reduce: str = "sum", load: str = "slots"):
        check_weight(weight, "loss.balance.weight")
        check_reduce(reduce, "loss.balance.reduce", BALANCE_REDUCES)
        if load not in LOADS:
            raise MoleConfigError(f"loss.balance.load must be one of {list(LOADS)}, got {load!r}")
        self.weight, self.reduce, self.load = float(weight), reduce, load
        self._warned = False

    def __call__(self, outputs: Sequence[RouterOutput], token_mask: Tensor | None = None) -> Tensor:
        decisions = [st for out in outputs for st in out.balance]
        terms = None
        if self.reduce == "pooled_per_layer":
            layers = outputs.layer_indices() if hasattr(outputs, "layer_indices") else [None] * len(outputs)
            if None in layers:
                raise MoleConfigError("loss.balance.reduce=pooled_per_layer: a routing module's name gives no decoder "
                                      "layer (a model whose decoder layers are not numbered); use pooled or sum")
            by_layer: dict[int, list[BalanceStats]] = {}
            for out, layer in zip(outputs, layers, strict=True):
                by_layer.setdefault(layer, []).extend(out.balance)
            parts = [t for t in (self._pooled(d, token_mask) for d in by_layer.values() if d) if t is not None]
            total = torch.stack(parts).sum() if parts else None
            terms = len(parts)
        elif self.reduce == "pooled":
            total = self._pooled(decisions, token_mask)
        elif self.load == "slots" and decisions and all(st.index is not None and st.k is not None for st in decisions):
            total = reduce_over_routers(indexed_slots_balance(decisions, token_mask), len(decisions), self.reduce)
        else:
            total = reduce_over_routers(self._summed(decisions, token_mask), len(decisions), self.reduce)
        if total is None:
            if not self._warned and outputs:
                warnings.warn("loss.balance: the routers expose no sparse choice to balance (soft routing); term is 0", stacklevel=2)
                self._warned = True
            return torch.zeros(())
        self.report_once(len(decisions), terms)
        return total

    def _summed(self, decisions: list[BalanceStats], token_mask: Tensor | None) -> Tensor | None:
        # decisions of the same shape, level and k (a model's routers of equal expert count) go through
        # balance_losses together: one set of operations instead of one per router
        def term(key: tuple, stats: list[BalanceStats]) -> Tensor:
            level, k = key[0], key[2]
            weight = token_mask if level == "token" else None
            if len(stats) == 1:
                return balance_losses(stats[0].probs, stats[0].selected, k, weight, self.load)
            probs = torch.stack([st.probs.float() for st in stats])  # (R, N, M)
            selected = torch.stack([st.selected for st in stats])  # (R, N, M)
            return balance_losses(probs, selected, k, weight, self.load).sum()

        return sum_over_groups(decisions, lambda st: (st.level, tuple(st.probs.shape), st.k, st.probs.device), term)

    def _pooled(self, decisions: list[BalanceStats], token_mask: Tensor | None) -> Tensor | None:
        # one statistic over the rows of all decisions with M choices; slots counted from `selected` (with a
        # fixed k that is k per real row, the same F_i)
        def term(key: tuple, stats: list[BalanceStats]) -> Tensor:
            probs = torch.cat([st.probs.float() for st in stats])  # (sum N, M)
            selected = torch.cat([st.selected for st in stats])  # (sum N, M)
            weight = torch.cat([row_weights(st.probs.shape[0], st.level, token_mask, st.probs.device) for st in stats])
            return balance_losses(probs, selected, None, weight, self.load)

        return sum_over_groups(decisions, lambda st: (st.probs.shape[-1], st.probs.device), term)
