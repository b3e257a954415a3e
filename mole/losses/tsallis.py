"""DynMoLE's Tsallis entropy loss (Li et al. 2025, eq. 19-21).

``L_entropy = beta * (1/T) sum_x S_q(p(x))``: the mean Tsallis entropy (eq. 9) of each router's
distribution over the batch's real tokens, summed over routers by default (SPEC §3). The authors' released
code instead divides each entropy by its maximum ``(1 - E^(1-q)) / (q - 1)`` (``normalized: true``) and
averages over the rows of every router together (``reduce: pooled``): for the same beta its term is about
``max S_q x R`` times smaller (1.64 x 96 on Llama-2-7B with 6 experts on gate/up/down). NOTE(deviation):
the released code also counts padding rows and adds 1e-5 to every probability; mole does neither.
Minimising it makes routers more certain (peaked distributions). DynMoLE's total auxiliary loss (eq. 21)
adds the balance loss with weight alpha: in mole that is ``loss=[balance,tsallis]``, ``loss.balance.weight``
being alpha and ``loss.tsallis.weight`` beta (the training loop multiplies each term by its weight).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from mole.losses.routing import AuxTerm, check_reduce, check_weight, reduce_over_routers, sum_over_groups
from mole.routers.base import RouterOutput
from mole.routers.select import max_tsallis_entropy, tsallis_entropy
from mole.utils.errors import MoleConfigError


def row_tsallis_entropy(probs: Tensor, q: float, normalized: bool = False) -> Tensor:
    """``(N,)`` ``S_q`` of each row of ``probs`` ``(N, M)``; divided by its maximum over M outcomes if ``normalized``."""
    entropy = tsallis_entropy(probs, q)  # (N,)
    if normalized:
        top = max_tsallis_entropy(probs.shape[-1], q)
        entropy = entropy / top if top > 0 else torch.zeros_like(entropy)
    return entropy


def mean_tsallis_entropy(probs: Tensor, q: float, token_mask: Tensor | None = None, normalized: bool = False) -> Tensor:
    """Mean over the real tokens of ``S_q`` of each row of ``probs`` ``(N, M)`` (0 when there are none).

    A weighted mean rather than boolean indexing, so that no host sync is needed.
    """
    entropy = row_tsallis_entropy(probs, q, normalized)  # (N,)
    if token_mask is None:
        return entropy.mean()
    w = token_mask.to(device=entropy.device, dtype=entropy.dtype)  # (N,)
    return (entropy * w).sum() / w.sum().clamp_min(1.0)


def summed_tsallis_entropy(probs: Sequence[Tensor], q: float, token_mask: Tensor | None = None,
                           normalized: bool = False) -> Tensor:
    """``sum_r sum_n w_n S_q(p_rn)`` over R routers' ``(N, M)`` distributions of one shape, stacked
    ``(R, N, M)`` and computed in one set of operations (one ``mv`` weighs the rows): the numerator of
    eq. 19's mean for every router at once. ``w`` is ``token_mask`` (1 for every row when ``None``)."""
    stacked = probs[0].unsqueeze(0) if len(probs) == 1 else torch.stack(list(probs))  # (R, N, M)
    entropy = row_tsallis_entropy(stacked, q, normalized)  # (R, N)
    if token_mask is None:
        return entropy.sum()
    w = token_mask.to(device=entropy.device, dtype=entropy.dtype)  # (N,)
    return torch.mv(entropy, w).sum()


class TsallisLoss(AuxTerm):
    """The ``loss.tsallis`` term: the mean Tsallis entropy of every router's ``probs``, reduced over routers.

    Meant for softmax-type routers (``probs`` rows sum to 1); sigmoid gates are not a distribution.

    Args:
        weight: beta (1e-2, the best value of DynMoLE Fig. 4a).
        q: the entropic index (1.1, DynMoLE's best; 1 gives the Shannon entropy).
        normalized: divide each entropy by its maximum over the router's E experts (released code).
        reduce: ``sum`` (default) | ``mean`` | ``pooled`` (released code: the mean over the real rows of
            every router together) over routers.
    """

    name = "tsallis"

    def __init__(self, weight: float = 0.01, q: float = 1.1, normalized: bool = False, reduce: str = "sum"):
        check_weight(weight, "loss.tsallis.weight")
        ok = isinstance(q, (int, float)) and not isinstance(q, bool) and math.isfinite(q)
        if not ok or q <= 0:
            raise MoleConfigError(f"loss.tsallis.q (the Tsallis entropic index) must be a positive number, got {q!r}")
        if not isinstance(normalized, bool):
            raise MoleConfigError(f"loss.tsallis.normalized must be true or false, got {normalized!r}")
        check_reduce(reduce, "loss.tsallis.reduce")
        self.weight, self.q, self.normalized, self.reduce = float(weight), float(q), normalized, reduce

    def __call__(self, outputs: Sequence[RouterOutput], token_mask: Tensor | None = None) -> Tensor:
        """Every router's mean entropy over the real tokens, reduced over routers.

        Routers whose ``probs`` have the same shape are stacked ``(R, N, E)`` and go through one set of
        operations (:func:`summed_tsallis_entropy`); the per-router means of eq. 19 and the pooled mean are
        the same weighted sums, divided by each router's real rows or by all of them.
        """
        if not outputs:
            return torch.zeros(())
        probs = [out.probs for out in outputs]

        def term(key: tuple, group: list[Tensor]) -> Tensor:
            return summed_tsallis_entropy(group, self.q, token_mask, self.normalized)

        total = sum_over_groups(probs, lambda p: (tuple(p.shape), p.device), term)
        if self.reduce == "pooled":
            if token_mask is None:
                rows = float(sum(p.shape[0] for p in probs))
            else:
                rows = token_mask.sum().clamp_min(1.0) * len(probs)  # every router's rows are the batch's tokens
            total = total / rows
        else:
            rows = float(probs[0].shape[0]) if token_mask is None else token_mask.sum().clamp_min(1.0)
            total = reduce_over_routers(total / rows, len(probs), self.reduce)
        self.report_once(len(outputs))
        return total
