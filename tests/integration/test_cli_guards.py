"""The commands as subprocesses: their one-line refusals, and a secret on the command line kept out of a run."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY

from mole.utils.secrets import REDACTED

SECRET = "sk-live-1234567890abcdef"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _files_containing(root: Path, text: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


def test_mole_report_usage_error_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mole.cli.report"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("mole-report: error: usage: mole-report SWEEP_DIR")


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="DeepSpeed is installed")
def test_deepspeed_missing_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mole.cli.train", *TINY, "distributed=deepspeed_zero2",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("mole-train: error:")]
    assert "needs DeepSpeed" in line
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before writing or launching


def test_mole_train_keeps_a_command_line_secret_out_of_the_run_directory(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MOLE_OUTPUT_DIR": str(tmp_path / "out")}
    proc = subprocess.run([sys.executable, "-m", "mole.cli.train", *TINY, "trainer.max_steps=1",
                           f"+creds.hf_token={SECRET}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run_dir,) = [p for p in (tmp_path / "out" / "runs").iterdir() if p.is_dir()]
    assert "creds.hf_token=redacted" in run_dir.name and SECRET not in run_dir.name
    assert (run_dir / ".hydra" / "overrides.yaml").is_file() and (run_dir / "metrics.json").is_file()
    assert _files_containing(tmp_path, SECRET) == []
    assert SECRET not in proc.stdout + proc.stderr
    overrides = (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert f"+creds.hf_token={REDACTED}" in overrides and "trainer.max_steps=1" in overrides
