"""A quantized frozen base (``model.quantization``: bitsandbytes NF4 / LLM.int8) on the CPU.

bitsandbytes (the ``quant`` extra) runs both 4-bit and 8-bit layers on the CPU; without it the tests
that need it are skipped and a request is one error line. Training runs are in the slow tier.
"""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import load_file

from mole.config import compose_config
from mole.model.state import ADAPTER_FILE, load_adapter
from mole.utils.errors import MoleConfigError

QLORA = ["model=tiny_llama", "eval=none", "method=mola_mor", "model.quantization=nf4", "data.max_records=16",
         "trainer.batch_size=4", "trainer.lr=3e-3", "trainer.eval_every=0", "adapter.dropout=0.0"]


def _bnb():
    return pytest.importorskip("bitsandbytes", reason="model.quantization needs bitsandbytes (pip install 'mole[quant]')")


def _batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 250, (2, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss(model, cfg, batch) -> torch.Tensor:
    from mole.build import build_aux_losses
    from mole.training.loop import loss_step

    return loss_step(model, batch, build_aux_losses(cfg))[0]


@pytest.mark.parametrize("kind,layer,bound", [("nf4", "Linear4bit", 0.15), ("int8", "Linear8bitLt", 0.03)])
def test_the_base_is_quantized_and_frozen_the_adapters_are_not(kind, layer, bound):
    _bnb()
    from mole.build import build_mole_model

    cfg = compose_config([*QLORA, f"model.quantization={kind}"])
    model, _, _ = build_mole_model(cfg)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer).__name__ == layer
    assert not q_proj.base_layer.weight.is_floating_point()  # integer codes
    assert model.lm_head.weight.dtype == torch.float32  # the LM head and embeddings stay in model.dtype
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("mole_" in n and p.dtype == torch.float32 for n, p in trainable)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "mole_" not in n)
    # the quantized Linear computes nearly what the full-precision one does (same seed, same weights):
    # NF4 on these normal weights ~9% relative error, LLM.int8 ~1%
    plain, _, _ = build_mole_model(compose_config([*QLORA, "model.quantization=none"]))
    x = torch.randn(16, 64)
    with torch.no_grad():
        a, b = q_proj.base_layer(x), plain.model.layers[0].self_attn.q_proj.base_layer(x)
    rel = ((a - b).norm() / b.norm()).item()
    assert 0 < rel < bound, rel


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_loss_and_gradients_on_a_quantized_base():
    _bnb()
    from mole.build import build_mole_model
    from mole.model.base import enable_gradient_checkpointing

    cfg = compose_config(QLORA)
    runs = []
    for checkpointing in (False, True):
        model, _, _ = build_mole_model(cfg)
        model.train()
        if checkpointing:
            enable_gradient_checkpointing(model)
        loss = _loss(model, cfg, _batch())
        loss.backward()
        runs.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = runs
    torch.testing.assert_close(l0, l1)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for name in g0:
        torch.testing.assert_close(g0[name], g1[name], rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    _bnb()
    from mole.recipes.train import run_train

    run_dir = tmp_path_factory.mktemp("qlora")
    return run_dir, run_train(compose_config([*QLORA, "trainer.max_steps=24"]), run_dir)


@pytest.mark.slow
def test_a_qlora_run_trains_and_its_loss_falls(qlora_run):
    run_dir, metrics = qlora_run
    losses = [float(x["lm_loss"]) for x in metrics["train_loss"]]
    assert len(losses) == 24 and all(map(torch.isfinite, torch.tensor(losses)))
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first - 0.5, (first, last)  # nats; measured 6.81 -> 6.04
    assert metrics["val_loss"][-1]["loss"] < metrics["val_loss"][0]["loss"]


@pytest.mark.slow
def test_a_qlora_adapter_round_trips_through_the_run_directory(qlora_run):
    """The adapter file holds only the adapters (float32, no quantized base weight), and the model rebuilt
    from the run directory (what ``mole-eval`` does) gives the validation loss the run recorded."""
    from mole.build import build_loaders, build_mole_model
    from mole.run_dir import load_run_config
    from mole.training.args import TrainArgs
    from mole.training.loop import validation_loss

    run_dir, metrics = qlora_run
    saved = load_file(run_dir / ADAPTER_FILE)
    assert saved and all("mole_" in k and v.dtype == torch.float32 for k, v in saved.items())
    cfg = load_run_config(run_dir)
    assert cfg.model.quantization == "nf4"
    model, tokenizer, _ = build_mole_model(cfg)
    untrained = model.model.layers[0].self_attn.q_proj.mole_experts.lora_B.detach().clone()
    load_adapter(model, run_dir / ADAPTER_FILE)
    assert not torch.equal(untrained, model.model.layers[0].self_attn.q_proj.mole_experts.lora_B)
    _, val_loader, _ = build_loaders(cfg, tokenizer, TrainArgs.from_config(cfg.trainer))
    assert validation_loss(model, val_loader) == pytest.approx(metrics["val_loss"][-1]["loss"], rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["none", "nf4"])
def test_a_resumed_qlora_run_equals_an_uninterrupted_one(kind, tmp_path, monkeypatch):
    _bnb()
    import mole.training.loop as loop
    from mole.recipes.train import run_train

    args = [*QLORA, f"model.quantization={kind}", "trainer.max_steps=6", "trainer.save_every=2", "adapter.dropout=0.1"]
    ref = run_train(compose_config(args), tmp_path / "ref")
    real, calls = loop.loss_step, {"n": 0}

    def crashing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated crash")
        return real(*a, **k)

    monkeypatch.setattr(loop, "loss_step", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_train(compose_config(args), tmp_path / "run")
    monkeypatch.undo()
    resumed = run_train(compose_config([*args, "trainer.resume=true"]), tmp_path / "run")
    assert resumed["train_loss"] == ref["train_loss"] and len(ref["train_loss"]) == 6
    a, b = load_file(tmp_path / "ref" / ADAPTER_FILE), load_file(tmp_path / "run" / ADAPTER_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- errors ----


def _train_error(tmp_path, capsys, *overrides: str) -> str:
    from mole.cli.train import _single_run

    with pytest.raises(SystemExit) as exc:
        _single_run(compose_config(["model=tiny_llama", "eval=none", "trainer.max_steps=1", *overrides]), str(tmp_path))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert not (tmp_path / ADAPTER_FILE).exists()
    return err[0]


def test_without_bitsandbytes_a_quantized_base_is_one_error_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    line = _train_error(tmp_path, capsys, "model.quantization=nf4")
    assert line.startswith("mole-train: error: model.quantization=nf4 needs bitsandbytes")
    assert "mole[quant]" in line


def test_an_unknown_quantization_is_one_error_line(tmp_path, capsys):
    line = _train_error(tmp_path, capsys, "model.quantization=fp4")
    assert line.startswith("mole-train: error: model.quantization must be one of ['none', 'nf4', 'int8']")


@pytest.mark.parametrize("method,adapter", [("dora", "adapter=dora"), ("mixlora", "adapter=ffn_expert"),
                                            ("full_ft", "adapter=full_finetune")])
def test_adapters_that_read_the_base_weights_refuse_a_quantized_base(method, adapter, capsys):
    from mole.cli.params import main

    with pytest.raises(SystemExit) as exc:
        main(["model=tiny_llama", f"method={method}", "model.quantization=nf4"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mole-params: error: model.quantization=nf4 cannot be used with {adapter}")


def test_adapter_dtype_null_means_the_model_dtype_with_a_quantized_base():
    from mole.model.base import adapter_dtype

    cfg = compose_config(["model=tiny_llama", "model.quantization=nf4", "model.adapter_dtype=null", "model.dtype=bfloat16"])
    assert adapter_dtype(cfg.model) == torch.bfloat16
    cfg = compose_config(["model=tiny_llama", "model.adapter_dtype=null"])
    assert adapter_dtype(cfg.model) is None
    with pytest.raises(MoleConfigError, match="model.quantization"):
        adapter_dtype(compose_config(["model=tiny_llama", "model.quantization=4bit", "model.adapter_dtype=null"]).model)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_a_quantized_base_counts_as_many_parameters_as_the_plain_one(kind):
    """The run's parameter report (and so its ``percent``) counts the quantized weights' real sizes."""
    _bnb()
    from mole.build import build_mole_model, parameter_report
    from mole.cli.params import run

    meta = run(["model=tiny_llama", "method=lora"])
    model, _, report = build_mole_model(compose_config(["model=tiny_llama", "method=lora", f"model.quantization={kind}"]))
    real = parameter_report(model, report)
    assert (real["trainable"], real["base"], real["percent"]) == (meta["trainable"], meta["base"], meta["percent"])
