"""DynMoLE's Tsallis entropy loss (Li et al. 2025, eq. 19-21).

``L_entropy = beta * (1/T) sum_x S_q(p(x))``: the mean Tsallis entropy (eq. 9) of each router's
distribution over the batch's real tokens, summed over routers like every auxiliary term here (SPEC §3).
Minimising it makes routers more certain (peaked distributions). DynMoLE's total auxiliary loss (eq. 21)
adds the balance loss with weight alpha: in mole that is ``loss=[balance,tsallis]``, ``loss.balance.weight``
being alpha and ``loss.tsallis.weight`` beta (the training loop multiplies each term by its weight).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from mole.routers.base import RouterOutput
from mole.routers.select import tsallis_entropy
from mole.utils.errors import MoleConfigError


def mean_tsallis_entropy(probs: Tensor, q: float, token_mask: Tensor | None = None) -> Tensor:
    """Mean over the real tokens of ``S_q`` of each row of ``probs`` ``(N, M)`` (0 when there are none).

    A weighted mean rather than boolean indexing, so that no host sync is needed.
    """
    entropy = tsallis_entropy(probs, q)  # (N,)
    if token_mask is None:
        return entropy.mean()
    w = token_mask.to(device=entropy.device, dtype=entropy.dtype)  # (N,)
    return (entropy * w).sum() / w.sum().clamp_min(1.0)


class TsallisLoss:
    """The ``loss.tsallis`` term: ``sum`` over routers of the mean Tsallis entropy of their ``probs``.

    Meant for softmax-type routers (``probs`` rows sum to 1); sigmoid gates are not a distribution.

    Args:
        weight: beta (1e-2, the best value of DynMoLE Fig. 4a).
        q: the entropic index (1.1, DynMoLE's best; 1 gives the Shannon entropy).
    """

    name = "tsallis"

    def __init__(self, weight: float = 0.01, q: float = 1.1):
        ok = isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight)
        if not ok or weight < 0:
            raise MoleConfigError(f"loss.tsallis.weight must be a non-negative number, got {weight!r}")
        ok = isinstance(q, (int, float)) and not isinstance(q, bool) and math.isfinite(q)
        if not ok or q <= 0:
            raise MoleConfigError(f"loss.tsallis.q (the Tsallis entropic index) must be a positive number, got {q!r}")
        self.weight, self.q = float(weight), float(q)

    def __call__(self, outputs: Sequence[RouterOutput], token_mask: Tensor | None = None) -> Tensor:
        terms = [mean_tsallis_entropy(out.probs, self.q, token_mask) for out in outputs]
        if not terms:
            return torch.zeros(())
        return torch.stack(terms).sum()
