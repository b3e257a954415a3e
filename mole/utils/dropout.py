"""Dropout for the experts' input, cheaper on the CPU than ``nn.Dropout`` with the same distribution.

``nn.Dropout`` on the CPU draws its mask with ``bernoulli_``, which costs about twice a uniform draw; in
a LoRA training step on the CPU the experts' dropout masks (one ``(N, d_in)`` mask per adapted Linear)
take about a tenth of the step. :class:`ExpertDropout` draws ``u ~ U[0, 1)`` and keeps an element iff
``u >= p`` — each element independently kept with probability ``1 - p`` (up to float32 resolution of
``p``, as ``bernoulli_``), kept values scaled by ``1 / (1 - p)``: the same distribution as
``nn.Dropout``. Other devices use ``F.dropout`` (fused there). Evaluation mode, or ``p = 0``, is the
identity. The random stream differs from ``nn.Dropout``'s, so masks differ draw by draw.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ExpertDropout(nn.Dropout):
    """``nn.Dropout`` (same ``p``, same distribution) with a cheaper mask draw on the CPU."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or self.inplace or self.p >= 1.0:
            return F.dropout(x, self.p, True, self.inplace)
        keep = torch.rand_like(x).ge_(self.p).mul_(1.0 / (1.0 - self.p))  # (..., d): 0 or 1/(1-p)
        return x * keep
