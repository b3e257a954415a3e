"""Signals: SIGTERM / SIGINT stop mole-train at a step boundary with a checkpoint, one line and 143 / 130.

What the user sees for SIGTERM, SIGINT and a second signal (status, the one line, checkpoint, metrics.json,
nothing half-written) is a row each of tests/integration/test_bad_input.py's "processes and signals" family."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mole.training import checkpoint as ckpt
from mole.training.signals import RunInterrupted, StopRequest, requeued

# mole-train with every micro-batch slowed down (so that a signal lands mid-run), on the killed run's config
from tests.integration.test_kill_resume import _SLOW_DRIVER as SLOW_DRIVER  # noqa: E402
from tests.integration.test_kill_resume import KILL as RUN  # noqa: E402


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _start_slow(run_dir: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SLOW_DRIVER, *RUN, *overrides, f"hydra.run.dir={run_dir}"],
                            cwd=run_dir.parent, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_training(run_dir: Path, proc: subprocess.Popen) -> None:
    """Until the first validation pass is logged (the loop has started), then a little more."""
    deadline = time.monotonic() + 240
    log = run_dir / "train.log"
    while time.monotonic() < deadline and proc.poll() is None:
        if log.is_file() and "step 0: val/loss" in log.read_text():
            time.sleep(0.5)
            return
        time.sleep(0.05)
    raise AssertionError(f"training did not start: {proc.stderr.read()[-2000:] if proc.poll() is not None else ''}")


# ---- the handler itself (fast) ----


def test_first_signal_sets_the_flag_and_the_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        assert signal.getsignal(signal.SIGTERM) != before
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.signum == signal.SIGTERM and stop.agreed(None) == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before
    stopped = RunInterrupted(4, signal.SIGINT)
    assert stopped.exit_status == 130 and stopped.line("mole-train") == (
        "mole-train: interrupted at step 4; resume with trainer.resume=true")
    assert not isinstance(stopped, Exception)  # passes `except Exception` failure records


def test_sigusr2_is_taken_only_where_someone_handles_it_and_then_chained():
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    try:
        with StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.05)
            assert stop.signum == signal.SIGUSR2 and calls == []  # not passed on before the checkpoint
            stop.chain()
        assert calls == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)
    signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    try:
        with StopRequest():
            assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_requeued_reads_slurm_restart_count(monkeypatch):
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert not requeued()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert not requeued()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert requeued()


# ---- the real command ----


@pytest.mark.slow
@pytest.mark.timing
def test_sigterm_stops_with_a_checkpoint_and_resume_ends_with_the_uninterrupted_adapter(tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref = subprocess.Popen([sys.executable, "-m", "mole.cli.train", *RUN, f"hydra.run.dir={ref_dir}"], cwd=tmp_path,
                           env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    victim = _start_slow(run_dir)  # no trainer.save_every: the signal alone makes the checkpoint
    _wait_for_training(run_dir, victim)
    victim.send_signal(signal.SIGTERM)
    _, err = victim.communicate(timeout=120)
    assert victim.returncode == 143, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("mole-train:")]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    step = metrics["steps"]
    assert lines == [f"mole-train: interrupted at step {step}; resume with trainer.resume=true"]
    assert "Traceback" not in err
    assert metrics["interrupted"] is True and metrics["finished"] is False and "failed" not in metrics
    assert metrics["signal"] == "SIGTERM" and 1 <= step < 6 and len(metrics["train_loss"]) == step
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [step]
    assert not (run_dir / "adapter.safetensors").exists()

    resumed = subprocess.run([sys.executable, "-m", "mole.cli.train", *RUN, "trainer.resume=true",
                              f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert ref.wait(timeout=300) == 0, ref.stderr.read()[-2000:]
    a, b = load_file(ref_dir / "adapter.safetensors"), load_file(run_dir / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    done = json.loads((run_dir / "metrics.json").read_text())
    assert done["finished"] and "interrupted" not in done
    assert done["train_loss"] == json.loads((ref_dir / "metrics.json").read_text())["train_loss"]


# ---- requeue on preemption under submitit / SLURM (in-process, two tiny runs) ----


@pytest.mark.slow
@pytest.mark.timing
def test_a_preempted_submitit_job_checkpoints_then_requeues_and_the_requeued_job_resumes(tmp_path, monkeypatch):
    """submitit handles SIGUSR2 by requeueing the job (SLURM sends it before a time limit or on preemption);
    the run checkpoints first, then calls submitit's handler; the requeued job, which SLURM starts with
    ``SLURM_RESTART_COUNT=1``, resumes from that checkpoint without ``trainer.resume`` (that a resumed run
    ends bit for bit as the uninterrupted one: tests/unit/training/test_checkpoint.py)."""
    import mole.training.loop as loop
    from mole.config import compose_config
    from mole.recipes.train import run_train
    from tests.unit.training.test_checkpoint import RESUME

    for name in ("SLURM_RESTART_COUNT", "SLURM_PROCID", "SLURM_NTASKS", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    run = tmp_path / "job"
    requeues = []

    def submitit_requeue(signum, frame):  # what submitit's handler sees when it is called
        metrics = json.loads((run / "metrics.json").read_text())
        requeues.append(([s for s, _ in ckpt.list_checkpoints(run)], metrics["status"], metrics["steps"]))

    real, calls = loop.loss_step, {"n": 0}

    def preempted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:  # step 4, first micro-batch (2 micro-batches a step)
            os.kill(os.getpid(), signal.SIGUSR2)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "loss_step", preempted)
    previous = signal.signal(signal.SIGUSR2, submitit_requeue)
    try:
        with pytest.raises(RunInterrupted) as stopped:
            run_train(compose_config(RESUME), run)
    finally:
        signal.signal(signal.SIGUSR2, previous)
        monkeypatch.setattr(loop, "loss_step", real)
    assert stopped.value.step == 4 and stopped.value.exit_status == 128 + signal.SIGUSR2
    # submitit was called once, after the checkpoint of step 4 and the interrupted record were written
    assert requeues == [([2, 4], "interrupted", 4)]
    before = json.loads((run / "metrics.json").read_text())["train_loss"]

    # the requeued job: the same command, in the environment SLURM gives a requeued one-task job
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    trained = []
    monkeypatch.setattr(loop, "loss_step", lambda *a, **k: (trained.append(1), real(*a, **k))[1])
    resumed = run_train(compose_config(RESUME), run)
    assert len(trained) == 4  # steps 5 and 6 only: it resumed from step 4 (a fresh start trains 12 micro-batches)
    assert resumed["finished"] and "interrupted" not in resumed and resumed["steps"] == 6
    assert len(before) == 4 and resumed["train_loss"][:4] == before and len(resumed["train_loss"]) == 6
