"""Hydra launchers for sweeps: parallel local jobs (joblib) and SLURM (submitit) configs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from mole import CONF_DIR

SECRET = "sk-live-1234567890abcdef"


def _installed(module: str) -> bool:
    """find_spec of a submodule raises when its parent package (here the ``hydra_plugins`` namespace, which
    only the launcher plugins install) is missing; that means not installed."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


HAS_JOBLIB = _installed("hydra_plugins.hydra_joblib_launcher")
HAS_SUBMITIT = _installed("hydra_plugins.hydra_submitit_launcher")


def _compose_with_hydra(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.skipif(not HAS_JOBLIB, reason="pip install 'mole[joblib]'")
def test_joblib_multirun_runs_two_jobs_in_parallel_processes(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "MOLE_OUTPUT_DIR": str(out),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "mole.cli.train", "-m", "hydra/launcher=mole_joblib",
                           "model=tiny_llama", "eval=none", "trainer.max_steps=1", "method=lora,mola",
                           f"+creds.api_key={SECRET}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr  # the joblib launcher ran the sweep
    jobs = sorted(p for p in (out / "sweeps" / "multirun").iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [j.name.split("method=")[1].split(",")[0] for j in jobs] == ["lora", "mola"]
    for job in jobs:
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["finished"] and metrics["steps"] == 1 and metrics["method"] == job.name.split("method=")[1].split(",")[0]
    # the sweep's multirun.yaml, each job's .hydra/ and directory name: the secret is redacted everywhere
    assert (out / "sweeps" / "multirun" / "multirun.yaml").is_file()
    assert [p for p in out.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()] == []
    assert all("creds.api_key=redacted" in j.name for j in jobs)


def test_joblib_config_composes():
    if not HAS_JOBLIB:
        pytest.skip("pip install 'mole[joblib]'")
    launcher = _compose_with_hydra("hydra/launcher=mole_joblib").hydra.launcher
    assert launcher._target_.endswith("JoblibLauncher") and launcher.n_jobs == 2 and launcher.backend == "loky"


@pytest.mark.skipif(not HAS_SUBMITIT, reason="pip install 'mole[slurm]'")
def test_slurm_config_composes_with_one_gpu_per_process():
    cfg = _compose_with_hydra("hydra/launcher=mole_slurm", "distributed=ddp", "distributed.num_processes=4",
                              "hydra.launcher.partition=gpu")
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.gpus_per_node == 4 and launcher.tasks_per_node == 1 and launcher.nodes == 1
    assert launcher.partition == "gpu" and launcher.timeout_min == 240
    single = _compose_with_hydra("hydra/launcher=mole_slurm").hydra.launcher
    assert single.gpus_per_node == 1
