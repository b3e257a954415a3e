"""Auxiliary routing losses: pure functions of router statistics, plus the weighted terms the config builds.

The total objective is ``L = L_lm + sum_terms weight * sum_routers L_term(router)`` — summed over routers
as HMoRA eq. 13 does (SPEC §3). Padding tokens are excluded from every statistic.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import TypeVar

import torch
from torch import Tensor

from mole.routers.base import BalanceStats, RouterOutput
from mole.utils.errors import MoleConfigError

T = TypeVar("T")


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


def balance_losses(probs: Tensor, selected: Tensor, k: int | None, row_weight: Tensor | None = None) -> Tensor:
    """:func:`balance_loss` of one routing decision ``(N, M)``, or of R decisions over the same rows at once.

    Args:
        probs: ``(N, M)`` or ``(R, N, M)`` router probabilities.
        selected: the chosen sets, the shape of ``probs``.
        k: routing slots per token, or ``None`` (counted from ``selected``).
        row_weight: ``(N,)`` 1 for real rows, 0 for padding; ``None`` counts every row.

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
    counts = (sel if w is None else sel * w).sum(dim=-2)  # (..., M) slots per choice
    if k is None:
        # a variable number of slots per token: F_i is the fraction of all slots taken (0 if none were)
        frac = counts / counts.sum(dim=-1, keepdim=True).clamp_min(1.0)  # (..., M) F_i, eq. 18
    else:
        frac = counts / (k * n).clamp_min(1.0)  # (..., M) F_i, eq. 18 (no real row: counts are 0)
    mean_prob = (probs if w is None else probs * w).sum(dim=-2) / n.clamp_min(1.0)  # (..., M) P_i, eq. 19
    return m * (frac * mean_prob).sum(dim=-1)


class BalanceLoss:
    """The ``loss.balance`` term: ``weight * sum`` of :func:`balance_loss` over every routing decision.

    Routers expose what should be balanced (top-k expert choices, the MoR main router's choice of
    sub-routers); soft routing exposes nothing, and the term is then 0 (with a warning).

    Args:
        weight: the coefficient (0.01 by default; HMoRA Sec. 4.1).
    """

    name = "balance"

    def __init__(self, weight: float = 0.01):
        if not isinstance(weight, (int, float)) or weight < 0:
            raise MoleConfigError(f"loss.balance.weight must be a non-negative number, got {weight!r}")
        self.weight = float(weight)
        self._warned = False

    def __call__(self, outputs: Sequence[RouterOutput], token_mask: Tensor | None = None) -> Tensor:
        # decisions of the same shape, level and k (a model's routers of equal expert count) go through
        # balance_losses together: one set of operations instead of one per router
        def term(key: tuple, stats: list[BalanceStats]) -> Tensor:
            level, k = key[0], key[2]
            weight = token_mask if level == "token" else None
            if len(stats) == 1:
                return balance_losses(stats[0].probs, stats[0].selected, k, weight)
            probs = torch.stack([st.probs.float() for st in stats])  # (R, N, M)
            selected = torch.stack([st.selected for st in stats])  # (R, N, M)
            return balance_losses(probs, selected, k, weight).sum()

        total = sum_over_groups(
            (st for out in outputs for st in out.balance),
            lambda st: (st.level, tuple(st.probs.shape), st.k, st.probs.device),
            term,
        )
        if total is None:
            if not self._warned and outputs:
                warnings.warn("loss.balance: the routers expose no sparse choice to balance (soft routing); term is 0", stacklevel=2)
                self._warned = True
            return torch.zeros(())
        return total
