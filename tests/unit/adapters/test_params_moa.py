"""Trainable-parameter counts of MoA Table 1 (Llama-3.1-8B, on the meta device: no weights), hand-derived.

Llama-3.1-8B: d = 4096, FFN width I = 14336, k/v width 1024 (8 kv heads of 128), 32 heads, 32 layers.
"""

from __future__ import annotations

import contextlib
import io

from mole.cli.params import run

Q5 = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]


def _count(*overrides: str) -> int:
    with contextlib.redirect_stdout(io.StringIO()):
        return run(["model=llama3_1_8b", *overrides])["trainable"]


def _lora(r: int, ffn_in: int = 4096, ffn_out: int = 14336) -> int:
    # r (d_in + d_out) per Linear: q 4096->4096, k/v 4096->1024, o 4096->4096, and the FFN Linear
    return r * ((4096 + 4096) + 2 * (4096 + 1024) + (4096 + 4096) + (ffn_in + ffn_out))


def test_lora_r16_on_qkvo_up_is_moa_table1_23_06m():
    got = _count("method=lora", "adapter.rank=16", f"experts.targets=[{','.join(Q5)}]")
    assert got == 32 * _lora(16) == 23_068_672  # MoA Table 1: 23.06M


def test_soft_and_sparse_moa_counts():
    # per layer: LoRA r=8 on q/k/v/o/up; parallel adapter 4096 -> 16 -> 4096 (no biases);
    # prompt 10 x 4096 + 32 head gates; one router 4096 x 7 (soft) or 4096 x 6 + threshold 4096 + 1 (sparse)
    soft = 32 * (_lora(8) + 2 * 16 * 4096 + 10 * 4096 + 32 + 7 * 4096)
    sparse = 32 * (_lora(8) + 2 * 16 * 4096 + 6 * 4096 + 4097)
    assert _count("method=moa_soft") == soft == 17_957_888
    assert _count("method=moa_sparse") == sparse == 16_646_176


def test_adamole_with_its_ffn_lora_on_down_proj_matches_moa_table1():
    # 8 experts r=8 (as much as one LoRA of rank 64); per Linear a 8-way router and a threshold Linear(d_in, 1) with bias.
    # With the FFN LoRA on a 14336-wide input (down_proj) this is MoA Table 1's 101.12M exactly;
    # on up_proj (what the text says) the routers read 4096 features instead.
    down = 32 * (_lora(64, 14336, 4096) + 4 * (8 * 4096 + 4097) + 8 * 14336 + 14337)
    assert _count("method=adamole", "experts.targets=[q_proj,k_proj,v_proj,o_proj,down_proj]") == down == 101_122_208
