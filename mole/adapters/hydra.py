"""HydraLoRA experts: one shared down-projection A, one up-projection B_i per expert.

Source: Tian et al., "HydraLoRA: An Asymmetric LoRA Architecture for Efficient Fine-Tuning"
(NeurIPS 2024); HMoRA Appendix C ("Hydra LoRA") and E.2. The layer computes

    z = W x + sum_i g_i (alpha / r) B_i A dropout(x)

with A ``(r, d_in)`` shared by all E experts (Kaiming-uniform, as LoRA) and B_i ``(d_out, r)`` zero, so
a fresh adapter changes nothing. Stacked, with no loop over experts:

    h = dropout(x) @ A^T                         (N, r)     once, whatever E is
    h = [g_1 h, ..., g_E h] * alpha / r          (N, E*r)
    z = h @ B_all^T                              (N, d_out) B_all = [B_1 ... B_E]  (d_out, E*r)

Parameters are named ``lora_A`` / ``lora_B`` like :class:`~mole.adapters.lora.LoRAExperts`, so LoRA+
(``*lora_B*`` learning rate) and checkpoints treat both kinds alike. With one expert it is plain LoRA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mole.adapters.lora import apply_lora_function, check_lora_args, down_projection_grads, lora_scaling
from mole.utils.dropout import ExpertDropout


class HydraLoRAExperts(nn.Module):
    """E HydraLoRA experts of rank r for one Linear ``d_in -> d_out`` (shared A, per-expert B).

    Args:
        in_features: d_in of the adapted Linear.
        out_features: d_out of the adapted Linear.
        num_experts: E (the number of B matrices).
        rank: r of A and of every B_i.
        alpha: LoRA alpha; the update is scaled by ``alpha / rank``.
        dropout: dropout on the experts' input.
        scaling: ``"lora"`` (``alpha / r``) or ``"rslora"`` (``alpha / sqrt(r)``), as :class:`LoRAExperts`.
    """

    adapter_kind = "linear"  # the contract: mole.adapters.kinds.LinearAdapter
    reads_base_output = False
    reads_base_weights = False
    adds_to_output = False

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
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))  # shared A
        self.lora_B = nn.Parameter(torch.zeros(out_features, num_experts * rank))  # [B_1 ... B_E]
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as LoRA's reference initialisation

    def forward(self, x: Tensor, gates: Tensor | None = None) -> Tensor:
        """Mixture of the experts' updates.

        Args:
            x: ``(N, d_in)`` token features.
            gates: ``(N, E)`` expert weights, or ``None`` (every expert weighs 1; plain LoRA when E = 1).

        Returns:
            ``(N, d_out)``: ``sum_i g_i (alpha/r) B_i A dropout(x)``.
        """
        if not torch.compiler.is_compiling():
            # eager: the dropout's scale folded into the LoRA scale, one autograd function (compiled code fuses)
            xd, c = self.dropout.unscaled(x) if isinstance(self.dropout, ExpertDropout) else (x, 1.0)
            return apply_lora_function(_HydraLoRA, xd, self.lora_A, self.lora_B, gates, self.scaling * c,
                                       self.num_experts)
        h = F.linear(self.dropout(x), self.lora_A)  # (N, r), the shared down-projection, once
        n = h.shape[0]
        if gates is None:
            weights = h.new_full((n, self.num_experts), self.scaling)  # (N, E)
        else:
            weights = gates.to(h.dtype) * self.scaling  # (N, E)
        h = (weights.unsqueeze(-1) * h.unsqueeze(1)).reshape(n, self.num_experts * self.rank)  # (N, E*r)
        return F.linear(h, self.lora_B)  # (N, d_out)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, "
            f"rank={self.rank}, scaling={self.scaling:g}, shared_A=True"
        )


class _HydraLoRA(torch.autograd.Function):
    """``z = sum_i g_i s B_i A xd`` (shared ``A`` ``(r, d_in)``, ``B`` ``(d_out, E*r)``) with a backward of its own:
    the products of :meth:`HydraLoRAExperts.forward` in fewer dispatched operations (forward 3, backward 6:
    the scale on the first product, the gates' and the shared ``h``'s gradients one batched product each)."""

    @staticmethod
    def forward(ctx, xd: Tensor, a: Tensor, b: Tensor, gates: Tensor | None, scaling: float, num_experts: int) -> Tensor:
        n, e = xd.shape[0], num_experts
        h = torch.addmm(xd.new_empty(()), xd, a.t(), beta=0, alpha=scaling)  # (N, r) = s * xd A^T
        if gates is None:  # every expert weighs 1
            hs = h.repeat(1, e)  # (N, E*r)
        else:
            hs = (gates.unsqueeze(-1) * h.unsqueeze(1)).view(n, -1)  # (N, E*r) expert i's columns g_i h
        ctx.scaling, ctx.num_experts = scaling, e
        ctx.save_for_backward(xd, a, b, gates, h, hs)
        return torch.mm(hs, b.t())  # (N, d_out)

    @staticmethod
    def backward(ctx, grad: Tensor):
        xd, a, b, gates, h, hs = ctx.saved_tensors
        s, e = ctx.scaling, ctx.num_experts
        n, r = h.shape
        need_x, need_a, need_b, need_g = ctx.needs_input_grad[:4]
        grad_b = grad_g = None
        if need_b:
            grad_b = torch.mm(grad.t(), hs)  # (d_out, E*r)
        grad_hs = torch.mm(grad, b).view(n, e, r)  # (N, E, r)
        if gates is None:
            grad_h = grad_hs.sum(dim=1)  # (N, r)
        else:
            if need_g:
                grad_g = torch.bmm(grad_hs, h.view(n, r, 1)).view(n, e)  # (N, E)
            grad_h = torch.bmm(gates.unsqueeze(1), grad_hs).view(n, r)  # (N, r) sum_i g_i dL/dh_i (any strides)
        grad_x, grad_a = down_projection_grads(grad_h, xd, a, s, need_x, need_a)
        return grad_x, grad_a, grad_b, grad_g, None, None
