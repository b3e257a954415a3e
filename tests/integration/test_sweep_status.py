"""A sweep's "N of M sweep jobs failed" line and exit status come from the jobs' directories (mole/cli/sweep.py),
so they are right under launchers that run the jobs in other processes (joblib, submitit)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mole.cli import sweep
from mole.run_dir import FAILED, FINISHED, INTERRUPTED, METRICS_FILE, RUNNING, with_status, write_json


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _job(root: Path, name: str, status: str | None) -> Path:
    path = root / name
    path.mkdir(parents=True)
    if status is not None:
        write_json(path / METRICS_FILE, with_status({}, status))
    return path


def test_the_outcome_is_read_from_each_jobs_record_and_directory(tmp_path, monkeypatch):
    monkeypatch.delenv(sweep.SWEEP_ENV, raising=False)
    sweep.record_job(tmp_path, 0, tmp_path / "x")  # outside a mole-train sweep: nothing recorded
    assert not (tmp_path / sweep.MANIFEST_DIR).exists()

    sweep.start()
    monkeypatch.setitem(sweep._STATE, "dir", tmp_path.resolve())  # what the start callback records
    jobs = [_job(tmp_path, "ok", FINISHED), _job(tmp_path, "failed", FAILED), _job(tmp_path, "stopped", INTERRUPTED),
            _job(tmp_path, "killed", RUNNING),  # a record left by a process that died
            _job(tmp_path, "silent", None),  # no metrics.json at all
            _job(tmp_path, "refused", FINISHED)]  # finished earlier; this sweep's job was refused
    for num, job in enumerate(jobs):
        sweep.record_job(tmp_path, num, job)
    sweep.record_job(tmp_path, 5, jobs[5], error="run directory ... is in use by another mole run (pid 1)")
    outcome = sweep.finish()
    assert outcome.jobs == [j.resolve() for j in jobs]
    assert {d.name: why for d, why in outcome.failed} == {
        "failed": "status failed", "stopped": "status interrupted", "killed": "status interrupted",
        "silent": "status unknown (no metrics.json)", "refused": "run directory ... is in use by another mole run (pid 1)"}
    assert not (tmp_path / sweep.MANIFEST_DIR).exists()  # the records are removed
    assert sweep.finish() is None  # and the sweep is over


def _sweep(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "MOLE_OUTPUT_DIR": str(tmp_path / "out"),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    return subprocess.run([sys.executable, "-m", "mole.cli.train", "-m", *overrides, "model=tiny_llama", "eval=none",
                           "trainer.max_steps=1", "trainer.batch_size=2", "data.max_records=8", "trainer.lr=-1,1e-3"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def _check_one_of_two_failed(proc: subprocess.CompletedProcess, tmp_path: Path) -> None:
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert re.fullmatch(r"mole-train: error: 1 of 2 sweep jobs failed \([^)]*trainer\.lr=-1[^)]*\); see each "
                        r"job's metrics\.json and error\.txt", errors[0]), errors[0]
    root = tmp_path / "out" / "sweeps" / "multirun"
    jobs = {p.name: json.loads((p / METRICS_FILE).read_text()) for p in root.iterdir() if p.is_dir()}
    assert len(jobs) == 2 and not (root / sweep.MANIFEST_DIR).exists()
    assert sorted(m["status"] for m in jobs.values()) == [FAILED, FINISHED]


@pytest.mark.slow
@pytest.mark.skipif(not _installed("hydra_plugins.hydra_joblib_launcher"), reason="pip install 'mole[joblib]'")
def test_a_joblib_sweep_reports_its_failed_job(tmp_path):
    _check_one_of_two_failed(_sweep(tmp_path, "hydra/launcher=mole_joblib"), tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(not _installed("hydra_plugins.hydra_submitit_launcher"), reason="pip install 'mole[slurm]'")
def test_a_submitit_sweep_reports_its_failed_job(tmp_path):
    proc = _sweep(tmp_path, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                  f"hydra.launcher.submitit_folder={tmp_path / 'submitit'}")
    _check_one_of_two_failed(proc, tmp_path)
