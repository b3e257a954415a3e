"""Zero-initialised gated prompts as experts (LLaMA-Adapter, Zhang et al. 2023, arXiv:2303.16199, Sec. 3;
MoA Appendix A eq. 8-9).

Each decoder layer gets L learnable prompt vectors ``P`` (L x d). The layer's *frozen* key and value
projections turn them into prompt keys and values; every query token attends to them with its own
softmax over the L prompts (separate from the softmax over the sequence), and the result is multiplied
by a per-head gate ``g_h`` initialised to 0 and added to the attention output before ``o_proj``:

    a_t,h = Attn(x)_t,h + g_h * softmax_L(q_t,h K_P,h^T / sqrt(hd)) V_P,h,   K_P = P W_k^T, V_P = P W_v^T

so a fresh adapter leaves the model exactly unchanged (eq. 9: "the first term is the original attention;
only the second term includes trainable parameters").

Details:

* Queries are the attention's own queries (the output of ``q_proj``, adapted if ``q_proj`` carries an
  expert, as in LLaMA-Adapter where the prompt attention reuses ``xq``), with RoPE applied. Prompt keys
  get no RoPE (LLaMA-Adapter's code rotates ``xq`` and ``xk`` but not the adapter keys).
* GQA: prompt keys/values have ``num_key_value_heads`` heads; query head h reads kv head
  ``h // (heads / kv_heads)``, as Hugging Face's ``repeat_kv``.
* E > 1 experts: E independent prompt sets (E x L vectors, an (E, H) gate), each with its own softmax;
  the router's gate ``g_t,e`` weighs expert e's contribution for token t.
* Wiring (no copy of the attention code): three hooks on the attention module — its pre-hook records the
  block input (for the router) and ``position_embeddings`` (RoPE cos/sin), a hook on ``q_proj`` records
  the queries, and a pre-hook on ``o_proj`` adds the prompt term to ``o_proj``'s input. If ``o_proj``
  carries a LoRA expert, the prompt term passes through it too (it is part of the attention output).

NOTE(deviation): LLaMA-Adapter's released code multiplies by ``tanh(g)``; the paper and MoA eq. 9 use
``g`` itself (the default). ``tanh_gate: true`` selects the code's form.
NOTE(deviation): prompts are initialised N(0, 1) (LLaMA-Adapter's ``nn.Embedding`` default); with a zero
gate their initial value does not change the output.
Limits: Llama/Qwen2/Mistral attention (separate q/k/v/o projections, RoPE through
``position_embeddings``); no per-head q/k norms.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mole.adapters.parallel import hidden_size_of
from mole.model.blocks import BlockExperts, block_of
from mole.utils.errors import MoleConfigError


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(q: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE as Llama applies it: ``q (B, T, H, hd)``, ``cos/sin (B, T, hd)``."""
    return q * cos.unsqueeze(2) + rotate_half(q) * sin.unsqueeze(2)


def _frozen(linear: nn.Module) -> nn.Module:
    """The base Linear of a projection (the frozen one when the projection carries an expert)."""
    return getattr(linear, "base_layer", linear)


class PromptExperts(BlockExperts):
    """E sets of L zero-gated prompts in the attention block of one decoder layer.

    Args:
        layer: the decoder layer (read for its widths and head counts; not kept).
        num_experts: E.
        length: L, prompts per expert (MoA: 10; LLaMA-Adapter: 10).
        tanh_gate: multiply by ``tanh(g)`` instead of ``g``.
        hidden_size, num_heads, num_kv_heads, head_dim: the widths, when no layer is given.
    """

    attr_name = "mole_prompt"
    position = "attn"

    def __init__(
        self,
        layer: nn.Module | None = None,
        num_experts: int = 1,
        length: int = 10,
        tanh_gate: bool = False,
        hidden_size: int | None = None,
        num_heads: int | None = None,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
    ):
        super().__init__()
        if not isinstance(length, int) or isinstance(length, bool) or length < 1:
            raise MoleConfigError(f"adapter.length must be a positive integer, got {length!r}")
        if num_experts < 1:
            raise MoleConfigError(f"the experts layout gives {num_experts} experts for a layer; need >= 1")
        if layer is not None:
            attn = block_of(layer, "attn")
            config = getattr(attn, "config", None)
            hidden_size = hidden_size_of(layer)
            num_heads = getattr(config, "num_attention_heads", None)
            num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
            head_dim = getattr(attn, "head_dim", None)
        if None in (hidden_size, num_heads, num_kv_heads, head_dim):
            raise MoleConfigError("adapter=prompt needs a Llama-style attention (config.num_attention_heads, head_dim)")
        if num_heads % num_kv_heads:
            raise MoleConfigError(f"adapter=prompt: {num_heads} heads are not a multiple of {num_kv_heads} kv heads")
        self.num_experts, self.length, self.tanh_gate = num_experts, length, bool(tanh_gate)
        self.in_features = hidden_size
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.prompt = nn.Parameter(torch.randn(num_experts, length, hidden_size))  # P: (E, L, d)
        self.gate = nn.Parameter(torch.zeros(num_experts, num_heads))  # g: (E, H), zero-init
        self._slot: dict = {}  # per-forward values between the hooks (cleared once used)

    # ---- wiring ----

    def attach(self, layer: nn.Module) -> None:
        attn = block_of(layer, "attn")
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if not isinstance(getattr(attn, name, None), nn.Module):
                raise MoleConfigError(f"adapter=prompt needs {name} in the attention of {type(layer).__name__}")
        if hasattr(attn, self.attr_name):
            raise MoleConfigError("adapter: two prompt adapters on the same attention block")
        setattr(attn, self.attr_name, self)
        object.__setattr__(self, "_k_proj", _frozen(attn.k_proj))  # references, owned by the attention
        object.__setattr__(self, "_v_proj", _frozen(attn.v_proj))
        attn.register_forward_pre_hook(self._capture_inputs, with_kwargs=True)
        attn.q_proj.register_forward_hook(self._capture_query)
        attn.o_proj.register_forward_pre_hook(self._add_prompt)

    def _capture_inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        rope = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
        self._slot = {"x": hidden, "rope": rope}

    def _capture_query(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        self._slot["q"] = output

    def _add_prompt(self, module: nn.Module, args: tuple):
        slot, self._slot = self._slot, {}
        if "q" not in slot or slot.get("x") is None:
            raise RuntimeError("adapter=prompt: the attention's inputs were not seen in this forward")
        if slot["rope"] is None:
            raise RuntimeError("adapter=prompt: the attention got no position_embeddings (RoPE cos/sin)")
        x = slot["x"]  # (B, T, d)
        b, t = x.shape[:2]
        q = slot["q"].view(b, t, self.num_heads, self.head_dim)  # (B, T, H, hd)
        cos, sin = slot["rope"]
        flat = x.reshape(-1, self.in_features)  # (N, d)
        contribution = self.prompt_attention(apply_rope(q, cos, sin), self.route(flat, x))  # (B, T, H*hd)
        attn_out = args[0]
        return (attn_out + contribution.to(attn_out.dtype), *args[1:])

    # ---- computation ----

    def prompt_kv(self) -> tuple[Tensor, Tensor]:
        """Prompt keys and values through the frozen projections, repeated to every query head: ``(E, L, H, hd)``."""
        e, L = self.num_experts, self.length
        # the prompts (model.adapter_dtype, fp32 by default) through the frozen projections in the base's dtype
        # (a quantized base stores integer codes: its Linears take the prompts in their own dtype)
        dtype = self._k_proj.weight.dtype if self._k_proj.weight.is_floating_point() else self.prompt.dtype
        flat = self.prompt.reshape(e * L, -1).to(dtype)  # (E*L, d)
        k = self._k_proj(flat).view(e, L, self.num_kv_heads, self.head_dim)
        v = self._v_proj(flat).view(e, L, self.num_kv_heads, self.head_dim)
        rep = self.num_heads // self.num_kv_heads
        return k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)  # (E, L, H, hd)

    def prompt_attention(self, q: Tensor, gates: Tensor | None) -> Tensor:
        """The gated prompt term for RoPE'd queries ``q (B, T, H, hd)`` and router gates ``(B*T, E)``.

        Returns ``(B, T, H*hd)``: ``sum_e g_t,e * gate_e,h * softmax_L(q K_e^T * hd^-0.5) V_e``.
        """
        b, t = q.shape[:2]
        k, v = self.prompt_kv()
        scores = torch.einsum("bthd,elhd->bthel", q.float(), k.float()) * self.head_dim**-0.5  # (B, T, H, E, L)
        probs = scores.softmax(dim=-1)  # softmax over the L prompts of each expert, per head
        ctx = torch.einsum("bthel,elhd->bthed", probs, v.float())  # (B, T, H, E, hd)
        head_gate = torch.tanh(self.gate) if self.tanh_gate else self.gate  # (E, H)
        ctx = ctx * head_gate.float().t()[None, None, :, :, None]
        if gates is not None:
            ctx = ctx * gates.float().view(b, t, 1, self.num_experts, 1)
        return ctx.sum(dim=3).reshape(b, t, self.num_heads * self.head_dim)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, length={self.length}, d={self.in_features}, heads={self.num_heads}, "
                f"kv_heads={self.num_kv_heads}, tanh_gate={self.tanh_gate}")
