"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv:2402.09353), a single-adapter baseline.

DoRA eq. 5: ``W' = m * (W + s B A) / ||W + s B A||_c`` with the magnitude ``m`` trainable and initialised
to ``||W||_c``, ``A`` Kaiming-uniform and ``B`` zero (LoRA's initialisation), so a fresh adapter leaves
the layer unchanged: ``m / ||W||_c = 1`` exactly.

Norm axis: the paper writes ``W`` as ``d x k`` acting on row vectors, so its "column" norm is one norm per
*output* feature. For ``nn.Linear.weight`` of shape ``(d_out, d_in)`` that is the norm over ``d_in`` of
each row, giving ``m`` of shape ``(d_out,)`` (as the reference implementation in peft does).

How it plugs into :class:`~mole.model.layer.MoLELinear`: the layer computes the frozen output
``W x + b`` once and hands it to the expert (``base_out``); the expert returns the *difference*
``W' x - W x`` so the layer keeps its one rule ``out = base(x) + delta``. With ``c = m / ||W + sBA||_c``:

    W' x = c * (W x + s B A x)        =>    delta = (c - 1) * (W x) + c * s * B A x

(``b`` is unchanged by DoRA and cancels). With dropout active in training, both terms read the dropped
input ``dropout(x)`` (as peft does), so ``W dropout(x)`` is computed here; otherwise ``W x`` is taken
from ``base_out`` without a second product.

NOTE(deviation, DoRA Sec. 4.3): the norm ``||W + sBA||_c`` is treated as a constant in the backward
pass (``.detach()``), the paper's memory-saving gradient approximation; the forward value is exact.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mole.adapters.lora import check_lora_args
from mole.utils.dropout import ExpertDropout
from mole.utils.errors import MoleConfigError


class DoRAExpert(nn.Module):
    """One DoRA adapter for one frozen Linear ``d_in -> d_out``.

    Args:
        in_features: d_in of the adapted Linear.
        out_features: d_out of the adapted Linear.
        num_experts: must be 1 (DoRA is a single-adapter baseline).
        rank: LoRA rank r of the direction update.
        alpha: the update is scaled by ``s = alpha / rank``.
        dropout: dropout on the adapter's input.
        base_layer: the frozen ``nn.Linear`` (its weight defines ``W``; held by reference, not owned).
    """

    adapter_kind = "linear"  # the contract: mole.adapters.kinds.LinearAdapter
    reads_base_output = True  # MoLELinear passes the frozen output W x + b as ``base_out``
    reads_base_weights = True  # W's norm, from the frozen Linear (``base_layer``)
    adds_to_output = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_experts: int = 1,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        base_layer: nn.Linear | None = None,
    ):
        super().__init__()
        if num_experts != 1:
            raise MoleConfigError(
                f"adapter=dora is a single-adapter baseline but the experts layout gives {num_experts} experts "
                "for a layer; use experts=single router=none"
            )
        check_lora_args(1, rank, alpha, dropout)
        if base_layer is None:
            raise MoleConfigError("adapter=dora needs the frozen Linear (base_layer); build it through inject_mole")
        self.in_features, self.out_features = in_features, out_features
        self.num_experts, self.rank, self.scaling = 1, rank, alpha / rank
        self.dropout = ExpertDropout(dropout) if dropout > 0 else nn.Identity()
        object.__setattr__(self, "base", base_layer)  # reference only: the weight belongs to MoLELinear
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))  # (r, d_in)
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))  # (d_out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        with torch.no_grad():
            # m = ||W||_c, computed exactly as in forward (same op, same dtype) so m / ||W + 0||_c == 1
            magnitude = self._norm(base_layer.weight)
        self.magnitude = nn.Parameter(magnitude.clone())  # (d_out,)

    @staticmethod
    def _norm(weight: Tensor) -> Tensor:
        return torch.linalg.vector_norm(weight, dim=1)  # (d_out,): one norm per output feature

    def direction_scale(self) -> Tensor:
        """``c = m / ||W + s B A||_c`` of shape ``(d_out,)``, the norm detached (DoRA Sec. 4.3)."""
        weight = self.base.weight
        merged = weight + (self.lora_B @ self.lora_A).to(weight.dtype) * self.scaling  # (d_out, d_in)
        norm = self._norm(merged).detach()  # NOTE(deviation): constant in backward, DoRA Sec. 4.3
        return self.magnitude / norm

    def forward(self, x: Tensor, gates: Tensor | None = None, base_out: Tensor | None = None) -> Tensor:
        """``W' x - W x`` for ``x`` of shape ``(N, d_in)``; ``base_out`` is ``W x + b`` of shape ``(N, d_out)``."""
        scale = self.direction_scale()  # (d_out,)
        xd = self.dropout(x)
        lora = F.linear(F.linear(xd, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype)) * self.scaling  # (N, d_out)
        if base_out is None or (self.training and not isinstance(self.dropout, nn.Identity)):
            wx = F.linear(xd, self.base.weight)  # W dropout(x), bias excluded
        else:
            wx = base_out if self.base.bias is None else base_out - self.base.bias
        return (scale - 1) * wx + scale * lora

    def merged_weight(self) -> Tensor:
        """``W' = m * (W + s B A) / ||W + s B A||_c`` (for tests and export)."""
        weight = self.base.weight
        merged = weight + (self.lora_B @ self.lora_A).to(weight.dtype) * self.scaling
        return self.magnitude[:, None] * merged / self._norm(merged)[:, None]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scaling={self.scaling:g}"
