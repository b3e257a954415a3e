"""The fast paths: equal to their plain references, and free of host synchronisation.

* no host sync: every preset's forward and backward run on the meta device, where any data-dependent
  host read (``.item()``, ``nonzero``, ``bool(tensor)``, boolean-mask indexing) raises;
* MixLoRA's static-shape pair computation equals the whole-FFN-per-expert loop for soft, threshold
  (rows without any expert) and top-k gates;
* the per-expert gather loop timed by ``scripts/bench.py`` equals the stacked experts, and so does the loop in
  LoRAMoE's form in eval mode (in training it draws one dropout mask per expert);
* HMoRA's task encoder computes only ``e_task``'s position, equal to the full encoder layer's output there.
"""

from __future__ import annotations

import shlex
from functools import partial

import pytest
import torch
from torch import nn

from mole.adapters import FFNLoRAExperts, LoRAExperts
from mole.adapters.ffn import max_active
from mole.adapters.ffn import reference_forward as ffn_reference
from mole.adapters.lora import gather_reference_forward, per_expert_dropout_loop_forward, reference_forward
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
    ref = ffn_reference(layer.mlp, x.reshape(-1, 8), gates).view(2, 5, 8)
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


def test_gather_loop_equals_the_stacked_experts_with_unused_experts():
    torch.manual_seed(5)
    ex = LoRAExperts(6, 5, num_experts=4, rank=2, alpha=4.0)
    with torch.no_grad():
        ex.lora_B.normal_()
    x = torch.randn(7, 6, requires_grad=True)
    # hand-made top-2 gates; expert 3 is never chosen
    gates = torch.zeros(7, 4)
    for t in range(7):
        gates[t, t % 3], gates[t, (t + 1) % 3] = 0.75, 0.25
    fast, loop, dense = ex(x, gates), gather_reference_forward(ex, x, gates), reference_forward(ex, x, gates)
    torch.testing.assert_close(loop, fast)
    torch.testing.assert_close(dense, fast)
    ga = torch.autograd.grad(fast.sum(), [x, ex.lora_A, ex.lora_B])
    gb = torch.autograd.grad(loop.sum(), [x, ex.lora_A, ex.lora_B])
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b)
    # expert 3 got no token: its B block has zero gradient in both
    assert not ga[2][:, 6:8].any() and not gb[2][:, 6:8].any()


def test_loramoe_form_loop_equals_the_stacked_experts_in_eval_mode():
    torch.manual_seed(7)
    ex = LoRAExperts(6, 5, num_experts=4, rank=2, alpha=4.0, dropout=0.3).eval()
    with torch.no_grad():
        ex.lora_B.normal_()
    x = torch.randn(7, 6, requires_grad=True)
    gates = torch.softmax(torch.randn(7, 4), dim=-1)
    fast, loop = ex(x, gates), per_expert_dropout_loop_forward(ex, x, gates)
    torch.testing.assert_close(loop, fast)
    ga = torch.autograd.grad(fast.sum(), [x, ex.lora_A, ex.lora_B])
    gb = torch.autograd.grad(loop.sum(), [x, ex.lora_A, ex.lora_B])
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b)


def test_loramoe_form_loop_draws_a_dropout_mask_per_expert_in_training():
    """LoRAMoE's released forward calls its dropout inside the loop over experts: one mask per expert, from
    torch's dropout. Two identical experts with equal gates then differ only by their masks."""
    torch.manual_seed(8)
    ex = LoRAExperts(64, 1, num_experts=2, rank=1, alpha=1.0, dropout=0.5).train()
    with torch.no_grad():
        ex.lora_A.fill_(1.0)
        ex.lora_B.fill_(1.0)
    x, gates = torch.ones(4, 64), torch.tensor([[1.0, 0.0], [0.0, 1.0]]).repeat(2, 1)
    torch.manual_seed(9)
    out = per_expert_dropout_loop_forward(ex, x, gates)  # (4, 1): row t gets expert t % 2 only
    torch.manual_seed(9)
    m0, m1 = (torch.nn.functional.dropout(x, 0.5, True) for _ in range(2))  # the two draws, in expert order
    torch.testing.assert_close(out, torch.where(gates[:, :1].bool(), m0.sum(1, keepdim=True), m1.sum(1, keepdim=True)))
    assert not torch.equal(m0, m1)


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


def _load_bench():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[3] / "scripts" / "bench.py"
    spec = importlib.util.spec_from_file_location("mole_bench_script", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules[spec.name]


def test_bench_compile_settings_fail_past_the_recompile_limit_instead_of_running_eagerly():
    # past Dynamo's recompile limit a compiled layer would silently run eagerly, and the bench would compare
    # compiled steps with eager ones; its settings make that an error. Traced only (backend "eager").
    import torch._dynamo as dynamo

    keys = [k for k in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                        "accumulated_cache_size_limit", "fail_on_recompile_limit_hit", "fail_on_cache_limit_hit",
                        "skip_nnmodule_hook_guards") if hasattr(dynamo.config, k)]
    saved = {k: getattr(dynamo.config, k) for k in keys}
    try:
        dynamo.reset()
        _load_bench().configure_dynamo()
        assert not dynamo.config.skip_nnmodule_hook_guards  # MoA's layer routers are hooks: guard them
        dynamo.config.recompile_limit = 1
        f = torch.compile(lambda x: x * 2, backend="eager", dynamic=False)
        f(torch.ones(2))
        limit_hit = getattr(dynamo.exc, "FailOnRecompileLimitHit", None) or dynamo.exc.FailOnCacheLimitHit
        with pytest.raises(limit_hit):
            f(torch.ones(3))  # a second shape: a second graph, past the limit of 1
    finally:
        for k, v in saved.items():
            setattr(dynamo.config, k, v)
        dynamo.reset()


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


def test_the_soft_loop_reference_compiles_to_one_graph():
    """Under compile the per-expert loop computes every expert instead of testing its gates on the host
    (``bool(g.any())`` breaks the graph), so the bench's compiled ``loop_soft`` is a whole-graph loop."""
    torch.manual_seed(0)
    experts = LoRAExperts(16, 12, 4, 2)
    nn.init.normal_(experts.lora_B)
    x, gates = torch.randn(6, 16), torch.softmax(torch.randn(6, 4), -1)
    gates[:, 2] = 0.0  # an expert no token uses: skipped eagerly, computed (as zero) when compiled
    f = torch.compile(lambda x, g: reference_forward(experts, x, g), backend="eager", fullgraph=True)
    torch.testing.assert_close(f(x, gates), reference_forward(experts, x, gates))
    torch.testing.assert_close(f(x, gates), experts(x, gates))


@pytest.mark.slow  # torch.compile of every bench variant: the slowest test of the default tier
def test_bench_compiles_each_variant_with_its_own_code_objects():
    """Dynamo caches graphs per code object. The bench gives every variant's layers their own, so that a
    graph-breaking variant (the gather loop) leaves no partial graph that another variant's layer matches."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from mole.model.inject import decoder_layers

    bench = _load_bench()
    torch._dynamo.reset()
    try:
        models = {}
        for name, method in (("lora", "lora"), ("loop", "mola")):
            model, _, _ = build_mole_model(compose_tiny([f"method={method}", "adapter.dropout=0"]))
            if name == "loop":
                assert bench.swap_in_loops(model, gather_reference_forward)
            bench.compile_model(model, "layer", tag=name, backend="eager")
            models[name] = model
        ids = torch.randint(3, 100, (2, 8))
        for model in models.values():
            model(input_ids=ids).logits.sum().backward()
        layer_cls = type(decoder_layers(models["lora"])[0])
        assert not _debug_get_cache_entry_list(layer_cls.forward.__code__)  # the shared code: untouched
        codes = {name: {layer.forward.__code__ for layer in decoder_layers(m)} for name, m in models.items()}
        assert all(len(c) == 1 for c in codes.values()) and codes["lora"].isdisjoint(codes["loop"])
        (lora_code,) = codes["lora"]
        assert lora_code.co_name.endswith("__lora")
        # mole's LoRA layers: whole graphs, at most one for the first layer (input without grad) and one for the rest
        assert 1 <= len(_debug_get_cache_entry_list(lora_code)) <= 2
    finally:
        torch._dynamo.reset()


def test_bench_times_an_added_variant_beside_the_baseline(tmp_path):
    """``--add-variant NAME=OVERRIDES`` builds a variant from mole-train overrides and reports its ratio."""
    bench = _load_bench()
    small = ["model.hidden_size=64", "model.num_layers=1", "model.config.intermediate_size=128",
             "model.config.num_attention_heads=4", "model.config.num_key_value_heads=2"]
    args = ["--device", "cpu", "--threads", "1", "--variants", "soft_e8", "--rounds", "2", "--warmup", "0",
            "--batch", "1", "--seq", "8", "--no-eval", "--keep-freed-memory", "off", "--out", str(tmp_path),
            "--add-variant", "soft_no_dropout=method=lora experts=uniform_8 router=soft loss=none adapter.dropout=0"]
    for o in small:
        args += ["--model-override", o]
    result = bench.main(args)
    assert set(result["ratios_vs_peft_lora_r8"]) == {"soft_e8", "soft_no_dropout"}
    assert result["trainable"]["soft_no_dropout"] == result["trainable"]["soft_e8"]
    assert "| soft_no_dropout |" in (tmp_path / "latest.md").read_text()
    # the recorded command runs again as it is: the added variant's overrides stay one argument
    assert shlex.split(result["command"])[2:] == args


@pytest.mark.parametrize("spec, message", [
    ("no_overrides", "expected NAME=OVERRIDES"),
    ("bad name=method=lora", "expected NAME=OVERRIDES"),
    ("soft_e8=method=lora", "already taken"),
])
def test_bench_rejects_a_malformed_added_variant(tmp_path, capsys, spec, message):
    with pytest.raises(SystemExit):
        _load_bench().main(["--device", "cpu", "--out", str(tmp_path), "--add-variant", spec])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--rounds", "0"), ("--warmup", "-1")])
def test_bench_rejects_rounds_or_warmup_out_of_range(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit):
        _load_bench().main(["--device", "cpu", "--out", str(tmp_path), flag, value])
    assert flag in capsys.readouterr().err
