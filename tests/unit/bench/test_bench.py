"""``python -m mole.bench``: its compile settings and per-variant code objects, an added variant timed beside
the baseline, and the command line's refusals."""

from __future__ import annotations

import shlex

import pytest
import torch

from mole.bench.cli import main
from mole.bench.compiling import compile_model, configure_dynamo
from mole.bench.loops import lora_gather_loop, swap_in_loops
from mole.build import build_mole_model
from mole.model.inject import decoder_layers
from tests.conftest import compose_tiny


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
        configure_dynamo()
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


@pytest.mark.slow  # torch.compile of two models' layers
def test_bench_compiles_each_variant_with_its_own_code_objects():
    """Dynamo caches graphs per code object. The bench gives every variant's layers their own, so that a
    graph-breaking variant (the gather loop) leaves no partial graph that another variant's layer matches."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    torch._dynamo.reset()
    try:
        models = {}
        for name, method in (("lora", "lora"), ("loop", "mola")):
            model, _, _ = build_mole_model(compose_tiny([f"method={method}", "adapter.dropout=0"]))
            if name == "loop":
                assert swap_in_loops(model, lora_gather_loop)
            compile_model(model, "layer", tag=name, backend="eager")
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
    small = ["model.hidden_size=64", "model.num_layers=1", "model.config.intermediate_size=128",
             "model.config.num_attention_heads=4", "model.config.num_key_value_heads=2"]
    args = ["--device", "cpu", "--threads", "1", "--variants", "soft_e8", "--rounds", "2", "--warmup", "0",
            "--batch", "1", "--seq", "8", "--no-eval", "--keep-freed-memory", "off", "--out", str(tmp_path),
            "--add-variant", "soft_no_dropout=method=lora experts=uniform_8 router=soft loss=none adapter.dropout=0"]
    for o in small:
        args += ["--model-override", o]
    threads = torch.get_num_threads()
    try:
        result = main(args)
    finally:
        torch.set_num_threads(threads)
    assert set(result["ratios_vs_peft_lora_r8"]) == {"soft_e8", "soft_no_dropout"}
    assert result["trainable"]["soft_no_dropout"] == result["trainable"]["soft_e8"]
    assert "| soft_no_dropout |" in (tmp_path / "latest.md").read_text()
    # the recorded command runs again as it is: the added variant's overrides stay one argument
    assert shlex.split(result["command"])[:3] == ["python", "-m", "mole.bench"]
    assert shlex.split(result["command"])[3:] == args


@pytest.mark.parametrize("spec, message", [
    ("no_overrides", "expected NAME=OVERRIDES"),
    ("bad name=method=lora", "expected NAME=OVERRIDES"),
    ("soft_e8=method=lora", "already taken"),
])
def test_bench_rejects_a_malformed_added_variant(tmp_path, capsys, spec, message):
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--out", str(tmp_path / "out"), "--add-variant", spec])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything is written


@pytest.mark.parametrize("flag, value, message", [
    ("--rounds", "0", "--rounds must be at least 1"),
    ("--warmup", "-1", "--warmup must be 0 or more"),
    ("--variants", "lora_r8,nope", "unknown variants ['nope']"),
])
def test_bench_rejects_out_of_range_settings_before_writing(tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--out", str(tmp_path / "out"), flag, value])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
