"""E LoRA experts stored and computed stacked.

Source: Hu et al., "LoRA" (arXiv:2106.09685), eq. 3: ``h = W x + (alpha / r) B A x``, A random
(Kaiming-uniform, as the reference implementation), B zero, so a fresh adapter changes nothing.

A MoLE layer mixes E such experts with router gates ``g`` (N x E):
``z = W x + sum_i g_i (alpha / r) B_i A_i dropout(x)`` (SPEC, notation; MoR eq. 4).

All experts' A matrices are stacked into one ``(E*r, d_in)`` matrix and all B matrices into one
``(d_out, E*r)`` matrix, so the mixture costs two matrix products whatever E is, with no Python loop
over experts:

    h = dropout(x) @ A_all^T               (N, E*r)   every expert's down-projection at once
    h = h * repeat(g * alpha/r, r)         (N, E*r)   expert i's r columns scaled by its gate
    z = h @ B_all^T                        (N, d_out) = sum_i g_i (alpha/r) B_i A_i x

This is exact for any gates, sparse ones included: a zero gate contributes exactly zero.

NOTE(deviation): one dropout mask on ``x`` is shared by all experts of a layer (per-expert LoRA modules
would draw one mask each). In eval mode, or with dropout 0, the two are identical.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mole.utils.dropout import ExpertDropout
from mole.utils.errors import MoleConfigError

SCALINGS = ("lora", "rslora")


def lora_scaling(alpha: float, rank: int, scaling: str = "lora") -> float:
    """The update's scale: ``alpha / r`` (LoRA, Hu et al. 2021) or ``alpha / sqrt(r)`` (rsLoRA, Kalajdzievski
    2023, Sec. 3; the scaling HMoRA's released code always uses)."""
    if scaling not in SCALINGS:
        raise MoleConfigError(f"adapter.scaling must be one of {list(SCALINGS)}, got {scaling!r}")
    return alpha / rank if scaling == "lora" else alpha / math.sqrt(rank)


def check_lora_args(num_experts: int, rank: int, alpha: float, dropout: float) -> None:
    """Reject adapter settings that cannot build; shared by every LoRA-based expert kind."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise MoleConfigError(f"adapter.rank must be a positive integer, got {rank!r}")
    if not (isinstance(alpha, (int, float)) and alpha > 0):
        raise MoleConfigError(f"adapter.alpha must be a positive number, got {alpha!r}")
    if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
        raise MoleConfigError(f"adapter.dropout must be in [0, 1), got {dropout!r}")
    if num_experts < 1:
        raise MoleConfigError(f"the experts layout gives {num_experts} experts for a layer; need >= 1")


class LoRAExperts(nn.Module):
    """E LoRA experts of rank r for one Linear ``d_in -> d_out``, stacked.

    Args:
        in_features: d_in of the adapted Linear.
        out_features: d_out of the adapted Linear.
        num_experts: E; 1 is a plain LoRA.
        rank: r of every expert.
        alpha: LoRA alpha; the update is scaled by ``alpha / rank`` (or ``alpha / sqrt(rank)``).
        dropout: dropout on the experts' input.
        scaling: ``"lora"`` (``alpha / r``) or ``"rslora"`` (``alpha / sqrt(r)``); see :func:`lora_scaling`.
    """

    adapter_kind = "linear"  # the contract: mole.adapters.kinds.LinearAdapter
    reads_base_output = False
    reads_base_weights = False
    adds_to_output = True  # MoLELinear passes the frozen output as ``add_to``

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_experts: int = 1,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        scaling: str = "lora",
    ):
        super().__init__()
        check_lora_args(num_experts, rank, alpha, dropout)
        self.in_features, self.out_features = in_features, out_features
        self.num_experts, self.rank, self.scaling = num_experts, rank, lora_scaling(alpha, rank, scaling)
        self.dropout = ExpertDropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(num_experts * rank, in_features))  # A_all
        self.lora_B = nn.Parameter(torch.zeros(out_features, num_experts * rank))  # B_all
        # Initialise as the LoRA reference (microsoft/LoRA loralib, and peft): kaiming_uniform_(a=sqrt(5))
        # per expert. The bound depends only on fan_in = d_in, so one call on the stack draws each
        # expert's A from the same distribution.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: Tensor, gates: Tensor | None = None, add_to: Tensor | None = None) -> Tensor:
        """Mixture of the experts' updates.

        Args:
            x: ``(N, d_in)`` token features.
            gates: ``(N, E)`` expert weights, or ``None`` for a single expert (weight 1).
            add_to: ``(N, d_out)``, a tensor the update is added to (the frozen layer's output), or ``None``.

        Returns:
            ``(N, d_out)``: ``sum_i g_i (alpha/r) B_i A_i dropout(x)`` (``+ add_to``, in ``add_to``'s dtype).
        """
        if not torch.compiler.is_compiling():
            # eager: the dropout's scale folded into the LoRA scale, and one autograd function with fewer
            # dispatched operations than the products below (compiled code fuses them); the sum with
            # ``add_to`` is its last product's, where the dtypes agree
            xd, c = self.dropout.unscaled(x) if isinstance(self.dropout, ExpertDropout) else (x, 1.0)
            fused = add_to is not None and add_to.dtype == compute_dtype(x, self.lora_A)
            delta = stacked_lora(xd, self.lora_A, self.lora_B, gates, self.scaling * c, self.rank,
                                 add_to if fused else None)
            return delta if add_to is None or fused else add_to + delta.to(add_to.dtype)
        h = F.linear(self.dropout(x), self.lora_A)  # (N, E*r)
        if gates is None:
            h = h * self.scaling
        else:
            n = h.shape[0]
            # scale expert i's r columns by g_i * alpha / r
            h = (h.view(n, self.num_experts, self.rank) * (gates.to(h.dtype) * self.scaling).unsqueeze(-1))
            h = h.view(n, self.num_experts * self.rank)  # (N, E*r)
        if add_to is not None and add_to.dtype == compute_dtype(x, self.lora_A):
            return torch.addmm(add_to, h, self.lora_B.t())  # (N, d_out), as the eager function sums
        delta = F.linear(h, self.lora_B)  # (N, d_out)
        return delta if add_to is None else add_to + delta.to(add_to.dtype)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, "
            f"rank={self.rank}, scaling={self.scaling:g}"
        )


class _StackedLoRA(torch.autograd.Function):
    """``z = ((s * xd @ A^T) * repeat(g, r)) @ B^T (+ base)`` with a backward of its own (see :func:`stacked_lora`)."""

    @staticmethod
    def forward(ctx, xd: Tensor, a: Tensor, b: Tensor, gates: Tensor | None, scaling: float, rank: int,
                base: Tensor | None = None) -> Tensor:
        h = torch.addmm(xd.new_empty(()), xd, a.t(), beta=0, alpha=scaling)  # (N, E*r) = s * xd A^T, one product
        if gates is None:
            hs = h
        else:
            n = h.shape[0]
            hs = (h.view(n, -1, rank) * gates.unsqueeze(-1)).view(n, -1)  # (N, E*r) expert i's columns * g_i
        ctx.scaling, ctx.rank = scaling, rank
        ctx.save_for_backward(xd, a, b, gates, h, hs)
        if base is None:
            return torch.mm(hs, b.t())  # (N, d_out)
        return torch.addmm(base, hs, b.t())  # (N, d_out) base + the update, one product

    @staticmethod
    def backward(ctx, grad: Tensor):
        xd, a, b, gates, h, hs = ctx.saved_tensors
        s, r = ctx.scaling, ctx.rank
        need_x, need_a, need_b, need_g = ctx.needs_input_grad[:4]
        grad_b = grad_g = None
        if need_b:
            grad_b = torch.mm(grad.t(), hs)  # (d_out, E*r)
        grad_hs = torch.mm(grad, b)  # (N, E*r)
        if gates is None:
            grad_h = grad_hs
        else:
            n, e = gates.shape
            if need_g:  # g_i's gradient: the dot product of its r columns, one batched product for all (n, i)
                grad_g = torch.bmm(grad_hs.view(n * e, 1, r), h.view(n * e, r, 1)).view(n, e)
            grad_h = (grad_hs.view(n, e, r) * gates.unsqueeze(-1)).view(n, e * r)
        grad_x, grad_a = down_projection_grads(grad_h, xd, a, s, need_x, need_a)
        if len(ctx.needs_input_grad) == 6:  # apply() without base
            return grad_x, grad_a, grad_b, grad_g, None, None
        return grad_x, grad_a, grad_b, grad_g, None, None, grad if ctx.needs_input_grad[6] else None  # base's: the output's


def down_projection_grads(grad_h: Tensor, xd: Tensor, a: Tensor, scaling: float, need_x: bool,
                          need_a: bool) -> tuple[Tensor | None, Tensor | None]:
    """The gradients of ``h = scaling * xd A^T`` w.r.t. ``xd`` and ``A`` given ``dL/dh``, each one product with the
    scale as ``addmm``'s ``alpha`` (``None`` where not needed)."""
    grad_a = torch.addmm(a.new_empty(()), grad_h.t(), xd, beta=0, alpha=scaling) if need_a else None
    grad_x = torch.addmm(xd.new_empty(()), grad_h, a, beta=0, alpha=scaling) if need_x else None
    return grad_x, grad_a


def stacked_lora(xd: Tensor, a: Tensor, b: Tensor, gates: Tensor | None, scaling: float, rank: int,
                 base: Tensor | None = None) -> Tensor:
    """``sum_i g_i s B_i A_i xd`` ``(N, d_out)`` for stacked ``A`` ``(E*r, d_in)``, ``B`` ``(d_out, E*r)``, gates
    ``(N, E)`` (``None``: one expert of weight 1); the products of :meth:`LoRAExperts.forward`. With ``base``
    ``(N, d_out)`` (in the dtype the products run in), ``base +`` that sum, as the last product's ``addmm``.

    The same function as the autograd of those products, in fewer dispatched operations (each one kernel
    launch on a GPU): the scale rides on the first product (``addmm``'s ``alpha``), the gates' gradient is
    one batched dot product, and the backward computes only the gradients asked for (forward 3 operations,
    backward 6, against 4 and 8). Under autocast the operands go in cast to autocast's dtype, as the
    products would cast them, and the products then run in that dtype.
    """
    return apply_lora_function(_StackedLoRA, xd, a, b, gates, scaling, rank, base)


def compute_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype :func:`apply_lora_function` runs the products in: autocast's where it is on, else ``weight``'s."""
    kind = x.device.type
    # under torch.compile only is_autocast_enabled (folded to a constant; see mole.routers.base.autocast_enabled)
    available = torch.compiler.is_compiling() or torch.amp.is_autocast_available(kind)
    if available and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return weight.dtype


def apply_lora_function(fn: type[torch.autograd.Function], xd: Tensor, a: Tensor, b: Tensor, gates: Tensor | None,
                        *rest) -> Tensor:
    """``fn.apply(xd, a, b, gates, *rest)`` with the operands in one dtype: under autocast, autocast's (as its
    products would cast them; the function then runs with autocast off), otherwise the experts' (gates cast)."""
    kind = xd.device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        dt = torch.get_autocast_dtype(kind)
        xd, a, b = xd.to(dt), a.to(dt), b.to(dt)
        gates = None if gates is None else gates.to(dt)
        with torch.autocast(kind, enabled=False):
            return fn.apply(xd, a, b, gates, *rest)
    if gates is not None and gates.dtype != a.dtype:
        gates = gates.to(a.dtype)
    return fn.apply(xd, a, b, gates, *rest)
