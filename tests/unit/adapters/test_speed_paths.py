"""The fast paths: equal to their plain references, and free of host synchronisation.

* no host sync: every preset's forward and backward run on the meta device, where any data-dependent
  host read (``.item()``, ``nonzero``, ``bool(tensor)``, boolean-mask indexing) raises;
* MixLoRA's static-shape pair computation equals the whole-FFN-per-expert loop for soft, threshold
  (rows without any expert) and top-k gates;
* HMoRA's task encoder computes only ``e_task``'s position, equal to the full encoder layer's output there.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from mole.adapters import FFNLoRAExperts, LoRAExperts
from mole.adapters.ffn import max_active
from mole.bench.loops import mixlora_reference
from mole.build import build_aux_losses, build_mole_model
from mole.model.routing import collect_routing
from mole.routers import SoftRouter, TopKRouter
from mole.routers.base import param_dtype, run_router
from mole.routers.context import RoutingContext
from mole.routers.hybrid import TaskEncoder
from mole.routers.mor import MoRRouter
from mole.routers.select import Soft, TopK
from mole.routers.threshold import ThresholdRouter
from tests.conftest import assert_same_outputs_and_grads, compose_tiny

PRESETS = ["lora", "mola", "mola_mor", "mola_crw", "dynmole", "dynmole_topp", "hmora", "hmora_lw", "moa_soft",
           "hmora_ref", "dynmole_ref", "mola_ref",
           "moa_sparse", "hydralora", "mixlora", "adamole", "loramoe", "dora", "llama_adapter"]


@pytest.mark.parametrize("method", PRESETS)
def test_forward_and_backward_have_no_host_sync(method):
    """On the meta device a tensor has no data: any host read of one raises, so this passes only sync-free.
    The preset's auxiliary losses (balance, CGJS, Tsallis) are part of the step, padding mask included."""
    cfg = compose_tiny([f"method={method}"])
    model, _, _ = build_mole_model(cfg)
    aux = build_aux_losses(cfg)
    model.train().to("meta")
    ids = torch.zeros(2, 9, dtype=torch.long, device="meta")
    # no attention_mask: transformers' own mask helper reads the mask on the host; mole's code is under test
    with collect_routing(model) as routing:
        logits = model(input_ids=ids).logits
    assert logits.shape == (2, 9, model.config.vocab_size) and logits.is_meta
    token_mask = torch.ones(18, dtype=torch.bool, device="meta")
    total = logits.sum()
    for term in aux.values():
        total = total + term.weight * term(routing, token_mask).to(total.device)
    total.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n)


def test_a_host_sync_fails_on_the_meta_device():
    """The premise of the test above: reading a meta tensor's values raises."""
    g = torch.zeros(4, 3, device="meta")
    with pytest.raises((RuntimeError, NotImplementedError)):
        g.nonzero()
    with pytest.raises(RuntimeError):
        bool(g.any())


def _mixlora_layer(router: nn.Module, num_experts: int = 4):
    from tests.unit.adapters.test_adapters_blocks import _layer

    layer = _layer(hidden=8, heads=2, kv_heads=1, inter=12)
    experts = FFNLoRAExperts(layer, num_experts=num_experts, rank=2, alpha=4.0)
    experts.router = router
    experts.attach(layer)
    with torch.no_grad():
        for b in (experts.gate_B, experts.up_B, experts.down_B):
            b.normal_(std=0.5)
    return layer, experts


@pytest.mark.parametrize(
    "make_router, k",
    [
        (lambda: SoftRouter(8, 4), 4),  # every expert: k = E pairs per token
        (lambda: ThresholdRouter(8, 4, gate="sigmoid", tau_max=0.9, learnable=False), 4),
        (lambda: MoRRouter(8, 4, n_routers=2, selection=partial(TopK, top_k=3)), 3),
    ],
)
def test_mixlora_static_pairs_equal_the_per_expert_loop(make_router, k):
    torch.manual_seed(3)
    layer, experts = _mixlora_layer(make_router())
    assert experts.active_per_token() == k
    x = torch.randn(2, 5, 8, requires_grad=True)
    out = layer.mlp(x)
    gates = experts.router(x.reshape(-1, 8)).gates
    ref = mixlora_reference(layer.mlp, x.reshape(-1, 8), gates).view(2, 5, 8)
    assert_same_outputs_and_grads(out, ref, [x, *experts.parameters()])


def test_mixlora_tokens_without_experts_output_zero():
    """Threshold gates can leave a token with no expert: its MixLoRA output is exactly 0 (no bias here)."""
    torch.manual_seed(4)
    layer, experts = _mixlora_layer(ThresholdRouter(8, 4, gate="sigmoid", tau_max=1.0, learnable=False))
    x = torch.randn(3, 8)
    # sigmoid < 1 = tau everywhere: no (token, expert) pair is selected
    assert not experts.router(x).gates.any()
    assert torch.equal(layer.mlp(x), torch.zeros(3, 8))


def test_max_active_is_the_top_k_or_every_expert():
    assert max_active(TopKRouter(8, 6, top_k=2), 6) == 2
    assert max_active(MoRRouter(8, 6, selection=partial(TopK, top_k=3)), 6) == 3
    assert max_active(MoRRouter(8, 6, selection=Soft), 6) == 6
    assert max_active(SoftRouter(8, 6), 6) == 6


@pytest.mark.parametrize("norm_first", [False, True])
def test_task_encoder_computes_the_full_layers_output_at_e_task(norm_first):
    torch.manual_seed(6)
    emb = nn.Embedding(20, 16)
    enc = TaskEncoder(emb, RoutingContext(), heads=4, ffn_mult=2, dropout=0.0)
    enc.layer.norm_first = norm_first
    ids = torch.randint(0, 20, (3, 7))
    prompt = torch.zeros(3, 7, dtype=torch.bool)
    prompt[0, :4], prompt[1, :2], prompt[2, 1:6] = True, True, True  # row 2: a prompt not at the start
    prompt[1] = False if norm_first else prompt[1]  # no prompt at all: e_task attends to itself only
    fast = enc.encode(ids, prompt)  # (3, 16)
    seq = torch.cat([emb(ids), enc.e_task.expand(3, 1, -1)], dim=1)
    ignore = torch.cat([~prompt, torch.zeros(3, 1, dtype=torch.bool)], dim=1)
    enc.train()  # the full layer's plain (non fast-path) computation
    full = enc.layer(seq, src_key_padding_mask=ignore)[:, -1]
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
    # the folded key/value projections give the same gradients as the full layer's
    params = [enc.e_task, *enc.layer.parameters()]
    w = torch.randn_like(fast)
    g_fast = torch.autograd.grad((fast * w).sum(), params)
    g_full = torch.autograd.grad((full * w).sum(), params, allow_unused=True)
    for name, a, b in zip(["e_task", *dict(enc.layer.named_parameters())], g_fast, g_full, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    # keys outside the prompt are ignored: changing those tokens leaves H_task as it was
    changed = ids.clone()
    changed[0, 5:] = (changed[0, 5:] + 1) % 20
    torch.testing.assert_close(enc.encode(changed, prompt), fast)


def test_param_dtype_follows_the_module_after_a_cast():
    router = TopKRouter(4, 3, top_k=2)
    assert param_dtype(router) == torch.float32
    router.to(torch.float64)
    assert param_dtype(router) == torch.float64
    assert param_dtype(nn.ReLU()) is None
    # found generically, whatever the router names its weight (here two levels down, in float16)
    odd = nn.Module()
    odd.scorer = nn.Sequential(nn.Identity(), nn.Linear(4, 3, dtype=torch.float16))
    assert param_dtype(odd) == torch.float16
    x = torch.randn(5, 4)  # fp32 input
    with pytest.raises(RuntimeError):
        router.gate(x)  # a float64 Linear refuses fp32 input...
    gates = run_router(router, x).gates  # ...so run_router must cast the input to the router's dtype
    torch.testing.assert_close(gates, router(x.double()).gates)


def test_balance_loss_masks_padding_without_a_host_sync():
    from mole.losses import balance_loss
    from mole.routers.base import BalanceStats

    probs = torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]])
    selected = torch.tensor([[True, False], [True, False], [False, True]])
    mask = torch.tensor([True, False, True])  # row 1 is padding
    # real rows 0 and 2: F = (1/2, 1/2), P = (0.35, 0.65): L = 2 * (0.5 * 0.35 + 0.5 * 0.65) = 1.0
    assert balance_loss(BalanceStats(probs, selected, 1), mask).item() == pytest.approx(1.0)
    meta = BalanceStats(probs.to("meta"), selected.to("meta"), None)
    assert balance_loss(meta, mask.to("meta")).is_meta  # boolean indexing would raise here


def test_training_and_validation_forwards_build_no_kv_cache(monkeypatch):
    """A training step has no use for a KV cache; transformers builds one unless told (and copies every
    layer's keys and values into it)."""
    from transformers import cache_utils

    from mole.training.loop import loss_step, validation_loss

    made = []
    original = cache_utils.DynamicCache.__init__

    def counting_init(self, *args, **kwargs):
        made.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(cache_utils.DynamicCache, "__init__", counting_init)
    cfg = compose_tiny(["method=mola"])
    model, tok, _ = build_mole_model(cfg)
    ids = torch.randint(3, 200, (2, 7))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    model(input_ids=ids)  # the premise: a plain forward does build one
    assert made
    made.clear()
    model.train()
    loss, _ = loss_step(model, batch, {})
    loss.backward()
    validation_loss(model, [batch])
    assert not made


# ---- torch.compile: one graph per layer ----


def test_a_routed_layer_under_autocast_compiles_to_one_graph(monkeypatch):
    """The router leaves autocast (fp32 gates). Its check ``torch.amp.is_autocast_available`` is a builtin
    that Dynamo could not trace before torch 2.13: a graph break at every routed Linear (seen on an H100
    with torch 2.11). Made untraceable here on any torch version, it must not be reached under compile."""
    from mole.model.layer import MoLELinear

    real = torch.amp.is_autocast_available

    def untraceable(kind):
        torch._dynamo.graph_break()
        return real(kind)

    monkeypatch.setattr(torch.amp, "is_autocast_available", untraceable)
    torch.manual_seed(0)
    layer = MoLELinear(nn.Linear(16, 12).to(torch.bfloat16).requires_grad_(False), LoRAExperts(16, 12, 4, 2),
                       SoftRouter(16, 4))
    nn.init.normal_(layer.mole_experts.lora_B)
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = layer(x)
        compiled = torch.compile(layer, backend="eager", fullgraph=True)(x)
    assert torch.equal(compiled, eager)
    gates = run_router(layer.mole_router, x.float()).gates
    assert gates.dtype == torch.float32  # the router still ran outside autocast
