"""The presets dora, mixlora, adamole, moa_soft, moa_sparse, full_ft, prompt_tuning, llama_adapter on tiny_llama:
fresh model vs base, gradients, two optimizer steps, checkpoint round trip; MoA's per-layer gate columns;
whole-model baselines (prompt tuning's shapes and generation, full fine-tuning's checkpoint)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from mole.adapters.prompt import apply_rope
from mole.build import build_aux_losses, build_mole_model, parameter_report
from mole.data import Collator, encode_records, load_datasets
from mole.model.state import load_adapter, save_adapter
from mole.recipes.evaluate import run_eval
from mole.recipes.train import run_train
from mole.training import TrainArgs
from mole.training.loop import loss_step
from mole.training.optim import build_optimizer

PRESETS = ["dora", "mixlora", "adamole", "moa_soft", "moa_sparse", "full_ft", "prompt_tuning", "llama_adapter"]
# fresh model vs the base model
EXACT = {"dora", "adamole", "moa_soft", "moa_sparse", "full_ft", "llama_adapter"}  # bit for bit
ROUNDING = {"mixlora"}  # the top-2 weights of a token sum to 1 only up to rounding
# parameters that get no gradient by design: Sparse MoA keeps g_i itself (MoA eq. 4), so the learnable
# threshold tau(x) (eq. 5) only enters a comparison (see mole.routers.threshold)
NO_GRAD = {"moa_sparse": ("router.threshold.",)}
IDS = torch.randint(0, 500, (2, 9))


def _batch(cfg, tok):
    train, _ = load_datasets(cfg.data, seed=0)
    return Collator(tok.pad_token_id)(encode_records(train[:4], tok, 256))


@pytest.mark.parametrize("method", PRESETS)
def test_preset_trains(tiny_cfg, method):
    cfg = tiny_cfg(f"method={method}", "trainer.lr=5e-3")
    model, tok, _ = build_mole_model(cfg)
    batch = _batch(cfg, tok)
    opt = build_optimizer(model, TrainArgs.from_config(cfg.trainer))
    aux = build_aux_losses(cfg)
    skip = NO_GRAD.get(method, ())
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad and not any(s in n for s in skip)}
    assert trainable and all(p.requires_grad for n, p in model.named_parameters() if any(s in n for s in skip))
    model.train()
    losses = []
    for step in range(3):
        loss, parts = loss_step(model, batch, aux)
        loss.backward()
        if step == 1:
            # after one step every zero-initialised factor (LoRA B, adapter up, prompt gate) has moved, so
            # every trainable parameter gets a non-zero gradient
            silent = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
            assert not silent, silent
        opt.step()
        opt.zero_grad()
        losses.append(parts["lm_loss"].item())
    assert losses[2] < losses[0]  # two optimizer steps lower the loss on the repeated batch


@pytest.fixture(scope="module")
def base_logits():
    from conftest import compose_tiny

    base, _, _ = build_mole_model(compose_tiny(["method=full_ft"]))  # full fine-tuning changes no weight
    with torch.no_grad():
        return base(input_ids=IDS).logits


@pytest.mark.parametrize("method", PRESETS)
def test_fresh_preset_vs_base_and_checkpoint_round_trip(tiny_cfg, tmp_path, base_logits, method):
    cfg = tiny_cfg(f"method={method}")
    a, _, _ = build_mole_model(cfg)
    with torch.no_grad():
        got = a(input_ids=IDS).logits
    assert got.shape == base_logits.shape == (2, 9, base_logits.shape[-1])
    if method in EXACT:
        assert torch.equal(got, base_logits)
    elif method in ROUNDING:
        torch.testing.assert_close(got, base_logits, rtol=1e-5, atol=1e-5)
    else:  # prompt tuning: the real tokens attend to the virtual ones from the start
        assert method == "prompt_tuning" and not torch.allclose(got, base_logits, atol=1e-3)
    # checkpoint round trip: perturbed trainable weights, saved, loaded into a fresh build
    with torch.no_grad():
        for p in a.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    save_adapter(a, tmp_path / "adapter.safetensors")
    b, _, _ = build_mole_model(cfg)
    with torch.no_grad():
        before = b(input_ids=IDS).logits
        load_adapter(b, tmp_path / "adapter.safetensors")
        after, want = b(input_ids=IDS).logits, a(input_ids=IDS).logits
    assert not torch.equal(before, want)  # the trained weights matter
    assert torch.equal(after, want)


# ---------------------------------------------------------------------------------------------- MoA


def test_moa_soft_layer_gate_column_i_weighs_expert_i(tiny_cfg):
    """Column i of a layer's sigmoid gates scales exactly expert i's contribution: LoRA q, k, v, o, up
    (0-4), the FFN parallel adapter (5), the prompt (6). Gates are recomputed by hand from the router input."""
    model, _, rep = build_mole_model(tiny_cfg("method=moa_soft"))
    assert rep.routers_per_layer == [1, 1, 1, 1]
    layer = model.model.layers[1]
    attn, mlp = layer.self_attn, layer.mlp
    torch.manual_seed(11)
    with torch.no_grad():  # non-zero experts, distinct router rows
        for name, p in layer.named_parameters():
            if p.requires_grad and ("lora_B" in name or name.endswith(".up") or name.endswith("mole_prompt.gate")):
                p.normal_(std=0.3)
        w_g = torch.randn(7, 64)
        layer.mole_layer_router.router.gate.weight.copy_(w_g)
    seen = {}
    mods = {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj, "o": attn.o_proj, "up": mlp.up_proj}
    hooks = [m.register_forward_hook(lambda _m, a, out, _n=n: seen.__setitem__(_n, (a[0], out))) for n, m in mods.items()]
    hooks.append(layer.input_layernorm.register_forward_hook(lambda _m, a, out: seen.__setitem__("router_in", out)))
    hooks.append(mlp.register_forward_hook(lambda _m, a, out: seen.__setitem__("mlp", (a[0], out))))
    hooks.append(attn.register_forward_pre_hook(lambda _m, a, kw: seen.__setitem__("rope", kw["position_embeddings"]),
                                                with_kwargs=True))
    # o_proj's input before and after the prompt's pre-hook (hooks run in registration order)
    hooks.append(attn.o_proj.register_forward_pre_hook(lambda _m, a: seen.__setitem__("o_pre", a[0]), prepend=True))
    with torch.no_grad():
        model(input_ids=IDS)
        for h in hooks:
            h.remove()
        x = seen["router_in"].reshape(-1, 64)
        g = torch.sigmoid(x @ w_g.T)  # (N, 7): MoA eq. 2
        for i, name in enumerate(["q", "k", "v", "o", "up"]):
            inp, out = seen[name]
            flat = inp.reshape(-1, inp.shape[-1])
            lin = mods[name]
            delta = lin.mole_experts(flat, None)  # expert i alone, weight 1
            torch.testing.assert_close(out.reshape(flat.shape[0], -1), lin.base_layer(flat) + g[:, i : i + 1] * delta)
        ffn_in, ffn_out = seen["mlp"]
        flat = ffn_in.reshape(-1, 64)
        up_out = seen["up"][1].reshape(-1, 128)  # up_proj's output, its own LoRA expert included
        plain = mlp.down_proj(mlp.act_fn(mlp.gate_proj(flat)) * up_out)
        torch.testing.assert_close(ffn_out.reshape(-1, 64), plain + g[:, 5:6] * mlp.mole_parallel_adapter(flat, None))
        b, t = IDS.shape
        q_in, q_out = seen["q"]
        q = apply_rope(q_out.view(b, t, 4, 16), *seen["rope"])
        term = attn.mole_prompt.prompt_attention(q, torch.ones(b * t, 1))  # (B, T, 64), weight 1
        o_in = seen["o"][0]
        torch.testing.assert_close(o_in - seen["o_pre"], g[:, 6].view(b, t, 1) * term)


def test_moa_sparse_has_six_experts_per_layer_and_no_prompt(tiny_cfg):
    model, _, rep = build_mole_model(tiny_cfg("method=moa_sparse"))
    lr = model.model.layers[0].mole_layer_router
    assert lr.num_experts == 6 and lr.router.gate.weight.shape == (6, 64)
    assert rep.adapted[0][-1] == "mlp.mole_parallel_adapter"
    assert not any("mole_prompt" in n for n, _ in model.named_parameters())


def test_moa_parameter_count_tiny(tiny_cfg):
    model, _, rep = build_mole_model(tiny_cfg("method=moa_soft"))
    # per layer: LoRA r=8 on q (64->64), k, v (64->32), o (64->64), up (64->128); parallel adapter 2 x 16 x 64;
    # prompt 10 x 64 + 4 head gates; router 64 x 7
    lora = 8 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + (64 + 128))
    per_layer = lora + 2 * 16 * 64 + (10 * 64 + 4) + 64 * 7
    assert parameter_report(model, rep)["trainable"] == 4 * per_layer


# ---------------------------------------------------------------------------------------------- baselines


def test_prompt_tuning_keeps_the_input_length_and_generates_consistently(tiny_cfg):
    model, _, rep = build_mole_model(tiny_cfg("method=prompt_tuning"))
    assert parameter_report(model, rep)["trainable"] == 20 * 64
    ids = IDS[:1]
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        assert logits.shape == (1, 9, model.config.vocab_size)
        # the virtual tokens really are in front: the same as feeding their embeddings by hand
        pt = model.mole_prompt_tuning
        embeds = torch.cat([pt.embedding[None], model.get_input_embeddings()(ids)], dim=1)
        pt._prepended, pt._real_length = True, 9  # as the pre-hook records; the post-hook drops the virtual positions
        by_hand = model.model(inputs_embeds=embeds).last_hidden_state
        torch.testing.assert_close(logits, model.lm_head(by_hand)[:, 20:])
        # greedy generation with the cache equals argmax over full forwards without one
        out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
        seq = ids
        for _ in range(3):
            nxt = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


def test_full_finetuning_checkpoint_holds_the_whole_model_with_tied_embeddings(tiny_cfg, tmp_path):
    cfg = tiny_cfg("method=full_ft", "model.config.tie_word_embeddings=true")
    a, _, rep = build_mole_model(cfg)
    assert a.lm_head.weight is a.model.embed_tokens.weight
    report = parameter_report(a, rep)
    assert report["trainable"] == report["total"] == report["base"] and report["percent"] == 100.0
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_adapter(a, tmp_path / "adapter.safetensors")
    state = load_file(tmp_path / "adapter.safetensors")
    assert "model.embed_tokens.weight" in state and "lm_head.weight" not in state  # the tied weight once
    assert sum(t.numel() for t in state.values()) == report["total"]
    b, _, _ = build_mole_model(cfg)
    load_adapter(b, tmp_path / "adapter.safetensors")
    assert b.lm_head.weight is b.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(a(input_ids=IDS).logits, b(input_ids=IDS).logits)


@pytest.mark.parametrize("method", ["moa_soft", "prompt_tuning", "full_ft"])
def test_run_train_and_run_eval(tiny_cfg, tmp_path, method):
    cfg = tiny_cfg(f"method={method}", "eval=fixtures", "eval.tasks=[mole_mc]", "eval.limit=2")
    metrics = run_train(cfg, tmp_path)
    assert metrics["finished"] and metrics["steps"] == 2 and "mole_mc" in metrics["eval"]
    again = run_eval(tmp_path, {"tasks": ["mole_mc"], "limit": 2})
    assert again["results"]["mole_mc"]["acc,none"] == metrics["eval"]["mole_mc"]["acc,none"]


# ---------------------------------------------------------------------------------------------- the commands


@pytest.mark.slow
@pytest.mark.parametrize("method", PRESETS)
def test_mole_train_and_mole_eval_commands(tmp_path, method):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    run_dir = tmp_path / "run"

    def run(*args):
        return subprocess.run([sys.executable, "-m", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)

    proc = run("mole.cli.train", f"method={method}", "model=tiny_llama", "trainer.max_steps=2", "eval.limit=2",
               f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run("mole.cli.eval", f"checkpoint={run_dir}", "eval.tasks=[mole_mc]", "eval.limit=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert set(json.loads((run_dir / "eval" / "results.json").read_text())["results"]) == {"mole_mc"}
