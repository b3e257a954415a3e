"""``mole-params estimate_memory=true``: the estimated peak memory of a training step against real steps on
the CPU, within 15% for every method preset: ``peak`` against the memory account of a step
(:func:`mole.memory.measure_step`: parameters and buffers, gradients and AdamW states after the step,
tensors saved for backward), and ``peak_allocated`` against the allocator's peak of a step
(:func:`mole.memory.allocator_peak`: every allocation and free, from torch's profiler)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mole.config import compose_config
from mole.memory import estimate_memory, measure_config

PRESETS = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "conf" / "method").glob("*.yaml"))
SHAPE = ["model=tiny_llama", "eval=none"]
B, T = 2, 32
TOLERANCE = 0.15


def _compare(*overrides: str) -> tuple[dict, dict]:
    cfg = compose_config([*SHAPE, *overrides])
    return estimate_memory(cfg, B, T), measure_config(cfg, B, T, profile=True)


def _check(est: dict, meas: dict) -> None:
    assert abs(est["peak"] / meas["peak"] - 1) <= TOLERANCE, (est["per_process"], meas)
    assert abs(est["per_process"]["activations"] / meas["activations"] - 1) <= TOLERANCE, (est["per_process"], meas)
    assert abs(est["peak_allocated"] / meas["allocator_peak"] - 1) <= TOLERANCE, (est["peak_allocated"], meas)


def test_the_default_preset_estimate_matches_a_measured_step():
    est, meas = _compare("method=mola_mor")
    _check(est, meas)
    # the parts that do not depend on the data are the same bytes
    assert est["per_process"]["weights"] == meas["weights"]
    assert est["per_process"]["gradients"] == meas["gradients"]
    assert est["per_process"]["optimizer"] == meas["optimizer"]
    # MoLA 2/4/6/8 experts per layer: the later layers save more; every layer and the losses are placed
    layers = [est["activations_by_layer"][str(i)] for i in range(4)]
    assert layers == sorted(layers) and layers[0] < layers[-1]
    assert {"LoRAExperts", "MoRRouter", "base", "loss"} <= set(est["activations_by_kind"])
    assert sum(est["activations_by_kind"].values()) == est["per_process"]["activations"]


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_estimate_is_within_15_percent_of_a_measured_step(preset):
    _check(*_compare(f"method={preset}"))


@pytest.mark.slow
def test_the_estimate_under_bf16_autocast_matches_a_measured_step():
    _check(*_compare("method=mola_mor", "trainer.mixed_precision=bf16"))


@pytest.mark.slow
def test_processes_share_what_ddp_and_zero_partition():
    base = estimate_memory(compose_config([*SHAPE, "method=lora"]), B, T)["per_process"]
    ddp = estimate_memory(compose_config([*SHAPE, "method=lora", "distributed=ddp", "distributed.num_processes=2"]), B, T)
    assert ddp["setting"] == "ddp" and ddp["per_process"]["ddp_buckets"] == base["gradients"]
    z2 = estimate_memory(compose_config([*SHAPE, "method=lora", "distributed=deepspeed_zero2",
                                         "distributed.num_processes=4"]), B, T)["per_process"]
    assert z2["weights"] == base["weights"] and z2["gradients"] == base["gradients"] // 4
    assert z2["optimizer"] == base["optimizer"] // 4 and z2["activations"] == base["activations"]
    z3 = estimate_memory(compose_config([*SHAPE, "method=lora", "distributed=deepspeed_zero3",
                                         "distributed.num_processes=4"]), B, T)["per_process"]
    assert z3["weights"] == base["weights"] // 4


@pytest.mark.slow
def test_gradient_checkpointing_keeps_each_layer_input_and_one_layer():
    plain = estimate_memory(compose_config([*SHAPE, "method=lora"]), B, T)
    ckpt = estimate_memory(compose_config([*SHAPE, "method=lora", "trainer.gradient_checkpointing=true"]), B, T)
    layers = [plain["activations_by_layer"][str(i)] for i in range(4)]
    outside = plain["per_process"]["activations"] - sum(layers)
    assert ckpt["per_process"]["activations"] == outside + 4 * B * T * 64 * 4 + max(layers)
    assert ckpt["peak"] < plain["peak"]


@pytest.mark.slow
def test_a_quantized_base_counts_its_linears_at_their_quantized_size():
    from mole.memory import QUANT_BYTES

    plain = estimate_memory(compose_config([*SHAPE, "method=lora"]), B, T)["per_process"]["weights"]
    nf4 = estimate_memory(compose_config([*SHAPE, "method=lora", "model.quantization=nf4"]), B, T)
    # tiny_llama: 4 layers of q (64x64), k, v (32x64), o (64x64), gate, up (128x64), down (64x128)
    linears = 4 * (64 * 64 * 2 + 32 * 64 * 2 + 128 * 64 * 3)
    assert plain - nf4["per_process"]["weights"] == linears * 4 - int(linears * QUANT_BYTES["nf4"])


def test_the_command_prints_the_estimate_and_rejects_a_bad_flag(capsys):
    from mole.cli.params import main, run

    out = run([*SHAPE, "method=lora", "estimate_memory=true", "trainer.batch_size=3", "data.cutoff_len=16"])
    assert out["memory"]["batch_size"] == 3 and out["memory"]["seq_len"] == 16 and out["memory"]["peak"] > 0
    assert "memory" not in run([*SHAPE, "method=lora"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([*SHAPE, "estimate_memory=maybe"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mole-params: error: estimate_memory must be true or false, got 'maybe'"]
