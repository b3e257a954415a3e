"""MixLoRA FFN experts (Li et al. 2024, arXiv:2404.15159; HMoRA Appendix E.2).

The FFN block of each layer becomes E experts; expert i is the whole gated FFN with LoRA on its three
Linears, and a top-k router (one per FFN block) weighs them, with a load-balancing loss:

    FFN_i(x) = (W_down + s B^d_i A^d_i) h_i,   h_i = f((W_gate + s B^g_i A^g_i) x) * ((W_up + s B^u_i A^u_i) x)
    y = sum_i g_i(x) FFN_i(x)

computed without a Python loop over experts and without repeating frozen work:

* ``W_gate x`` and ``W_up x`` are computed ONCE per token and shared by every expert; each expert adds
  its LoRA deltas to them.
* ``W_down`` is linear, so ``sum_i g_i W_down h_i = W_down (sum_i g_i h_i)``: the frozen down projection
  is applied once to the gate-weighted sum of the experts' hidden activations (exact). Its bias, if any,
  is added with weight ``sum_i g_i`` (1 for top-k and softmax gates).
* Only the k (token, expert) pairs of each token with the largest gates are computed (P = N k pairs: the
  router's top-k; k = E for soft or variable-count routing, where unused pairs have gate 0 and add 0). The
  shapes are static: no host synchronisation. The A matrices of all experts are stacked (``(E*r, d)``)
  and applied once per token; each pair keeps its expert's block of r columns in an otherwise zero
  ``(P, E*r)`` matrix, so one product with the stacked B serves every pair. The down projection's LoRA is
  summed over a token's pairs before its B (linear), so that product runs once per token.

Cost per layer, beside the frozen FFN (which costs what the base model's does): P intermediate
activations of width I (memory ``k x`` the base FFN's for top-k), and LoRA products of
``N E r (2d + I) + P E r (2I)`` multiply-adds for gate/up/down (the B products over the zero blocks
cost E times the minimum), small while ``E * r`` is much smaller than d (8 x 8 = 64 here).

A fresh block equals the base FFN exactly when the gates of each token sum to 1 (softmax, top-k):
every ``B`` is zero, so every expert is the frozen FFN.

The attention Linears get a plain LoRA through ``experts.single_targets`` and ``adapter.linear``.
NOTE(deviation): one dropout mask on the block's input is shared by all experts (as for stacked LoRA).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mole.adapters.lora import check_lora_args
from mole.adapters.parallel import hidden_size_of
from mole.model.blocks import BlockExperts
from mole.routers.mor import MoRRouter
from mole.routers.topk import TopKRouter
from mole.utils.dropout import ExpertDropout
from mole.utils.errors import MoleConfigError

FFN_LINEARS = ("gate_proj", "up_proj", "down_proj")


def max_active(router: nn.Module, num_experts: int) -> int:
    """How many experts ``router`` can give a non-zero gate per token: its top-k, else all ``num_experts``."""
    if isinstance(router, (TopKRouter, MoRRouter)) and router.top_k is not None:
        return int(router.top_k)
    return num_experts


class FFNLoRAExperts(BlockExperts):
    """E MixLoRA experts (stacked LoRA on gate/up/down) for the FFN block of one decoder layer.

    Args:
        layer: the decoder layer (read for its widths; its ``mlp`` is replaced on :meth:`attach`).
        num_experts: E.
        rank: r of every LoRA.
        alpha: the LoRA updates are scaled by ``alpha / rank``.
        dropout: dropout on the LoRA inputs.
        hidden_size, intermediate_size: the widths, when no layer is given.
    """

    attr_name = "mole_experts"
    reads_base_weights = True  # each expert is the whole FFN: W_gate x, W_up x and W_down from the frozen block
    position = "ffn"

    def __init__(
        self,
        layer: nn.Module | None = None,
        num_experts: int = 1,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        hidden_size: int | None = None,
        intermediate_size: int | None = None,
    ):
        super().__init__()
        check_lora_args(num_experts, rank, alpha, dropout)
        if layer is not None:
            mlp = getattr(layer, "mlp", None)
            if not all(isinstance(getattr(mlp, n, None), nn.Module) for n in (*FFN_LINEARS, "act_fn")):
                raise MoleConfigError(
                    f"adapter=ffn_expert needs a gated FFN (mlp.gate_proj/up_proj/down_proj/act_fn) in {type(layer).__name__}"
                )
            hidden_size = hidden_size_of(layer)
            intermediate_size = mlp.gate_proj.out_features
        if hidden_size is None or intermediate_size is None:
            raise MoleConfigError("FFNLoRAExperts needs a decoder layer or hidden_size and intermediate_size")
        d, inter, er = hidden_size, intermediate_size, num_experts * rank
        self.num_experts, self.rank, self.scaling = num_experts, rank, alpha / rank
        self.in_features, self.intermediate_size = d, inter
        self.dropout = ExpertDropout(dropout) if dropout > 0 else nn.Identity()
        self.gate_A = nn.Parameter(torch.empty(er, d))  # (E*r, d)
        self.gate_B = nn.Parameter(torch.zeros(inter, er))  # (I, E*r)
        self.up_A = nn.Parameter(torch.empty(er, d))
        self.up_B = nn.Parameter(torch.zeros(inter, er))
        self.down_A = nn.Parameter(torch.empty(er, inter))  # (E*r, I)
        self.down_B = nn.Parameter(torch.zeros(d, er))  # (d, E*r)
        for a in (self.gate_A, self.up_A, self.down_A):
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # per expert the LoRA reference init (fan_in = its d_in)

    def attach(self, layer: nn.Module) -> None:
        mlp = layer.mlp
        taken = [n for n in FFN_LINEARS if type(getattr(mlp, n)) is not nn.Linear]
        if taken or any(n.startswith("mole_") for n, _ in mlp.named_children()) or mlp._forward_hooks:
            raise MoleConfigError(
                "adapter=ffn_expert replaces the FFN block, which already carries an adapter "
                f"({taken or 'a block adapter'}); remove gate_proj/up_proj/down_proj from experts.targets and "
                "experts.single_targets, and list block adapters that run beside the FFN after ffn_expert"
            )
        layer.mlp = MixLoRAFFN(mlp, self)

    def active_per_token(self) -> int:
        """The most experts a token can use: the own top-k router's k, else every expert (E).

        Only an upper bound on the non-zero gates per row: the pairs of :meth:`mix` are the ``k`` largest
        gates of each token, and a chosen pair with a zero gate contributes exactly zero.
        """
        if self.gate_source is None and self.router is not None:
            return max_active(self.router, self.num_experts)
        return self.num_experts

    def mix(self, x: Tensor, gate_out: Tensor, up_out: Tensor, gates: Tensor | None, act) -> tuple[Tensor, Tensor, Tensor]:
        """The experts of the selected (token, expert) pairs, mixed; no host synchronisation.

        Each token takes its ``k`` largest gates (:meth:`active_per_token`: the router's top-k, so the
        pairs are exactly the selected ones; ``k = E`` for routers whose count varies, where the unused
        pairs have gate 0 and add exactly 0). Shapes are static (``P = N k`` pairs), so nothing waits for
        the device to say how many pairs there are.

        Args:
            x: ``(N, d)`` the block's input.
            gate_out, up_out: ``(N, I)`` the frozen ``W_gate x`` and ``W_up x`` (with their biases).
            gates: ``(N, E)`` router gates (0 = not selected), or ``None`` for one expert of weight 1.
            act: the FFN's activation.

        Returns:
            ``(h_mix (N, I), lora_down (N, d), gate_sum (N,))``: ``sum_i g_i h_i``, ``sum_i g_i s B^d_i A^d_i h_i``
            and ``sum_i g_i``.
        """
        n, e, r = x.shape[0], self.num_experts, self.rank
        if gates is None:
            w = x.new_ones(n, 1)  # (N, 1)
            exp = torch.zeros(n, 1, dtype=torch.long, device=x.device)
            gate_sum = x.new_ones(n)
        else:
            k = min(self.active_per_token(), e)
            w, exp = gates.to(x.dtype).topk(k, dim=-1)  # (N, k), (N, k): each token's chosen experts
            gate_sum = gates.to(x.dtype).sum(dim=-1)  # (N,)
        k = exp.shape[1]
        arange = torch.arange(e, device=x.device)
        onehot = (exp.unsqueeze(-1) == arange).to(x.dtype).unsqueeze(-1)  # (N, k, E, 1): pair j of a token -> its expert block
        xd = self.dropout(x)
        # gate/up LoRA: A for every expert once per token, then each pair keeps its expert's block of r columns
        a = torch.cat([F.linear(xd, self.gate_A), F.linear(xd, self.up_A)], dim=-1)  # (N, 2*E*r)
        a = a.view(n, 1, 2, e, r)
        blocks = a * onehot.unsqueeze(2)  # (N, k, 2, E, r), zero outside the pair's expert
        g = gate_out.unsqueeze(1) + F.linear(blocks[:, :, 0].reshape(n, k, e * r), self.gate_B) * self.scaling  # (N, k, I)
        u = up_out.unsqueeze(1) + F.linear(blocks[:, :, 1].reshape(n, k, e * r), self.up_B) * self.scaling  # (N, k, I)
        wk = w.unsqueeze(-1)  # (N, k, 1)
        if not torch.compiler.is_compiling() and is_silu(act):
            # eager: the (N, k, I) activations are recomputed in the backward from g and u (see _PairHidden)
            keep = self.dropout.mask(g) if isinstance(self.dropout, ExpertDropout) else None
            h_mix, ad = _PairHidden.apply(g, u, w, self.down_A, keep)  # (N, I), (N, k, E*r)
        else:
            h = act(g) * u  # (N, k, I): expert e_(t,j)'s hidden activation for token t
            h_mix = (h * wk).sum(dim=1)  # (N, I)
            ad = F.linear(self.dropout(h), self.down_A)  # (N, k, E*r)
        # down LoRA, summed over a token's pairs before B: sum_j w_j s B_e A_e h_j = B_all (sum_j w_j s onehot_j A_all h_j)
        ad = ad.view(n, k, e, r) * onehot * (wk.unsqueeze(-1) * self.scaling)
        lora_down = F.linear(ad.sum(dim=1).reshape(n, e * r), self.down_B)  # (N, d)
        return h_mix, lora_down, gate_sum

    def extra_repr(self) -> str:
        return (f"d={self.in_features}, intermediate={self.intermediate_size}, experts={self.num_experts}, "
                f"rank={self.rank}, scaling={self.scaling:g}")


def is_silu(act) -> bool:
    """Whether the FFN's activation is SiLU (``F.silu``, ``nn.SiLU`` or transformers' ``SiLUActivation``)."""
    return act is F.silu or isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


class _PairHidden(torch.autograd.Function):
    """The pairs' hidden activations ``h_j = silu(g_j) * u_j`` ``(N, k, I)``, mixed and down-projected:
    ``h_mix = sum_j w_j h_j`` ``(N, I)`` and ``(keep * h) @ A_d^T`` ``(N, k, E*r)`` (``keep``: the scaled
    dropout mask, or ``None``).

    Autograd would keep five ``(N, k, I)`` tensors for the backward (``g``, ``silu(g)``, ``u``, ``h`` and the
    dropped ``h``) beside the mask; this keeps ``g`` and ``u`` and recomputes the other three in the
    backward (three elementwise passes), so a MixLoRA step holds about as much as the per-expert
    implementations do. The same values and gradients as the autograd form (tests/unit/adapters).
    """

    @staticmethod
    def forward(ctx, g: Tensor, u: Tensor, w: Tensor, down_a: Tensor, keep: Tensor | None):
        h = F.silu(g) * u  # (N, k, I)
        h_mix = torch.bmm(w.unsqueeze(1), h).squeeze(1)  # (N, I) sum_j w_j h_j
        ad = torch.matmul(h if keep is None else h * keep, down_a.t())  # (N, k, E*r)
        ctx.save_for_backward(g, u, w, down_a, keep)
        return h_mix, ad

    @staticmethod
    def backward(ctx, grad_mix: Tensor, grad_ad: Tensor):
        g, u, w, down_a, keep = ctx.saved_tensors
        n, k, i = g.shape
        s = F.silu(g)
        h = s * u  # (N, k, I), recomputed
        grad_h = grad_mix.unsqueeze(1) * w.unsqueeze(-1)  # (N, k, I) from h_mix
        grad_w = torch.bmm(h, grad_mix.unsqueeze(-1)).squeeze(-1)  # (N, k) <h_j, dL/dh_mix>
        from_ad = torch.matmul(grad_ad, down_a)  # (N, k, I) dL/d(keep * h)
        grad_h = grad_h + from_ad if keep is None else torch.addcmul(grad_h, from_ad, keep)
        hd = h if keep is None else h * keep
        grad_down_a = torch.mm(grad_ad.reshape(n * k, -1).t(), hd.reshape(n * k, i))  # (E*r, I)
        grad_g = torch.ops.aten.silu_backward(grad_h * u, g)
        return grad_g, grad_h * s, grad_w, grad_down_a, None


class MixLoRAFFN(nn.Module):
    """The FFN block with MixLoRA experts; keeps the original ``gate_proj/up_proj/down_proj/act_fn``
    children (same parameter names as the base model) and adds ``mole_experts``."""

    def __init__(self, mlp: nn.Module, experts: FFNLoRAExperts):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.act_fn = mlp.act_fn
        for attr in ("config", "hidden_size", "intermediate_size"):  # plain attributes some code reads
            if hasattr(mlp, attr):
                object.__setattr__(self, attr, getattr(mlp, attr))
        self.mole_experts = experts

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])  # (N, d)
        gates = self.mole_experts.route(flat, x)  # (N, E) or None
        gate_out, up_out = self.gate_proj(flat), self.up_proj(flat)  # (N, I) each: frozen, once
        # the experts' arithmetic in their dtype (model.adapter_dtype: fp32 experts on a bf16 base)
        dt = self.mole_experts.gate_A.dtype
        h_mix, lora_down, gate_sum = self.mole_experts.mix(flat.to(dt), gate_out.to(dt), up_out.to(dt), gates, self.act_fn)
        w_down = self.down_proj.weight
        y = F.linear(h_mix.to(w_down.dtype), w_down)  # W_down (sum_i g_i h_i), once, in the base's dtype
        if self.down_proj.bias is not None:
            y = y + gate_sum.to(y.dtype).unsqueeze(-1) * self.down_proj.bias
        return (y + lora_down.to(y.dtype)).view(*x.shape[:-1], -1)
