"""Parallel adapters as experts (He et al. 2022, arXiv:2110.04366, Sec. 3; MoA Appendix A eq. 7).

A parallel adapter is a bottleneck MLP that reads a block's input and adds to the block's output:

    h <- h + s * f(x W_down) W_up           x: the block's input, h: the block's output

with ``W_down`` (d -> b), a nonlinearity ``f``, ``W_up`` (b -> d) zero-initialised (so a fresh adapter
changes nothing) and a scale ``s`` (He et al.'s "scaled PA"; 1 in MoA). ``position: ffn`` puts it beside
the FFN block (its input is the normalised hidden state the FFN reads), ``position: attn`` beside the
attention block.

E experts are stored and computed stacked, as the LoRA experts are (:mod:`mole.adapters.lora`):

    h = f(dropout(x) @ W_down_all^T + b_down)      (N, E*b)   every expert's bottleneck at once
    h = h * repeat(g * s, b)                       (N, E*b)   expert i's b units scaled by its gate
    z = h @ W_up_all^T (+ (g * s) @ b_up_all)      (N, d)     = sum_i g_i s PA_i(x)

exact for any gates (a zero gate contributes exactly zero, because the gate multiplies after ``f``).

NOTE(deviation): biases are off by default (``bias: false``, as in LLM-Adapters' bottleneck adapters that
MoA's data setup comes from); He et al.'s adapters have them (``bias: true``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mole.model.blocks import POSITIONS, BlockExperts, block_of, hidden_size_of
from mole.utils.dropout import ExpertDropout
from mole.utils.errors import MoleConfigError

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


class ParallelAdapterExperts(BlockExperts):
    """E parallel adapters beside one block of a decoder layer.

    Args:
        layer: the decoder layer (read for its hidden size; not kept).
        num_experts: E.
        bottleneck: b, the bottleneck width (MoA: 16).
        position: ``"ffn"`` or ``"attn"``: which block the adapters run beside.
        activation: ``relu`` (He et al.), ``gelu``, ``silu`` or ``tanh``.
        scaling: s, the output scale.
        bias: biases on the down and up projections.
        dropout: dropout on the adapters' input.
        hidden_size: d, when no layer is given (tests).
    """

    attr_name = "mole_parallel_adapter"

    def __init__(
        self,
        layer: nn.Module | None = None,
        num_experts: int = 1,
        bottleneck: int = 16,
        position: str = "ffn",
        activation: str = "relu",
        scaling: float = 1.0,
        bias: bool = False,
        dropout: float = 0.0,
        hidden_size: int | None = None,
    ):
        super().__init__()
        if position not in POSITIONS:
            raise MoleConfigError(f"adapter.position must be one of {list(POSITIONS)}, got {position!r}")
        if activation not in ACTIVATIONS:
            raise MoleConfigError(f"adapter.activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if not isinstance(bottleneck, int) or isinstance(bottleneck, bool) or bottleneck < 1:
            raise MoleConfigError(f"adapter.bottleneck must be a positive integer, got {bottleneck!r}")
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise MoleConfigError(f"adapter.dropout must be in [0, 1), got {dropout!r}")
        if num_experts < 1:
            raise MoleConfigError(f"the experts layout gives {num_experts} experts for a layer; need >= 1")
        d = hidden_size if layer is None else hidden_size_of(layer)
        if d is None:
            raise MoleConfigError("ParallelAdapterExperts needs a decoder layer or hidden_size")
        self.position, self.activation = position, activation
        self.num_experts, self.bottleneck, self.scaling = num_experts, bottleneck, float(scaling)
        self.in_features = self.out_features = d
        self.act = ACTIVATIONS[activation]
        self.dropout = ExpertDropout(dropout) if dropout > 0 else nn.Identity()
        self.down = nn.Parameter(torch.empty(num_experts * bottleneck, d))  # W_down_all (E*b, d)
        self.up = nn.Parameter(torch.zeros(d, num_experts * bottleneck))  # W_up_all (d, E*b), zero-init
        self.down_bias = nn.Parameter(torch.zeros(num_experts * bottleneck)) if bias else None
        self.up_bias = nn.Parameter(torch.zeros(num_experts, d)) if bias else None
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))  # nn.Linear's default; fan_in = d for every expert

    def forward(self, x: Tensor, gates: Tensor | None = None) -> Tensor:
        """``sum_i g_i s PA_i(x)`` for ``x`` ``(N, d)`` and gates ``(N, E)`` (``None``: one expert, weight 1)."""
        n = x.shape[0]
        h = self.act(F.linear(self.dropout(x), self.down, self.down_bias))  # (N, E*b)
        if gates is None:
            weights = h.new_full((n, self.num_experts), self.scaling)  # (N, E)
        else:
            weights = gates.to(h.dtype) * self.scaling  # (N, E)
        h = (h.view(n, self.num_experts, self.bottleneck) * weights.unsqueeze(-1)).view(n, -1)  # (N, E*b)
        out = F.linear(h, self.up)  # (N, d)
        if self.up_bias is not None:
            out = out + weights @ self.up_bias  # sum_i g_i s b_up_i
        return out

    def attach(self, layer: nn.Module) -> None:
        block = block_of(layer, self.position)
        if hasattr(block, self.attr_name):
            raise MoleConfigError(f"adapter: two parallel adapters on the same {self.position} block")
        setattr(block, self.attr_name, self)
        block.register_forward_hook(self._add_to_output, with_kwargs=True)

    def _add_to_output(self, module: nn.Module, args: tuple, kwargs: dict, output):
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))  # the block's input (B, T, d)
        flat = x.reshape(-1, self.in_features)  # (N, d)
        # in the adapter's dtype (model.adapter_dtype: fp32 experts on a bf16 base); the sum in the block's dtype
        delta = self(flat.to(self.down.dtype), self.route(flat, x)).view(x.shape)
        if isinstance(output, tuple):  # attention returns (attn_output, attn_weights)
            return (output[0] + delta.to(output[0].dtype), *output[1:])
        return output + delta.to(output.dtype)

    def extra_repr(self) -> str:
        return (f"position={self.position}, d={self.in_features}, experts={self.num_experts}, "
                f"bottleneck={self.bottleneck}, activation={self.activation}, scaling={self.scaling:g}")
