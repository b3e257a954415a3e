"""``trainer.compile``: each decoder layer compiled (regional compilation), one graph per layer for every
preset, a compiled step equal to an eager one, bounded recompilation, and compiled training that resumes.

Graph breaks are Dynamo's: the ``eager`` backend (Dynamo's trace, run without a compiler) proves one graph
per layer at a fraction of a compiler's cost. Equality runs ``aot_eager`` (Dynamo plus AOTAutograd's joint
forward-backward graph, the part of the ``inductor`` path that decomposes ops). ``inductor`` itself passed
the same equality test for mole's LoRA on the CPU, but compiling C++ took 5 minutes on a busy 2-core
machine, too long for the slow tier; ``make gpu-check`` runs it on a GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch._dynamo as dynamo
from safetensors.torch import load_file

from mole.build import build_aux_losses, build_mole_model
from mole.config import CONF_DIR, compose_config
from mole.config_schema import validate_config
from mole.data.collate import Collator
from mole.memory import padded_batch
from mole.model.compile import CompileClock, compile_decoder_layers, compile_wanted
from mole.model.inject import decoder_layers
from mole.recipes.train import run_train
from mole.training.loop import loss_step
from mole.utils.errors import MoleConfigError

PRESETS = sorted(p.stem for p in (Path(CONF_DIR) / "method").glob("*.yaml"))
NO_DROPOUT = ["adapter.dropout=0"]  # eager code draws 16-bit masks, compiled code F.dropout's


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    dynamo.utils.counters.clear()
    yield
    dynamo.reset()


def _model(method: str, *extra: str):
    cfg = compose_config(["model=tiny_llama", f"method={method}", "eval=none", *extra])
    model, _, _ = build_mole_model(cfg)
    model.train()
    return model, build_aux_losses(cfg)


def _step(model, aux, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss, _ = loss_step(model, batch, aux)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ---- the setting ----


def test_auto_compiles_on_cuda_only():
    assert compile_wanted("auto", "cuda") and not compile_wanted("auto", "cpu")
    assert compile_wanted(True, "cpu") and not compile_wanted(False, "cuda")
    with pytest.raises(MoleConfigError, match="trainer.compile"):
        compile_wanted("yes", "cpu")


@pytest.mark.parametrize("override, message", [
    ("trainer.compile=maybe", "trainer.compile must be auto, true or false, got 'maybe'"),
    ("trainer.compile_backend=tvm", "trainer.compile_backend must be one of ['inductor', 'aot_eager', 'eager']"),
])
def test_bad_compile_values_name_the_key(override, message):
    with pytest.raises(MoleConfigError) as err:
        validate_config(compose_config(["model=tiny_llama", "eval=none", override]))
    assert message in str(err.value)


def test_compile_clock_times_each_compilation():
    f = torch.compile(lambda x: torch.sin(x) * 2, backend="eager", fullgraph=True)
    with CompileClock() as clock:
        f(torch.ones(3))
        f(torch.ones(3))  # cached: no second compilation
    assert clock.compilations == 1 and clock.seconds > 0
    f(torch.ones(3, 2))  # after the clock left: not counted
    assert clock.compilations == 1


# ---- every preset: one graph per decoder layer ----


@pytest.mark.slow  # 2-22 s a preset on the loaded 2-core machine, 170 s for all (Dynamo traces one layer)
@pytest.mark.parametrize("method", PRESETS)
def test_a_decoder_layer_of_every_preset_compiles_to_one_graph(method):
    """``fullgraph=True`` raises at any graph break; the second layer (its input needs gradient) is compiled
    alone and must trace to exactly one graph, forward and backward run."""
    model, aux = _model(method)
    layer = decoder_layers(model)[1]
    layer.compile(backend="eager", fullgraph=True)
    loss, grads = _step(model, aux, padded_batch(2, 24, 256, 0))
    assert torch.isfinite(loss) and grads
    assert dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not dynamo.utils.counters["graph_break"]


# ---- a compiled step equals an eager one ----


@pytest.mark.slow
@pytest.mark.parametrize("method, backend, checkpointing, extra", [
    ("mixlora", "aot_eager", False, []),
    ("hmora", "aot_eager", True, ["router.dropout=0", "router.task_encoder.dropout=0"]),
])
def test_a_compiled_step_equals_an_eager_one(method, backend, checkpointing, extra):
    """Loss and every gradient within 1e-5 (absolute) + 1e-4 (relative): the compiled graph may reorder
    float sums, nothing more. Dropout 0: eager and compiled code draw their masks differently."""
    from mole.model.base import enable_gradient_checkpointing

    model, aux = _model(method, "model.num_layers=2", *NO_DROPOUT, *extra)  # two layers: two graphs to compile
    if checkpointing:
        enable_gradient_checkpointing(model)
    batch = padded_batch(2, 24, 256, 0)
    eager_loss, eager_grads = _step(model, aux, batch)
    assert compile_decoder_layers(model, backend=backend) == len(decoder_layers(model))
    loss, grads = _step(model, aux, batch)
    assert dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile
    assert not dynamo.utils.counters["graph_break"]
    torch.testing.assert_close(loss, eager_loss, atol=1e-5, rtol=1e-4)
    assert grads.keys() == eager_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, eager_grads[name], atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


# ---- recompilation under variable sequence lengths ----


@pytest.mark.slow
def test_recompilation_is_bounded_and_padding_to_a_multiple_avoids_it():
    """Automatic dynamic shapes: each distinct layer compiles once statically and once with a symbolic
    length, however many lengths follow. Padded to a multiple of 32, lengths 17..31 are one shape."""
    model, aux = _model("lora", "experts=uniform_8", "router=soft", "loss=none")
    compile_decoder_layers(model, backend="eager")
    padded = Collator(0, pad_to_multiple_of=32)
    shapes = set()
    for longest in (32, 17, 23, 31):
        batch = padded([_record(longest), _record(9)])
        shapes.add(tuple(batch["input_ids"].shape))
        _step(model, aux, batch)
    first = dynamo.utils.counters["stats"]["unique_graphs"]
    assert shapes == {(2, 32)} and first == 2  # layer 0 (input needs no gradient) and the three alike
    for longest in (12, 20, 40, 56, 100):
        _step(model, aux, Collator(0)([_record(longest), _record(9)]))
    assert dynamo.utils.counters["stats"]["unique_graphs"] == 2 * first


def _record(n: int) -> dict[str, list[int]]:
    return {"input_ids": [3 + i % 200 for i in range(n)], "labels": [-100] * (n // 3) + [3 + i % 200 for i in range(n // 3, n)]}


# ---- mole-train with trainer.compile=true: gradient checkpointing, resume ----

RUN = ["model=tiny_llama", "method=loramoe", "eval=none", "trainer.batch_size=2", "adapter.dropout=0.1", "trainer.max_steps=4",
       "trainer.eval_every=2", "data.max_records=12", "trainer.save_every=2", "trainer.compile=true",
       "trainer.compile_backend=eager", "trainer.gradient_checkpointing=true", "data.pad_to_multiple_of=16"]


@pytest.mark.slow
def test_compiled_training_with_checkpointing_resumes_to_the_same_adapter(tmp_path, monkeypatch):
    import mole.training.loop as loop

    ref = run_train(compose_config(RUN), tmp_path / "ref")
    assert ref["finished"] and ref["compile"]["backend"] == "eager"
    assert ref["compile"]["compilations"] >= 1 and ref["compile"]["compile_time_s"] > 0
    assert json.loads((tmp_path / "ref" / "metrics.json").read_text())["compile"] == ref["compile"]

    real, calls = loop.loss_step, {"n": 0}

    def crash_in_step_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "loss_step", crash_in_step_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_train(compose_config(RUN), tmp_path / "run")
    monkeypatch.undo()
    resumed = run_train(compose_config([*RUN, "trainer.resume=true"]), tmp_path / "run")
    assert resumed["train_loss"] == ref["train_loss"] and len(ref["train_loss"]) == 4
    a, b = load_file(tmp_path / "ref" / "adapter.safetensors"), load_file(tmp_path / "run" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_auto_leaves_a_quantized_base_eager_and_true_compiles_it(monkeypatch):
    import mole.model.compile as comp

    calls = []
    monkeypatch.setattr(comp, "compile_decoder_layers", lambda model, backend: calls.append(backend) or 4)
    assert comp.compile_for_run(None, {"compile": "auto"}, "cuda", quantized=True) is None and not calls
    clock = comp.compile_for_run(None, {"compile": True, "compile_backend": "eager"}, "cpu", quantized=True)
    clock.__exit__(None, None, None)
    assert calls == ["eager"]
    clock = comp.compile_for_run(None, None, "cuda")  # a run config without the keys: auto
    clock.__exit__(None, None, None)
    assert calls == ["eager", "inductor"]
