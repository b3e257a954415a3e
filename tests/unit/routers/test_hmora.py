"""HMoRA: hierarchical hybrid routing, the task encoder, the presets and their parameter counts."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY

from mole.build import build_aux_losses, build_mole_model, parameter_report
from mole.config import compose_config
from mole.data import Collator, encode_records, load_datasets
from mole.model.routing import collect_routing
from mole.model.state import load_adapter, save_adapter
from mole.routers.context import RoutingContext, routing_inputs
from mole.routers.hybrid import HybridRouter, TaskEncoder, layer_alpha
from mole.training import TrainArgs
from mole.training.loop import loss_step
from mole.training.optim import build_optimizer
from mole.utils.errors import MoleConfigError

# ---- a_l (eq. 8) ----


@pytest.mark.parametrize(
    "eps, mu, row",
    [  # HMoRA Table 5 (L = 5): a^(0) .. a^(5)
        (2, 0, [0.12, 0.23, 0.40, 0.60, 0.77, 0.88]),
        (-2, 0, [0.88, 0.77, 0.60, 0.40, 0.23, 0.12]),
        (10, 0, [0, 0, 0.12, 0.88, 1, 1]),
        (10, 4, [0, 0.12, 0.88, 1, 1, 1]),
        (0, 0, [0.5] * 6),
    ],
)
def test_alpha_reproduces_hmora_table5(eps, mu, row):
    # l = 0 .. L with L = 5: a model of six layers
    assert [round(layer_alpha(i, 6, eps, mu), 2) for i in range(6)] == row


def test_alpha_runs_from_sigma_minus_eps_plus_mu_to_sigma_eps_plus_mu():
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    assert layer_alpha(0, 28, 4, -2) == pytest.approx(sig(-6))
    assert layer_alpha(27, 28, 4, -2) == pytest.approx(sig(2))
    assert layer_alpha(0, 1, 4, -2) == pytest.approx(sig(-6))  # one layer: l / L taken as 0


# ---- hybrid gates on a hand example ----


class _FixedTask:
    """Stands in for the task encoder: a fixed H_task per sequence."""

    def __init__(self, h: torch.Tensor):
        self.h, self.width, self.users = h, h.shape[1], 0

    def representation(self) -> torch.Tensor:
        return self.h


def _hand_router(mu: float, top_k):
    # one sequence of two tokens; E = 4 experts; features of width 2
    ctx = RoutingContext()
    ctx.attention_mask = torch.ones(1, 2, dtype=torch.long)
    task = _FixedTask(torch.tensor([[1.0, 0.0]]))
    router = HybridRouter(2, 4, layer_idx=0, num_layers=2, context=ctx, task_encoder=task,
                          eps=0.0, mu=mu, top_k=top_k)
    ln = math.log
    with torch.no_grad():
        if router.token_gate is not None:
            # token 1 = [1, 0] -> softmax prop. to [4, 2, 1, 1]; token 2 = [0, 1] -> prop. to [1, 2, 1, 5]
            router.token_gate.weight.copy_(torch.tensor([[ln(4), 0.0], [ln(2), ln(2)], [0.0, 0.0], [0.0, ln(5)]]))
        if router.task_gate is not None:
            # H_task = [1, 0] -> softmax prop. to [2, 1, 3, 1]
            router.task_gate.weight.copy_(torch.tensor([[ln(2), 0.0], [0.0, 0.0], [ln(3), 0.0], [0.0, 0.0]]))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    return router, x


A_QUARTER = -math.log(3)  # sigmoid(-log 3) = 1/4: eps = 0 gives a_l = 1/4 in every layer


def test_soft_hybrid_gates_by_hand():
    router, x = _hand_router(A_QUARTER, None)
    assert router.alpha == pytest.approx(0.25) and router.kinds == ["token", "task"]
    out = router(x)
    tok = torch.tensor([[4, 2, 1, 1], [1, 2, 1, 5]]) / torch.tensor([[8.0], [9.0]])
    task = torch.tensor([2, 1, 3, 1]) / 7.0
    expected = 0.25 * task + 0.75 * tok  # eq. 7, the task gates broadcast to both tokens
    torch.testing.assert_close(out.gates, expected)
    torch.testing.assert_close(out.gates[0], torch.tensor([0.25 * 2 / 7 + 0.375, 0.25 / 7 + 0.1875,
                                                            0.25 * 3 / 7 + 0.09375, 0.25 / 7 + 0.09375]))
    assert out.selected is None and out.balance == []
    (d_tok, d_task) = out.distributions()
    assert (d_tok.kind, d_tok.level, d_task.kind, d_task.level) == ("token", "token", "task", "sequence")
    torch.testing.assert_close(d_task.probs, task[None])
    torch.testing.assert_close(d_tok.probs, tok)


def test_top2_hybrid_gates_by_hand_apply_top_k_per_router_before_mixing():
    router, x = _hand_router(A_QUARTER, 2)
    out = router(x)
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731 - softmax over two values = sigmoid of their gap
    # token 1 keeps experts 0, 1 (1/2, 1/4): second softmax -> sig(1/4), sig(-1/4)
    # token 2 keeps experts 3, 1 (5/9, 2/9): -> sig(3/9), sig(-3/9)
    # task keeps experts 2, 0 (3/7, 2/7): -> sig(1/7), sig(-1/7)
    t1 = [0.75 * sig(0.25) + 0.25 * sig(-1 / 7), 0.75 * sig(-0.25), 0.25 * sig(1 / 7), 0.0]
    t2 = [0.25 * sig(-1 / 7), 0.75 * sig(-1 / 3), 0.25 * sig(1 / 7), 0.75 * sig(1 / 3)]
    torch.testing.assert_close(out.gates, torch.tensor([t1, t2]))
    assert out.selected.tolist() == [[True, True, True, False], [True, True, True, True]]
    (b_tok, b_task) = out.balance
    assert b_tok.level == "token" and b_task.level == "sequence" and b_task.probs.shape == (1, 4)
    assert b_task.selected.tolist() == [[True, False, True, False]]


def test_single_router_layers_use_their_router_alone():
    low, x = _hand_router(-3.0, 2)  # a = sigmoid(-3) = 0.047 < 0.2: token router only
    assert low.task_gate is None and low.kinds == ["token"]
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    torch.testing.assert_close(low(x).gates[0], torch.tensor([sig(0.25), sig(-0.25), 0.0, 0.0]))
    high, x = _hand_router(3.0, None)  # a = 0.953 > 0.8: task router only
    assert high.token_gate is None and high.kinds == ["task"]
    out = high(x)
    torch.testing.assert_close(out.gates, (torch.tensor([2, 1, 3, 1]) / 7.0).expand(2, 4))
    assert [d.kind for d in out.distributions()] == ["task"]


def test_hybrid_layer_without_a_task_encoder_is_a_config_error():
    with pytest.raises(MoleConfigError, match="task encoder"):
        HybridRouter(4, 4, layer_idx=3, num_layers=4)


# ---- the model: routers per layer, parameter counts, the task encoder ----


def _tiny(*overrides: str):
    return build_mole_model(compose_config([*TINY, *overrides]))


def test_layers_below_beta_low_and_above_beta_high_have_no_task_or_token_router():
    # tiny_llama: 4 layers, L = 3; eps 4, mu -2: a = 0.0025, 0.034, 0.339, 0.881
    model, _, rep = _tiny("method=hmora")
    report = parameter_report(model, rep)
    assert [layer["router_kinds"] for layer in report["layers"]] == [["token"], ["token"], ["token", "task"], ["task"]]
    assert [layer["a_l"] for layer in report["layers"]] == [0.0025, 0.0344, 0.3392, 0.8808]
    layers = model.model.layers
    assert layers[0].self_attn.q_proj.mole_router.task_gate is None
    assert layers[3].mlp.down_proj.mole_router.token_gate is None
    # hand count: 8 LoRA experts r=8 on 7 Linears; token routers d_in x 8 in layers 0-2; task routers
    # 64 x 8 (the model width) in layers 2-3; the task encoder (width 64, FFN 128) and e_task once
    shapes = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]
    experts = 4 * sum(8 * 8 * (i + o) for i, o in shapes)
    token_routers = 3 * sum(i * 8 for i, _ in shapes)
    task_routers = 2 * 7 * 64 * 8
    encoder = (3 * 64 * 64 + 3 * 64) + (64 * 64 + 64) + (64 * 128 + 128) + (128 * 64 + 64) + 4 * 64 + 64
    assert report["per_model"] == {"mole_task_encoder": encoder}
    assert report["trainable"] == experts + token_routers + task_routers + encoder == 315136


def test_no_task_router_anywhere_builds_no_task_encoder():
    model, _, rep = _tiny("method=hmora", "router.eps=0", "router.mu=-2")  # a = 0.12 everywhere
    assert not hasattr(model, "mole_task_encoder")
    assert "per_model" not in parameter_report(model, rep)


def _hooked_encoder(model):
    calls = []
    model.mole_task_encoder.layer.linear1.register_forward_hook(lambda *_: calls.append(1))  # once per encoder pass
    return calls


def test_task_representation_is_computed_once_per_forward_from_the_prompt_only():
    model, _, _ = _tiny("method=hmora")
    model.eval()
    calls = _hooked_encoder(model)
    ids = torch.randint(3, 500, (2, 9))
    prompt = torch.zeros(2, 9, dtype=torch.bool)
    prompt[:, :5] = True  # the first 5 tokens are the prompt, the rest the target
    enc = model.mole_task_encoder

    def h_task(input_ids, prompt_mask):
        with torch.no_grad(), routing_inputs(model, prompt_mask):
            model(input_ids=input_ids)
        return enc._last.clone()

    h = h_task(ids, prompt)
    assert len(calls) == 1  # one encoder pass for the 2 layers x 7 task routers
    assert h.shape == (2, 64)
    changed_target = ids.clone()
    changed_target[:, 6:] = (changed_target[:, 6:] + 11) % 500
    assert torch.equal(h_task(changed_target, prompt), h)
    changed_prompt = ids.clone()
    changed_prompt[0, 2] = (changed_prompt[0, 2] + 11) % 500
    h2 = h_task(changed_prompt, prompt)
    assert not torch.allclose(h2[0], h[0]) and torch.equal(h2[1], h[1])
    # without a prompt mask every real token counts (lm-eval's case): the target then matters
    assert not torch.allclose(h_task(changed_target, None), h_task(ids, None))


def test_task_representation_ignores_padding():
    model, _, _ = _tiny("method=hmora")
    model.eval()
    ids = torch.randint(3, 500, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        both = model.mole_task_encoder._last.clone()
        model(input_ids=ids[1:, :5])
        alone = model.mole_task_encoder._last.clone()
    torch.testing.assert_close(both[1], alone[0], rtol=1e-5, atol=1e-5)


def test_e_task_starts_as_the_embedding_of_the_question_mark():
    model, tok, _ = _tiny("method=hmora")
    (qid,) = tok.encode("?", add_special_tokens=False)
    assert torch.equal(model.mole_task_encoder.e_task.detach(), model.get_input_embeddings().weight[qid])
    assert model.mole_task_encoder.e_task.requires_grad
    assert not any(p.requires_grad for n, p in model.named_parameters() if "embed_tokens" in n)


def test_cached_generation_reuses_the_prompts_task_representation():
    model, _, _ = _tiny("method=hmora")
    model.eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(std=0.5)  # experts now matter
    prompt = torch.randint(3, 500, (1, 6))
    with torch.no_grad():
        first = model(input_ids=prompt, use_cache=True)
        nxt = first.logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        step = model(input_ids=nxt, past_key_values=first.past_key_values,
                     attention_mask=torch.ones(1, 7, dtype=torch.long), use_cache=True)
        full_ids = torch.cat([prompt, nxt], dim=1)
        only_prompt = torch.tensor([[True] * 6 + [False]])
        with routing_inputs(model, only_prompt):
            reference = model(input_ids=full_ids).logits[:, -1]
        everything = model(input_ids=full_ids).logits[:, -1]  # H_task would include the new token
    torch.testing.assert_close(step.logits[:, -1], reference, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(step.logits[:, -1], everything, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "override, key",
    [("router.task_encoder.heads=5", "router.task_encoder.heads"),
     ("router.task_encoder.init_token='?!?x'", "router.task_encoder.init_token"),
     ("+router.task_encoder.layers=2", "router.task_encoder: unknown keys")],
)
def test_task_encoder_config_errors_name_the_key(override, key):
    with pytest.raises(MoleConfigError, match=key):
        _tiny("method=hmora", override)


def test_task_encoder_width_follows_the_model():
    with pytest.raises(MoleConfigError, match="dividing the model width 64"):
        TaskEncoder(torch.nn.Embedding(10, 64), RoutingContext(), heads=24)


# ---- presets on tiny_llama ----

PRESETS = ["hmora", "hmora_lw", "hmora_ref", "molora", "hydralora"]


@pytest.mark.parametrize("method", PRESETS)
def test_fresh_preset_model_equals_the_base_model(method):
    ids = torch.randint(0, 500, (2, 7))
    base, _, _ = _tiny("experts=single", "router=none", "experts.targets=[q_proj]")
    model, _, _ = _tiny(f"method={method}")
    model.eval()
    with torch.no_grad(), routing_inputs(model, torch.ones(2, 7, dtype=torch.bool)):
        torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits, rtol=0, atol=0)


def test_hmora_lw_shares_routers_and_uses_single_lora_on_o_and_down():
    model, _, rep = _tiny("method=hmora_lw")
    assert rep.routers_per_layer == [2, 2, 2, 2]  # q/k/v and gate/up
    layer = model.model.layers[2]
    assert layer.self_attn.o_proj.mole_router is None and layer.self_attn.o_proj.num_experts == 1
    shared = layer.mole_shared_routers["q_proj_k_proj_v_proj"].router
    assert isinstance(shared, HybridRouter) and shared.kinds == ["token", "task"]
    with collect_routing(model) as outs:
        model(input_ids=torch.randint(0, 500, (2, 5)))
    assert len(outs) == 4 * 2  # each shared hybrid router published once


def _batch(cfg, tok):
    train, _ = load_datasets(cfg.data, seed=0)
    return Collator(tok.pad_token_id)(encode_records(train[:2], tok, 256))


@pytest.mark.parametrize("method", ["hmora", "hmora_lw", "hmora_ref"])
def test_preset_trains_every_parameter_and_lowers_the_loss(method):
    cfg = compose_config([*TINY, f"method={method}", "trainer.lr=5e-3", "router.dropout=0.0",
                          "router.task_encoder.dropout=0.0"])
    model, tok, _ = build_mole_model(cfg)
    batch = _batch(cfg, tok)
    opt = build_optimizer(model, TrainArgs.from_config(cfg.trainer))
    aux = build_aux_losses(cfg)
    assert set(aux) == {"cgjs"}
    model.train()
    losses, reached = [], set()
    for _ in range(3):
        loss, parts = loss_step(model, batch, aux)
        loss.backward()
        # B = 0 at first, so A gets its first gradient once the chosen experts' B moved; a top-2 choice
        # may move to other experts between steps, so count every step
        reached |= {n for n, p in model.named_parameters() if p.grad is not None and p.grad.any()}
        opt.step()
        opt.zero_grad()
        losses.append(parts["lm_loss"].item())
        assert parts["aux/cgjs"].item() > 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable - reached == set()
    encoder = {n for n in trainable if n.startswith("mole_task_encoder.")}
    assert "mole_task_encoder.e_task" in encoder and len(encoder) == 13  # e_task + the encoder layer's 12
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("method", ["hmora", "hmora_lw", "hmora_ref"])
def test_save_load_round_trip_gives_identical_logits(method, tmp_path):
    cfg = compose_config([*TINY, f"method={method}"])
    a, _, _ = build_mole_model(cfg)
    with torch.no_grad():
        for _n, p in a.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))  # away from any initialisation, e_task included
    save_adapter(a, tmp_path / "adapter.safetensors")
    cfg.seed = cfg.seed + 1  # another adapter, router and task-encoder initialisation ...
    b, _, _ = build_mole_model(cfg)
    # ... on the same base weights (tiny_llama's random base also follows the seed)
    b.load_state_dict({k: v for k, v in a.state_dict().items() if "mole_" not in k}, strict=False)
    ids = torch.randint(0, 500, (2, 9))
    a.eval()
    b.eval()
    with torch.no_grad():
        assert not torch.equal(b(input_ids=ids).logits, a(input_ids=ids).logits)
        load_adapter(b, tmp_path / "adapter.safetensors")
        torch.testing.assert_close(b(input_ids=ids).logits, a(input_ids=ids).logits, rtol=0, atol=0)


# ---- trainable-parameter percentages against the paper (meta device: no weights) ----


def _percent(*overrides: str) -> float:
    model, _, rep = build_mole_model(compose_config(list(overrides)), meta=True)
    return parameter_report(model, rep)["percent"]


def _floor2(x: float) -> float:
    """The paper's TP column is truncated to two decimals (e.g. 6.4281% -> 6.42, Table 10)."""
    return math.floor(x * 100) / 100


QWEN = "model=qwen2_1_5b"
LLAMA = "model=llama3_2_1b"
SINGLE = ["experts.targets=[q_proj,k_proj,v_proj,gate_proj,up_proj]", "experts.single_targets=[o_proj,down_proj]"]


@pytest.mark.parametrize(
    "overrides, paper",
    [
        # HMoRA Table 3 (Qwen2-1.5B)
        ([QWEN, "method=lora", "adapter.rank=64"], 4.78),
        ([QWEN, "method=molora"], 3.82),
        ([QWEN, "method=hydralora"], 3.20),
        ([QWEN, "method=hmora"], 6.31),
        ([QWEN, "method=hmora_lw"], 3.90),
        # Table 11 (each design alone on HMoRA)
        ([QWEN, "method=hmora", "experts.placement=shared"], 6.22),
        ([QWEN, "method=hmora", *SINGLE], 4.77),
        ([QWEN, "method=hmora", "adapter=hydra"], 4.46),
        # Table 10 (constant and hierarchical a_l)
        ([QWEN, "method=hmora", "router.eps=0", "router.mu=-2"], 5.04),
        ([QWEN, "method=hmora", "router.eps=0", "router.mu=-1.35"], 6.42),
        ([QWEN, "method=hmora", "router.eps=0", "router.mu=2"], 6.16),
        ([QWEN, "method=hmora", "router.eps=-4", "router.mu=0"], 6.29),
        ([QWEN, "method=hmora", "router.eps=4", "router.mu=0"], 6.29),
        ([QWEN, "method=hmora", "router.eps=4", "router.mu=2"], 6.26),
        # Table 12 (Llama-3.2-1B)
        ([LLAMA, "method=lora"], 0.45),
        ([LLAMA, "method=lora", "adapter.rank=64"], 3.64),
        ([LLAMA, "method=molora"], 2.67),
        ([LLAMA, "method=hydralora"], 2.37),
        ([LLAMA, "method=hmora"], 6.61),
        ([LLAMA, "method=hmora_lw"], 4.63),
    ],
)
def test_trainable_percent_matches_hmora_tables(overrides, paper):
    assert _floor2(_percent(*overrides)) == paper


def test_hmora_qwen_trainable_count_by_hand():
    model, _, rep = build_mole_model(compose_config([QWEN, "method=hmora"]), meta=True)
    report = parameter_report(model, rep)
    d, kv, ff, e, r, layers = 1536, 256, 8960, 8, 8, 28
    shapes = [(d, d), (d, kv), (d, kv), (d, d), (d, ff), (d, ff), (ff, d)]
    experts = layers * e * sum(r * (i + o) for i, o in shapes)
    a = [layer_alpha(i, layers, 4, -2) for i in range(layers)]
    n_token = sum(x <= 0.8 for x in a)
    n_task = sum(x >= 0.2 for x in a)
    assert (n_token, n_task) == (25, 12)
    token = n_token * sum(i * e for i, _ in shapes)
    task = n_task * 7 * d * e
    encoder = 4 * d * d + 4 * d + 2 * (d * 2 * d) + 2 * d + d + 4 * d + d  # attention, FFN, 2 norms, e_task
    assert report["trainable"] == experts + token + task + encoder == 97_419_264
    assert report["base"] == 1_543_714_304
