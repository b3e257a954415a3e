"""``scripts/peers_bench.py``'s mole side, without the peers' venv: its memory account is the benchmark's,
its LoRAMoE variant routes exactly the FFN, and a --no-peers run reports every mole variant."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from mole.bench.measure import peak_memory_mb
from mole.bench.variants import build_variant, compose, make_batch, make_setup
from mole.model.base import build_model

SCRIPTS = Path(__file__).resolve().parents[3] / "scripts"
TINY = ["model.hidden_size=64", "model.config.intermediate_size=128", "model.config.num_attention_heads=4",
        "model.config.num_key_value_heads=2", "model.num_layers=2"]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # peers_bench imports peers_worker by this name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    _load("peers_worker")
    return _load("peers_bench")


def _tiny():
    setup = make_setup(argparse.Namespace(device="cpu", quick=True, rounds=1, warmup=1, clock="wall", compile=False,
                                          no_compile=True, compile_scope="layer", compile_backend="inductor",
                                          model_override=TINY, batch=2, seq=32))
    torch.manual_seed(0)
    base, tokenizer = build_model(compose(setup, ["method=lora"]).model, seed=0)
    base.requires_grad_(False)
    return setup, base, tokenizer, make_batch(setup, base.config.vocab_size)


@pytest.mark.parametrize("name", ["peft_lora_r8", "topk_e8", "mixlora"])
def test_worker_memory_account_equals_the_benchmarks(bench, name):
    # the one account both venvs run gives mole.bench's CPU figure for the same step
    import peers_worker

    setup, base, tokenizer, batch = _tiny()
    v = build_variant(name, setup, base, tokenizer)
    v.step(batch)
    trainable = [p for p in v.model.parameters() if p.requires_grad]
    ours = peers_worker.step_memory([*base.parameters(), *base.buffers()], trainable, lambda: v.forward_loss(batch),
                                    lambda: v.optimizer.zero_grad(set_to_none=True))
    assert ours / 2**20 == pytest.approx(peak_memory_mb(v, batch, setup), rel=1e-9)


def test_loramoe_variant_routes_the_ffn_and_gives_attention_one_lora(bench):
    setup, base, tokenizer, _ = _tiny()
    v = build_variant("loramoe_ffn_e8", setup, base, tokenizer, bench.MOLE_EXTRA["loramoe_ffn_e8"])
    r, e, h, ffn, kv = 8, 8, 64, 128, 32  # kv: 2 KV heads of 64 / 4
    attention = r * ((h + h) + (h + kv) + (h + kv) + (h + h))  # q, k, v, o: one LoRA each, no router
    experts = e * r * ((h + ffn) + (h + ffn) + (ffn + h))  # gate, up, down: 8 experts each
    routers = e * (h + h + ffn)  # one router per FFN linear, on its input
    assert v.trainable == 2 * (attention + experts + routers)  # 2 layers


def test_mole_side_runs_without_the_peers(bench, tmp_path):
    out = tmp_path / "peers.json"
    result = bench.main(["--no-peers", "--rounds", "2", "--warmup", "1", "--batch", "2", "--seq", "32",
                         "--out", str(out), *[a for o in TINY for a in ("--model-override", o)]])
    assert json.loads(out.read_text()) == result
    assert set(result["ratios_vs_peft_lora_r8"]) == set(bench.MOLE_NAMES) - {"peft_lora_r8"}
    assert all(0 < r < 20 for r in result["ratios_vs_peft_lora_r8"].values())
    assert all(m > 0 for m in result["peak_memory_mb"].values())
    assert "| MixLoRA" in bench.markdown(result)


def test_refuses_a_missing_peers_python(bench, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--peers-python", str(tmp_path / "nope"), "--out", str(tmp_path / "x.json")])
    assert e.value.code == 2
    assert "make peers" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
