"""Per-expert Python loops: each stacked expert kind computed one expert at a time.

mole computes every expert kind stacked (:mod:`mole.adapters`), with no loop over experts. The loops here
compute the same sums one expert after another, as published MoLE code does. They serve two purposes:

* the tests' correctness references: a stacked forward (and its backward) must equal its loop;
* the benchmark's loop variants (:data:`mole.bench.variants.LOOPS`): a MoLE model whose experts' forward is
  swapped for a loop (:func:`swap_in_loops`), timed against the stacked model.

Training never calls them.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mole.adapters.ffn import MixLoRAFFN
from mole.adapters.hydra import HydraLoRAExperts
from mole.adapters.lora import LoRAExperts
from mole.adapters.parallel import ParallelAdapterExperts


def expert_weights(experts: LoRAExperts, i: int) -> tuple[Tensor, Tensor]:
    """Expert ``i``'s ``A_i`` ``(r, d_in)`` and ``B_i`` ``(d_out, r)``: views into the stacked matrices."""
    r = experts.rank
    return experts.lora_A[i * r : (i + 1) * r], experts.lora_B[:, i * r : (i + 1) * r]


def lora_reference(experts: LoRAExperts, x: Tensor, gates: Tensor | None = None) -> Tensor:
    """The plain per-expert loop ``sum_i g_i (alpha/r) B_i A_i dropout(x)`` (the bench's ``loop_soft``).

    Mathematically identical to :meth:`LoRAExperts.forward`; it computes each expert separately, as
    the published MoLE code does, and skips experts whose gates are all zero (not under ``torch.compile``,
    where that test would break the graph: there every expert is computed).
    """
    xd = experts.dropout(x)
    out = x.new_zeros(x.shape[0], experts.out_features)
    for i in range(experts.num_experts):
        a_i, b_i = expert_weights(experts, i)  # (r, d_in), (d_out, r)
        g_i = x.new_ones(x.shape[0]) if gates is None else gates[:, i].to(x.dtype)  # (N,)
        if gates is not None and not torch.compiler.is_compiling() and not bool(g_i.any()):
            continue
        out = out + g_i[:, None] * experts.scaling * F.linear(F.linear(xd, a_i), b_i)
    return out


def lora_loramoe_loop(experts: LoRAExperts, x: Tensor, gates: Tensor | None = None) -> Tensor:
    """The per-expert loop in the form of LoRAMoE's released code (Dou et al. 2024; ``loop_soft_loramoe``).

    As :func:`lora_reference`, but each expert draws a dropout mask of its own with torch's dropout
    (``nn.Dropout``), as LoRAMoE's forward does
    (``result + route_weight[..., i] * B_i(A_i(lora_dropout(x))) * scaling`` for each expert ``i``).
    In eval mode, or with dropout 0, it equals :meth:`LoRAExperts.forward`; in training its masks are
    independent per expert, where mole shares one mask across a layer's experts (:mod:`mole.adapters.lora`).
    """
    p = float(getattr(experts.dropout, "p", 0.0))
    out = x.new_zeros(x.shape[0], experts.out_features)
    for i in range(experts.num_experts):
        xd = F.dropout(x, p, experts.training) if p > 0 else x  # a fresh mask per expert
        a_i, b_i = expert_weights(experts, i)  # (r, d_in), (d_out, r)
        y = F.linear(F.linear(xd, a_i), b_i)  # (N, d_out)
        g_i = None if gates is None else gates[:, i : i + 1].to(x.dtype)  # (N, 1)
        out = out + (y if g_i is None else g_i * y) * experts.scaling
    return out


def lora_gather_loop(experts: LoRAExperts, x: Tensor, gates: Tensor | None = None) -> Tensor:
    """The per-expert *gather* loop of published sparse MoLE code (MoLA, Mixtral-style; ``loop_topk``).

    For each expert: gather the tokens routed to it (non-zero gate), compute its LoRA on them only and
    scatter-add the gated result back. Mathematically identical to :meth:`LoRAExperts.forward`; it syncs
    with the host once per expert (the size of each expert's token set).
    """
    if gates is None:
        return lora_reference(experts, x, gates)
    xd = experts.dropout(x)
    out = x.new_zeros(x.shape[0], experts.out_features)
    for i in range(experts.num_experts):
        tok = gates[:, i].nonzero(as_tuple=True)[0]  # (n_i,): the tokens routed to expert i
        if tok.numel() == 0:
            continue
        a_i, b_i = expert_weights(experts, i)  # (r, d_in), (d_out, r)
        y = F.linear(F.linear(xd[tok], a_i), b_i)  # (n_i, d_out)
        out = out.index_add(0, tok, y * (gates[tok, i].to(x.dtype) * experts.scaling).unsqueeze(-1))
    return out


def hydra_reference(experts: HydraLoRAExperts, x: Tensor, gates: Tensor | None = None) -> Tensor:
    """HydraLoRA's per-expert loop ``sum_i g_i (alpha/r) B_i A dropout(x)`` (one shared ``A``)."""
    xd = experts.dropout(x)
    r = experts.rank
    out = x.new_zeros(x.shape[0], experts.out_features)
    for i in range(experts.num_experts):
        b_i = experts.lora_B[:, i * r : (i + 1) * r]  # (d_out, r)
        g_i = x.new_ones(x.shape[0]) if gates is None else gates[:, i].to(x.dtype)  # (N,)
        out = out + g_i[:, None] * experts.scaling * F.linear(F.linear(xd, experts.lora_A), b_i)
    return out


def mixlora_reference(mlp: MixLoRAFFN, x: Tensor, gates: Tensor | None) -> Tensor:
    """MixLoRA's ``sum_i g_i FFN_i(x)`` with every expert computed as a whole FFN, one at a time."""
    ex = mlp.mole_experts
    r, s = ex.rank, ex.scaling
    out = 0.0
    for i in range(ex.num_experts):
        blk = slice(i * r, (i + 1) * r)
        w_gate = mlp.gate_proj.weight + s * ex.gate_B[:, blk] @ ex.gate_A[blk]
        w_up = mlp.up_proj.weight + s * ex.up_B[:, blk] @ ex.up_A[blk]
        w_down = mlp.down_proj.weight + s * ex.down_B[:, blk] @ ex.down_A[blk]
        h = mlp.act_fn(F.linear(x, w_gate, mlp.gate_proj.bias)) * F.linear(x, w_up, mlp.up_proj.bias)
        y = F.linear(h, w_down, mlp.down_proj.bias)
        g = x.new_ones(x.shape[0]) if gates is None else gates[:, i].to(x.dtype)
        out = out + g.unsqueeze(-1) * y
    return out


def parallel_reference(pa: ParallelAdapterExperts, x: Tensor, gates: Tensor | None = None) -> Tensor:
    """The parallel adapters' per-expert loop ``sum_i g_i s up_i(f(down_i x + b_i)) (+ b_up_i)``."""
    b = pa.bottleneck
    out = x.new_zeros(x.shape[0], pa.out_features)
    for i in range(pa.num_experts):
        down_b = None if pa.down_bias is None else pa.down_bias[i * b : (i + 1) * b]
        h = pa.act(F.linear(pa.dropout(x), pa.down[i * b : (i + 1) * b], down_b))  # (N, b)
        y = F.linear(h, pa.up[:, i * b : (i + 1) * b])
        if pa.up_bias is not None:
            y = y + pa.up_bias[i]
        g = x.new_ones(x.shape[0]) if gates is None else gates[:, i].to(x.dtype)
        out = out + g[:, None] * pa.scaling * y
    return out


def swap_in_loops(model: nn.Module, fn: Callable) -> int:
    """Replace every stacked LoRA expert set's forward by the per-expert loop ``fn``; returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, LoRAExperts) and m.num_experts > 1:
            m.forward = types.MethodType(fn, m)
            n += 1
    return n
