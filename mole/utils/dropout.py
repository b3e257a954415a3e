"""Dropout for the experts' and routers' input, cheaper on the CPU than ``nn.Dropout``.

On the CPU, ``nn.Dropout`` draws its mask with ``bernoulli_`` (one 32-bit Mersenne-Twister draw and a
float compare per element), and in a LoRA training step the dropout masks — one ``(N, d_in)`` mask per
adapted Linear, one more per router that has input dropout (HMoRA) — take about a tenth of the step.
:class:`ExpertDropout` draws the same distribution from fewer random bits:

* **16-bit path** (the default on the CPU): one 64-bit draw of the generator (``random_`` over the
  whole ``int64`` range) gives four independent uniform 16-bit integers ``r`` in ``[-2^15, 2^15)``; an
  element is kept iff ``r >= m - 2^15`` with ``m = round(p * 2^16)``, i.e. with probability exactly
  ``1 - p'``, ``p' = m / 2^16``, and kept values are scaled by ``1 / (1 - p')`` so that
  ``E[dropout(x)] = x`` exactly. About 2.5x faster than a float draw (measured on a
  ``(256, 576)`` mask, one thread: 0.23 ms against 0.58 ms).
* NOTE(deviation): ``p'`` differs from ``p`` by at most ``2^-17`` (7.6e-6; ``p = 0.05`` gives
  ``p' = 0.0500031``). Where that is more than 0.1% of ``p`` (``p < 0.0077``), the float path is used
  instead: ``u ~ U[0, 1)`` in float32, kept iff ``u >= p`` (``bernoulli_``'s resolution), scale
  ``1 / (1 - p)``.

Other devices, and code traced by ``torch.compile``, use ``F.dropout`` (fused there). Evaluation mode, or
``p = 0``, is the identity. The random stream differs from ``nn.Dropout``'s, so masks differ draw by
draw; a seeded generator (``torch.manual_seed``) makes them reproducible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_LEVELS = 1 << 16  # 16-bit lanes
_MAX_REL_ERROR = 1e-3  # the 16-bit path only where |p' - p| <= 0.1% of p


def quantized_drop_prob(p: float) -> float | None:
    """``p' = round(p * 2^16) / 2^16``, the drop probability of the 16-bit path, or ``None`` where it is
    more than 0.1% away from ``p`` (the float path is used there)."""
    m = round(p * _LEVELS)
    if m <= 0 or m >= _LEVELS:
        return None
    q = m / _LEVELS
    return q if abs(q - p) <= _MAX_REL_ERROR * p else None


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> Tensor:
    """A dropout multiplier of ``shape`` from the 16-bit path: ``1 / (1 - p')`` where kept, 0 where dropped.

    Args:
        shape: the mask's shape.
        p: the drop probability; :func:`quantized_drop_prob` must accept it.
        dtype: the mask's floating dtype.
        device: where to draw it (on the CPU, the default generator's stream).
    """
    q = quantized_drop_prob(p)
    if q is None:
        raise ValueError(f"dropout p={p} is not within 0.1% of a multiple of 2^-16; use the float path")
    return _mask16(shape, q, dtype, device)


def _mask16(shape, q: float, dtype: torch.dtype, device) -> Tensor:
    """:func:`keep_mask` for an already rounded drop probability ``q = p'``."""
    mask = _keep16(shape, q, torch.float32, device).mul_(1.0 / (1.0 - q))
    return mask if dtype == torch.float32 else mask.to(dtype)


def _keep16(shape, q: float, dtype: torch.dtype, device) -> Tensor:
    """The 16-bit path's 0/1 keep mask of ``shape`` in ``dtype`` (unscaled), drop probability ``q = p'``."""
    numel = 1
    for s in shape:
        numel *= int(s)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(1 << 63), None)  # every 64-bit pattern equally likely: four uniform 16-bit lanes
    lanes = words.view(torch.int16)[:numel].view(shape)  # uniform in [-2^15, 2^15)
    threshold = round(q * _LEVELS) - (1 << 15)
    # the compare writes 0/1 straight into a float tensor: one pass, faster than comparing to bool and
    # converting, and a float mask multiplies several times faster than a bool one on the CPU
    return torch.ge(lanes, threshold, out=torch.empty(shape, dtype=dtype, device=device))


class ExpertDropout(nn.Dropout):
    """``nn.Dropout`` (same ``p``, the same distribution up to ``p``'s 16-bit rounding) with a cheaper mask
    draw on the CPU; see the module docstring."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if (x.device.type != "cpu" or self.inplace or self.p >= 1.0 or not x.dtype.is_floating_point
                or torch.compiler.is_compiling()):
            # under torch.compile, the compiler's own (fused) dropout: the 16-bit draw would break the graph
            return F.dropout(x, self.p, True, self.inplace)
        q = quantized_drop_prob(self.p)
        if q is not None:
            return x * _mask16(x.shape, q, x.dtype, x.device)
        keep = torch.rand_like(x).ge_(self.p).mul_(1.0 / (1.0 - self.p))  # float path: 0 or 1/(1-p)
        return x * keep

    def mask(self, x: Tensor) -> Tensor | None:
        """The multiplier :meth:`forward` would apply to ``x`` (``1 / (1 - p')`` where kept, 0 where dropped),
        drawn from the same random stream (on the CPU), or ``None`` where :meth:`forward` is the identity.
        Elsewhere it is ``F.dropout`` of ones: the same distribution, not the same draw as ``F.dropout(x)``."""
        if not self.training or self.p == 0.0:
            return None
        if (x.device.type != "cpu" or self.inplace or self.p >= 1.0 or not x.dtype.is_floating_point
                or torch.compiler.is_compiling()):
            return F.dropout(torch.ones_like(x), self.p, True)
        q = quantized_drop_prob(self.p)
        if q is not None:
            return _mask16(x.shape, q, x.dtype, x.device)
        return torch.rand_like(x).ge_(self.p).mul_(1.0 / (1.0 - self.p))

    def unscaled(self, x: Tensor) -> tuple[Tensor, float]:
        """``(x * keep, c)`` with ``keep`` the 0/1 mask and ``c`` the scale of the kept values (``1 / (1 - p')``):
        ``c * (x * keep)`` is :meth:`forward`'s output, for a caller that folds ``c`` into a scale of its
        own (one operation fewer per call). Where :meth:`forward` is not the CPU draw, its output and 1."""
        if not self.training or self.p == 0.0:
            return x, 1.0
        if (x.device.type != "cpu" or self.inplace or self.p >= 1.0 or not x.dtype.is_floating_point
                or torch.compiler.is_compiling()):
            return self(x), 1.0
        q = quantized_drop_prob(self.p)
        if q is not None:
            return x * _keep16(x.shape, q, x.dtype, x.device), 1.0 / (1.0 - q)
        return x * torch.rand_like(x).ge_(self.p), 1.0 / (1.0 - self.p)
