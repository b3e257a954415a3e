"""mole-train killed with SIGKILL in the middle of a run resumes to the adapter and metrics of the
uninterrupted run, bit for bit (the real command, as subprocesses)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from mole.training import checkpoint as ckpt

# mole-train with every micro-batch slowed down, so that the kill lands in the middle of the run
_SLOW_DRIVER = (
    "import sys, time, mole.training.loop as L\n"
    "real = L.loss_step\n"
    "def slow(*a, **k):\n"
    "    time.sleep(0.4)\n"
    "    return real(*a, **k)\n"
    "L.loss_step = slow\n"
    "from mole.cli.train import main\n"
    "main()\n"
)
KILL = ["model=tiny_llama", "eval=none", "trainer.batch_size=2", "adapter.dropout=0.1", "trainer.max_steps=6",
        "data.max_records=12", "trainer.eval_every=3"]


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _train_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "mole.cli.train", *args]


def test_run_killed_with_sigkill_resumes_to_the_same_adapter_bit_for_bit(tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref = subprocess.Popen(_train_cmd(*KILL, f"hydra.run.dir={ref_dir}"), cwd=tmp_path, env=_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen([sys.executable, "-c", _SLOW_DRIVER, *KILL, "trainer.save_every=1",
                               f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not ckpt.list_checkpoints(run_dir) and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL
    steps = [s for s, _ in ckpt.list_checkpoints(run_dir)]
    assert steps and max(steps) < 6, steps  # killed in the middle
    assert not (run_dir / "adapter.safetensors").exists() and not (run_dir / "metrics.json").exists()

    resumed = subprocess.run(_train_cmd(*KILL, "trainer.save_every=1", "trainer.resume=true", f"hydra.run.dir={run_dir}"),
                             cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"continuing from {run_dir / 'checkpoints'}/step-" in (run_dir / "train.log").read_text()
    assert ref.wait(timeout=300) == 0, ref.stderr.read()[-2000:]

    a, b = load_file(ref_dir / "adapter.safetensors"), load_file(run_dir / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ref_metrics = json.loads((ref_dir / "metrics.json").read_text())
    run_metrics = json.loads((run_dir / "metrics.json").read_text())
    assert run_metrics["train_loss"] == ref_metrics["train_loss"] and run_metrics["val_loss"] == ref_metrics["val_loss"]
    assert Path(run_dir / "checkpoints").is_dir() and [s for s, _ in ckpt.list_checkpoints(run_dir)] == [5, 6]
