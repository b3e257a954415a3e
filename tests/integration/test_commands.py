"""mole-train / mole-eval / mole-params as the real commands (subprocesses) on tiny_llama.

User errors through the commands: tests/integration/test_bad_input.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def _run(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_mole_params_command_prints_json(tmp_path):
    proc = _run("mole.cli.params", "model=qwen2_1_5b", "method=lora", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["trainable"] == 9_232_384 and round(out["percent"], 2) == 0.60
    assert len(out["layers"]) == 28 and out["layers"][0] == {"layer": 0, "experts": 1, "routers": 0, "adapted": 7}


def test_mole_train_and_eval_commands_on_tiny_llama(tmp_path):
    run_dir = tmp_path / "run"
    proc = _run("mole.cli.train", "model=tiny_llama", "router=mor", "experts=mola_2468", "trainer.max_steps=2",
                "eval.limit=2", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (run_dir / "train.log").is_file() and "step 2/2" in (run_dir / "train.log").read_text()
    proc = _run("mole.cli.eval", f"checkpoint={run_dir}", "eval.tasks=[mole_mc]", "eval.limit=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "mole_mc" in proc.stdout
    assert set(json.loads((run_dir / "eval" / "results.json").read_text())["results"]) == {"mole_mc"}


def test_mole_train_multirun_sweep_runs_every_job(tmp_path):
    env_out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MOLE_OUTPUT_DIR": str(env_out)}
    proc = subprocess.run([sys.executable, "-m", "mole.cli.train", "-m", "model=tiny_llama", "eval=none",
                           "trainer.max_steps=1", "method=mola,lora"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    jobs = sorted(p.name for p in (env_out / "sweeps" / "multirun").iterdir() if p.is_dir())
    assert [j.split("method=")[1].split(",")[0] for j in jobs] == ["lora", "mola"]
    for job in jobs:
        metrics = json.loads((env_out / "sweeps" / "multirun" / job / "metrics.json").read_text())
        assert metrics["finished"] and metrics["steps"] == 1
