"""Precision and memory: fp32 routers and losses under autocast, a bf16 base with fp32 adapters,
mixed precision through Accelerate, gradient checkpointing."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY
from safetensors.torch import load_file

from mole.build import build_aux_losses, build_mole_model
from mole.config import compose_config
from mole.losses.lm import lm_loss
from mole.model.base import enable_gradient_checkpointing
from mole.model.inject import is_trainable_name
from mole.model.layer import MoLELinear
from mole.model.routing import collect_routing
from mole.recipes.train import run_train
from mole.training import TrainArgs
from mole.training.loop import loss_step
from mole.utils.errors import MoleConfigError


def _batch(vocab: int = 200, shape=(2, 12)) -> dict:
    ids = torch.randint(3, vocab, shape)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # padding in the second example
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _nonzero_b(model) -> None:
    """Fresh LoRA B is zero (no update, no gradient to A or the routers): give it values for these tests."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.02)


# ---- routers and losses stay fp32 under autocast ----


@pytest.mark.parametrize("method", ["loramoe", "mola", "mola_mor", "mola_crw"])
def test_gates_probs_and_losses_are_fp32_under_bf16_autocast(method):
    cfg = compose_config([*TINY, f"method={method}", "loss=balance"])
    model, _, _ = build_mole_model(cfg)
    _nonzero_b(model)
    balance = build_aux_losses(cfg)["balance"]
    batch = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16), collect_routing(model) as routing:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = lm_loss(logits, batch["labels"])
        aux = balance(routing, batch["attention_mask"].reshape(-1).bool())
    assert logits.dtype == torch.bfloat16  # autocast was in effect for the model's matmuls
    assert routing and len(routing) == len([m for m in model.modules() if isinstance(m, MoLELinear)])
    for out in routing:
        assert out.gates.dtype == torch.float32 and out.probs.dtype == torch.float32
        assert all(b.probs.dtype == torch.float32 for b in out.balance)
        assert torch.allclose(out.gates.sum(-1), torch.ones(out.gates.shape[0]), atol=1e-6)  # fp32-exact rows
    assert loss.dtype == torch.float32 and aux.dtype == torch.float32


# ---- a bf16 base with fp32 adapters ----


def test_bf16_base_keeps_fp32_adapters_and_trains(tmp_path):
    cfg = compose_config([*TINY, "model.dtype=bfloat16", "trainer.max_steps=2", "trainer.lr=1e-2"])
    model, _, _ = build_mole_model(cfg)
    dtypes = {(is_trainable_name(n), p.dtype) for n, p in model.named_parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}
    metrics = run_train(cfg, tmp_path)
    losses = [r["loss"] for r in metrics["train_loss"]]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    state = load_file(tmp_path / "adapter.safetensors")
    assert {t.dtype for t in state.values()} == {torch.float32}
    assert any(k.endswith("lora_B") and t.abs().sum() > 0 for k, t in state.items())  # the step reached the adapters


def test_adapter_dtype_null_follows_the_base():
    cfg = compose_config([*TINY, "model.dtype=bfloat16", "model.adapter_dtype=null"])
    model, _, _ = build_mole_model(cfg)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(MoleConfigError, match="model.adapter_dtype must be null or one of"):
        build_mole_model(compose_config([*TINY, "model.adapter_dtype=fp32"]))


# ---- mixed precision through Accelerate ----


def test_bf16_mixed_precision_on_the_cpu_trains_under_autocast(tmp_path):
    common = [*TINY, "trainer.max_steps=2", "trainer.eval_every=0"]
    fp32 = run_train(compose_config(common), tmp_path / "fp32")
    # with gradient checkpointing too: the flag's path through run_train (forward values are unchanged by it)
    bf16 = run_train(compose_config([*common, "trainer.mixed_precision=bf16", "trainer.gradient_checkpointing=true"]),
                     tmp_path / "bf16")
    assert bf16["mixed_precision"] == "bf16" and fp32["mixed_precision"] == "no"
    a, b = fp32["train_loss"][0]["lm_loss"], bf16["train_loss"][0]["lm_loss"]
    # same weights at step 1: only bf16 matmuls separate them (a little, not nothing)
    assert a != b and b == pytest.approx(a, rel=1e-2)
    assert all(math.isfinite(r["loss"]) for r in bf16["train_loss"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs fp16")
def test_fp16_on_the_cpu_is_refused(tmp_path):
    with pytest.raises(MoleConfigError, match="trainer.mixed_precision=fp16 needs a CUDA GPU; on the CPU use"):
        run_train(compose_config([*TINY, "trainer.mixed_precision=fp16"]), tmp_path)
    assert not (tmp_path / "config.yaml").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_on_a_gpu_trains(tmp_path):
    metrics = run_train(compose_config([*TINY, "trainer.mixed_precision=fp16", "trainer.max_steps=3"]), tmp_path)
    assert all(math.isfinite(r["loss"]) for r in metrics["train_loss"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.mixed_precision=fp8", "trainer.mixed_precision must be one of"),
        ("trainer.gradient_checkpointing=yes", "trainer.gradient_checkpointing must be true or false"),
        ("trainer.log_with=[mlflow]", "trainer.log_with must be a list drawn from"),
    ],
)
def test_bad_precision_and_logging_values_name_the_key(override, message):
    with pytest.raises(MoleConfigError, match=message):
        TrainArgs.from_config(compose_config([*TINY, override]).trainer)


def test_mixed_precision_no_from_the_command_line_is_the_string_no():
    assert TrainArgs.from_config(compose_config([*TINY, "trainer.mixed_precision=no"]).trainer).mixed_precision == "no"


# ---- gradient checkpointing ----


def test_gradient_checkpointing_gives_identical_gradients():
    cfg = compose_config([*TINY, "method=mola_mor"])  # top-k MoR routing + the balance loss on its outputs
    aux = build_aux_losses(cfg)
    batch = _batch()
    grads, calls = [], []
    for checkpointing in (False, True):
        model, _, _ = build_mole_model(cfg)
        _nonzero_b(model)
        model.train()
        if checkpointing:
            enable_gradient_checkpointing(model)
        count = [0]
        first = next(m for m in model.modules() if isinstance(m, MoLELinear))
        first.register_forward_hook(lambda *_, c=count: c.__setitem__(0, c[0] + 1))
        loss, _ = loss_step(model, batch, aux)
        loss.backward()
        calls.append(count[0])
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert calls == [1, 2]  # checkpointing recomputed the layer's forward in backward
    plain, ckpt = grads
    assert plain.keys() == ckpt.keys() and all(g is not None for g in ckpt.values())
    assert any("router" in k and g.abs().sum() > 0 for k, g in ckpt.items())  # the aux loss's gradient arrived
    for name in plain:
        assert torch.allclose(plain[name], ckpt[name], rtol=1e-5, atol=1e-7), name

