"""``scripts/peers_bench.py`` with the published code in its own venv (``make peers`` builds ``.venv-peers``):
both processes train the same weights on the same batch, and every mole variant and its MoE-PEFT / mixlora
counterpart train the same number of parameters. Skipped where ``.venv-peers`` is absent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
TINY = ["model.hidden_size=64", "model.config.intermediate_size=128", "model.config.num_attention_heads=4",
        "model.config.num_key_value_heads=2", "model.num_layers=2"]

pytestmark = pytest.mark.skipif(not PEERS_PYTHON.exists(),
                                reason="no .venv-peers (MoE-PEFT, mixlora, their transformers): `make peers` builds it")


def test_peers_side_by_side_on_a_tiny_llama(tmp_path):
    out = tmp_path / "peers.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "peers_bench.py"), "--rounds", "2", "--warmup", "2", "--batch", "2",
           "--seq", "32", "--out", str(out), *[a for o in TINY for a in ("--model-override", o)]]
    proc = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["versions"]["peers"]["moe-peft"] == "2.0.2" and r["versions"]["peers"]["mixlora"] == "0.2.3"
    assert r["versions"]["peers"]["transformers"].startswith("4.")
    # the same weights and batch in both processes: peft's two warm-up losses agree (to float rounding, for
    # transformers 4 and 5 may order an operation differently); so do plain LoRA's in MoE-PEFT's own Llama
    mole_peft = r["warmup_losses"]["peft_lora_r8"]
    for key in ("peers:peft_lora_r8", "moe_peft_lora"):
        assert r["warmup_losses"][key] == pytest.approx(mole_peft, rel=1e-4), key
    # matched configurations: each counterpart trains exactly as many parameters
    for pair in r["pairs"]:
        for peer in (pair["moe_peft"], pair["mixlora_package"]):
            if peer is not None:
                assert r["trainable"][peer] == r["trainable"][pair["mole"]], (pair["method"], peer)
                assert 0 < r["ratios_vs_peft_lora_r8"][peer] < 50
                assert r["peak_memory_mb"][peer] > 0
    assert "| MoLA-style top-2" in proc.stdout
