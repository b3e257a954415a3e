"""DoRA, parallel adapters, zero-gated prompts, MixLoRA FFN experts: each against a hand-computed example or
an explicit formula / per-expert loop."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from mole.adapters import DoRAExpert, FFNLoRAExperts, ParallelAdapterExperts, PromptExperts
from mole.adapters.ffn import MixLoRAFFN
from mole.bench.loops import mixlora_reference, parallel_reference
from mole.model.blocks import select_layers
from mole.model.layer import MoLELinear
from mole.routers import TopKRouter
from mole.utils.errors import MoleConfigError
from tests.conftest import assert_same_outputs_and_grads


def _layer(hidden=4, heads=1, kv_heads=1, head_dim=None, inter=8, mlp_bias=False) -> LlamaDecoderLayer:
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, head_dim=head_dim or hidden // heads, num_hidden_layers=1,
                      vocab_size=16, mlp_bias=mlp_bias)
    cfg._attn_implementation = "eager"
    return LlamaDecoderLayer(cfg, 0)


# ---------------------------------------------------------------------------------------------- DoRA


def _dora_layer(weight, bias, A, B, m, alpha=None, dropout=0.0):
    """A MoLELinear with DoRA; ``alpha`` defaults to the rank (scaling s = 1)."""
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    dora = DoRAExpert(weight.shape[1], weight.shape[0], rank=A.shape[0], alpha=alpha or A.shape[0], dropout=dropout,
                      base_layer=linear)
    with torch.no_grad():
        dora.lora_A.copy_(A)
        dora.lora_B.copy_(B)
        if m is not None:
            dora.magnitude.copy_(m)
    return MoLELinear(linear, dora)


def test_dora_hand_example():
    # W = [[3, 4], [0, 1]], r=1, s=1, B A = [[0, 0], [3, 0]] -> W + BA = [[3, 4], [3, 1]], row norms 5 and sqrt(10)
    # m = [10, 2 sqrt(10)] -> W' = [[6, 8], [6, 2]];  x = [1, 1] -> W'x = [14, 8];  + b = [1, -1] -> [15, 7]
    layer = _dora_layer(torch.tensor([[3.0, 4.0], [0.0, 1.0]]), torch.tensor([1.0, -1.0]),
                        A=torch.tensor([[1.0, 0.0]]), B=torch.tensor([[0.0], [3.0]]),
                        m=torch.tensor([10.0, 2 * math.sqrt(10)]))
    torch.testing.assert_close(layer(torch.tensor([[1.0, 1.0]])), torch.tensor([[15.0, 7.0]]))
    torch.testing.assert_close(layer.mole_experts.merged_weight(), torch.tensor([[6.0, 8.0], [6.0, 2.0]]))


def test_dora_magnitude_starts_at_the_row_norms_and_a_fresh_layer_is_the_base():
    # m = ||W||_c per output feature: rows [3, 4] and [0, 1] -> [5, 1]
    layer = _dora_layer(torch.tensor([[3.0, 4.0], [0.0, 1.0]]), None, A=torch.ones(1, 2), B=torch.zeros(2, 1), m=None)
    torch.testing.assert_close(layer.mole_experts.magnitude.detach(), torch.tensor([5.0, 1.0]))
    x = torch.randn(5, 2)
    assert torch.equal(layer(x), layer.base_layer(x))


def test_dora_equals_explicit_merged_weight_on_a_random_linear():
    torch.manual_seed(1)
    w, b = torch.randn(6, 5), torch.randn(6)
    A, B, m = torch.randn(3, 5), torch.randn(6, 3), torch.rand(6) + 0.5
    layer = _dora_layer(w, b, A, B, m, alpha=6.0)  # s = 2
    merged = w + 2.0 * B @ A
    w_prime = m[:, None] * merged / merged.norm(dim=1, keepdim=True)
    x = torch.randn(4, 5)
    torch.testing.assert_close(layer(x), x @ w_prime.T + b)


def test_dora_backward_treats_the_norm_as_a_constant():
    torch.manual_seed(2)
    w = torch.randn(4, 3)
    A, B, m = torch.randn(2, 3), torch.randn(4, 2), torch.rand(4) + 0.5
    layer = _dora_layer(w, None, A, B, m)
    x = torch.randn(5, 3)
    layer(x).sum().backward()

    def explicit(detach: bool):
        a, bb, mm = A.clone().requires_grad_(), B.clone().requires_grad_(), m.clone().requires_grad_()
        merged = w + bb @ a
        norm = merged.norm(dim=1, keepdim=True)
        out = x @ (mm[:, None] * merged / (norm.detach() if detach else norm)).T
        out.sum().backward()
        return bb.grad

    torch.testing.assert_close(layer.mole_experts.lora_B.grad, explicit(detach=True))
    assert not torch.allclose(layer.mole_experts.lora_B.grad, explicit(detach=False))  # the detach matters


def test_dora_dropout_reads_the_dropped_input_in_both_terms():
    torch.manual_seed(3)
    w, b = torch.randn(4, 3), torch.randn(4)
    A, B, m = torch.randn(2, 3), torch.randn(4, 2), torch.rand(4) + 0.5
    layer = _dora_layer(w, b, A, B, m, dropout=0.5).train()
    x = torch.randn(6, 3)
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)
    xd = layer.mole_experts.dropout(x)  # the same mask, drawn again from the same seed
    assert (xd == 0).any() and torch.equal(xd[xd != 0], (2 * x)[xd != 0])  # dropout p = 0.5 acted
    merged = w + B @ A
    c = m / merged.norm(dim=1)
    # W x + b + (c - 1) W xd + c B A xd   (peft's DoRA with dropout)
    torch.testing.assert_close(out, x @ w.T + b + (c - 1) * (xd @ w.T) + c * (xd @ A.T @ B.T))


def test_dora_with_several_experts_is_a_config_error():
    with pytest.raises(MoleConfigError, match="adapter=dora is a single-adapter baseline"):
        DoRAExpert(3, 4, num_experts=2, base_layer=torch.nn.Linear(3, 4))


# ---------------------------------------------------------------------------------------------- parallel adapter


def test_parallel_adapter_hand_example():
    # d=2, b=1, relu: down = [1, -1], up = [2, 0]^T;  x = [3, 1] -> relu(2) = 2 -> [4, 0];  gate 0.5 -> [2, 0]
    pa = ParallelAdapterExperts(hidden_size=2, bottleneck=1, num_experts=1)
    with torch.no_grad():
        pa.down.copy_(torch.tensor([[1.0, -1.0]]))
        pa.up.copy_(torch.tensor([[2.0], [0.0]]))
    torch.testing.assert_close(pa(torch.tensor([[3.0, 1.0]]), torch.tensor([[0.5]])), torch.tensor([[2.0, 0.0]]))
    torch.testing.assert_close(pa(torch.tensor([[1.0, 3.0]]), torch.tensor([[0.5]])), torch.tensor([[0.0, 0.0]]))  # relu(-2)


@pytest.mark.parametrize("bias", [False, True])
def test_parallel_adapter_stacked_equals_the_per_expert_loop(bias):
    torch.manual_seed(4)
    pa = ParallelAdapterExperts(hidden_size=6, num_experts=3, bottleneck=4, bias=bias, scaling=2.0, activation="gelu")
    with torch.no_grad():
        pa.up.normal_()
        if bias:
            pa.down_bias.normal_()
            pa.up_bias.normal_()
    x = torch.randn(5, 6)
    gates = torch.softmax(torch.randn(5, 3), -1) * torch.tensor([1.0, 0.0, 1.0])  # expert 1 never chosen
    out = pa(x, gates)
    ref = parallel_reference(pa, x, gates)
    torch.testing.assert_close(out, ref)
    params = [p for p in pa.parameters()]
    g1 = torch.autograd.grad(out.square().sum(), params)
    g2 = torch.autograd.grad(parallel_reference(pa, x, gates).square().sum(), params)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("position", ["ffn", "attn"])
def test_parallel_adapter_adds_to_the_block_output(position):
    torch.manual_seed(5)
    layer = _layer(hidden=8, heads=2, kv_heads=1, inter=16)
    x = torch.randn(2, 3, 8)
    rope = (torch.ones(2, 3, 4), torch.zeros(2, 3, 4))
    block = layer.mlp if position == "ffn" else layer.self_attn

    def run():
        if position == "ffn":
            return block(x)
        return block(hidden_states=x, position_embeddings=rope, attention_mask=None)[0]

    with torch.no_grad():
        base = run()
        pa = ParallelAdapterExperts(layer, num_experts=1, bottleneck=3, position=position)
        pa.attach(layer)
        assert torch.equal(run(), base)  # up is zero-initialised
        pa.up.normal_()
        torch.testing.assert_close(run(), base + pa(x.reshape(-1, 8)).view(2, 3, 8))


# ---------------------------------------------------------------------------------------------- prompt expert


def _identity_attention(layer):
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(layer.self_attn, name).weight.copy_(torch.eye(4))


def test_prompt_hand_example_one_head():
    # 1 head, hd = d = 4, q/k/v/o identity, no rotation (cos 1, sin 0). One token x = [2 ln 3, 0, 0, 0].
    # Prompts p1 = e1, p2 = 0: scores q.p / sqrt(4) = [ln 3, 0] -> softmax [3/4, 1/4] -> 3/4 e1 + 1/4 * 0.
    # Gate 0.5 -> prompt term [3/8, 0, 0, 0]. The sequence attention over the single token returns v = x.
    layer = _layer()
    _identity_attention(layer)
    prompt = PromptExperts(layer, num_experts=1, length=2)
    prompt.attach(layer)
    with torch.no_grad():
        prompt.prompt.copy_(torch.tensor([[[1.0, 0, 0, 0], [0, 0, 0, 0]]]))
    x = torch.tensor([[[2 * math.log(3), 0.0, 0.0, 0.0]]])
    rope = (torch.ones(1, 1, 4), torch.zeros(1, 1, 4))
    attn = layer.self_attn
    with torch.no_grad():
        out0 = attn(hidden_states=x, position_embeddings=rope, attention_mask=None)[0]
        assert torch.equal(out0, x)  # zero gate: exactly the base attention
        prompt.gate.fill_(0.5)
        out = attn(hidden_states=x, position_embeddings=rope, attention_mask=None)[0]
    torch.testing.assert_close(out, torch.tensor([[[2 * math.log(3) + 3 / 8, 0.0, 0.0, 0.0]]]))


def test_prompt_uses_rotated_queries_unrotated_prompt_keys_and_shares_kv_heads():
    # 2 query heads, 1 kv head (GQA), hd = 2, d = 4. Position angle 90 degrees: cos 0, sin 1, so RoPE maps
    # a head's query [a, b] to [-b, a]. q_proj = identity, k/v_proj read the first two features (kv head 0).
    torch.manual_seed(6)
    layer = _layer(hidden=4, heads=2, kv_heads=1, head_dim=2)
    attn = layer.self_attn
    with torch.no_grad():
        attn.q_proj.weight.copy_(torch.eye(4))
        attn.k_proj.weight.copy_(torch.eye(4)[:2])
        attn.v_proj.weight.copy_(torch.tensor([[0.0, 0, 1, 0], [0, 0, 0, 1]]))
        attn.o_proj.weight.copy_(torch.eye(4))
    prompt = PromptExperts(layer, num_experts=1, length=3)
    prompt.attach(layer)
    with torch.no_grad():
        prompt.gate.copy_(torch.tensor([[0.5, -2.0]]))
    x = torch.randn(1, 1, 4)
    rope = (torch.zeros(1, 1, 2), torch.ones(1, 1, 2))
    with torch.no_grad():
        prompt.gate.zero_()
        base = attn(hidden_states=x, position_embeddings=rope, attention_mask=None)[0]
        prompt.gate.copy_(torch.tensor([[0.5, -2.0]]))
        out = attn(hidden_states=x, position_embeddings=rope, attention_mask=None)[0]
    P = prompt.prompt.detach()[0]  # (3, 4)
    keys, values = P[:, :2], P[:, 2:]  # kv head 0, shared by both query heads, no rotation
    expected = []
    for h, g in ((0, 0.5), (1, -2.0)):
        a, b = x[0, 0, 2 * h].item(), x[0, 0, 2 * h + 1].item()
        q = torch.tensor([-b, a])  # rotated by 90 degrees
        probs = torch.softmax(keys @ q / math.sqrt(2), dim=0)
        expected.append(g * probs @ values)
    torch.testing.assert_close(out - base, torch.cat(expected).view(1, 1, 4))


def test_prompt_zero_gate_is_the_base_model(tiny_cfg):
    from mole.build import build_mole_model

    base, _, _ = build_mole_model(tiny_cfg("experts=single", "router=none", "experts.targets=[q_proj]"))
    model, _, rep = build_mole_model(tiny_cfg("method=llama_adapter"))
    assert rep.adapted == {0: [], 1: [], 2: ["self_attn.mole_prompt"], 3: ["self_attn.mole_prompt"]}  # "2:" of 4
    ids = torch.randint(0, 500, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)


def test_prompt_experts_are_weighted_by_their_router_gates():
    torch.manual_seed(8)
    layer = _layer(hidden=8, heads=2, kv_heads=2)
    prompt = PromptExperts(layer, num_experts=3, length=2)
    prompt.attach(layer)
    with torch.no_grad():
        prompt.gate.normal_()
    q = torch.randn(1, 2, 2, 4)  # (B, T, H, hd)
    gates = torch.tensor([[0.2, 0.0, 0.7], [1.0, 0.5, 0.0]])
    mixed = prompt.prompt_attention(q, gates)
    # expert e alone: zero the other experts' head gates
    single = []
    for e in range(3):
        with torch.no_grad():
            saved = prompt.gate.clone()
            prompt.gate[[i for i in range(3) if i != e]] = 0
            single.append(prompt.prompt_attention(q, torch.ones(2, 3)))
            prompt.gate.copy_(saved)
    expected = sum(gates[:, e].view(1, 2, 1) * single[e] for e in range(3))
    torch.testing.assert_close(mixed, expected)


# ---------------------------------------------------------------------------------------------- MixLoRA FFN


@pytest.mark.parametrize("mlp_bias", [False, True])
def test_mixlora_block_equals_the_per_expert_loop_for_top2(mlp_bias):
    torch.manual_seed(9)
    layer = _layer(hidden=8, heads=2, kv_heads=1, inter=12, mlp_bias=mlp_bias)
    experts = FFNLoRAExperts(layer, num_experts=4, rank=2, alpha=4.0)
    experts.router = TopKRouter(8, 4, top_k=2)
    experts.attach(layer)
    assert isinstance(layer.mlp, MixLoRAFFN)
    with torch.no_grad():
        for b in (experts.gate_B, experts.up_B, experts.down_B):
            b.normal_(std=0.5)
    x = torch.randn(2, 5, 8, requires_grad=True)
    out = layer.mlp(x)  # routes through experts.router
    gates = experts.router(x.reshape(-1, 8)).gates
    assert int((gates > 0).sum()) == 10 * 2  # top-2 of 4 per token
    ref = mixlora_reference(layer.mlp, x.reshape(-1, 8), gates).view(2, 5, 8)
    assert_same_outputs_and_grads(out, ref, [x, *experts.parameters()])


def test_mixlora_fresh_block_is_the_base_ffn():
    torch.manual_seed(10)
    layer = _layer(hidden=8, heads=2, kv_heads=1, inter=12)
    x = torch.randn(3, 8)
    with torch.no_grad():
        base = layer.mlp(x)
        experts = FFNLoRAExperts(layer, num_experts=4, rank=2)
        experts.router = TopKRouter(8, 4, top_k=2)
        experts.attach(layer)
        # top-2 weights sum to 1 up to rounding, so the mixture of identical experts is the base FFN
        torch.testing.assert_close(layer.mlp(x), base, rtol=1e-6, atol=1e-6)
        assert layer.mlp.gate_proj is not None and not hasattr(layer.mlp, "mole_router")


def test_mixlora_rejects_ffn_linears_that_already_carry_experts(tiny_cfg):
    from mole.build import build_mole_model

    with pytest.raises(MoleConfigError, match="ffn_expert replaces the FFN block"):
        build_mole_model(tiny_cfg("method=mixlora", "experts.single_targets=[q_proj,up_proj]"))


# ---------------------------------------------------------------------------------------------- config plumbing


def test_layer_selection():
    assert select_layers(None, 4, "k") == [0, 1, 2, 3]
    assert select_layers("2:", 32, "k") == list(range(2, 32))  # LLaMA-Adapter: top 30 of 32
    assert select_layers("-3:", 4, "k") == [1, 2, 3]
    assert select_layers([0, 3], 4, "k") == [0, 3]
    for bad in ("-30:", "x:", "5", [4]):
        with pytest.raises(MoleConfigError, match="k"):
            select_layers(bad, 4, "k")


def test_block_adapter_with_linear_targets_is_a_config_error(tiny_cfg):
    from mole.build import build_mole_model

    with pytest.raises(MoleConfigError, match=r"adapts blocks, not Linears.*experts.targets"):
        build_mole_model(tiny_cfg("adapter=parallel_adapter"))
    with pytest.raises(MoleConfigError, match="adapts the whole model"):
        build_mole_model(tiny_cfg("adapter=full_finetune"))


def test_parallel_adapter_mixture_with_its_own_routers(tiny_cfg):
    from mole.build import build_mole_model, parameter_report
    from mole.model.routing import collect_routing

    model, _, rep = build_mole_model(tiny_cfg("adapter=parallel_adapter", "experts=uniform_5", "experts.targets=[]",
                                              "router=soft"))
    assert rep.routers_per_layer == [1, 1, 1, 1]
    # per layer: 5 experts x (down 16x64 + up 64x16) + a 64x5 router
    assert parameter_report(model, rep)["trainable"] == 4 * (5 * 2 * 16 * 64 + 64 * 5)
    with collect_routing(model) as outs:
        model(input_ids=torch.randint(0, 500, (2, 5)))
    assert len(outs) == 4 and outs[0].gates.shape == (10, 5)
