"""Failures: a non-finite loss and failed jobs in a sweep (what is never read from a run directory: tests/unit/test_safe_loading.py)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import TINY
from safetensors.torch import load_file

from mole.config import compose_config
from mole.recipes.train import run_train

# ---- a NaN / inf loss ----


def test_non_finite_loss_stops_with_one_line_and_keeps_the_last_finite_adapter(tmp_path, capsys):
    from mole.cli.train import _single_run

    run_dir = tmp_path / "run"
    # lr=1e30: step 1 is finite, but its update makes the weights ~1e30 and the logits of step 2 overflow
    with pytest.raises(SystemExit) as stop:
        _single_run(compose_config([*TINY, "trainer.max_steps=5", "trainer.lr=1e30"]), str(run_dir))
    assert stop.value.code == 2
    captured = capsys.readouterr()
    (line,) = [ln for ln in captured.err.splitlines() if "error:" in ln]
    assert re.fullmatch(
        r"mole-train: error: training loss became (nan|inf) at step 2; lower trainer.lr or check the data; "
        rf"the adapter of step 1, the last finite one, is saved in {re.escape(str(run_dir))}/adapter.safetensors",
        line,
    ), line
    assert "Traceback" not in captured.out + captured.err

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["finished"] is False and metrics["failed"] is True and metrics["error"] == line.split("error: ", 1)[1]
    assert metrics["steps"] == 1 and metrics["last_good_step"] == 1 and len(metrics["train_loss"]) == 1
    assert math.isfinite(metrics["train_loss"][0]["loss"])
    assert "NonFiniteLossError" in (run_dir / "error.txt").read_text()
    saved = load_file(run_dir / "adapter.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())
    # it is the adapter after step 1: a 1-step run (same lr at step 1: the linear decay starts at factor 1)
    one = run_train(compose_config([*TINY, "trainer.max_steps=1", "trainer.lr=1e30"]), tmp_path / "one")
    assert one["finished"]
    reference = load_file(tmp_path / "one" / "adapter.safetensors")
    assert saved.keys() == reference.keys() and all(torch.equal(saved[k], reference[k]) for k in saved)
    assert max(t.abs().max().item() for t in saved.values()) > 1e20  # the huge step was applied, not skipped

    # a failed run is not "finished": running it again needs no force
    again = run_train(compose_config([*TINY, "trainer.max_steps=1", "trainer.lr=1e-3"]), run_dir)
    assert again["finished"] and not (run_dir / "error.txt").exists()


@pytest.mark.parametrize("norm, finished", [(0.5, True), (float("nan"), False), (None, True)])
def test_a_gradient_norm_given_as_a_float_or_none_is_checked(norm, finished, tmp_path, monkeypatch):
    """Under DeepSpeed, ``Accelerator.clip_grad_norm_`` returns the engine's global norm as a Python float
    (None before its first step), not a tensor; the loop's finiteness check took only tensors."""
    from accelerate import Accelerator

    from mole.utils.errors import NonFiniteLossError

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", lambda self, params, max_norm: norm)
    cfg = compose_config([*TINY, "trainer.max_steps=2"])
    if finished:
        assert run_train(cfg, tmp_path)["finished"]
    else:
        with pytest.raises(NonFiniteLossError, match="gradient norm became nan at step 1"):
            run_train(cfg, tmp_path)


# ---- sweeps: a failed job does not stop the others ----


def test_sweep_job_that_raises_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch, capsys):
    import mole.cli.train as cli
    import mole.training.loop as loop

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA exploded")

    monkeypatch.setattr(loop, "loss_step", broken)
    cli.sweep.start()
    monkeypatch.setitem(cli.sweep._STATE, "dir", tmp_path)  # as the sweep's start callback sets it
    cli._sweep_job(compose_config(TINY), str(tmp_path / "job"), str(tmp_path), 0)  # does not raise
    outcome = cli.sweep.finish()
    assert outcome.jobs == [tmp_path / "job"] and [d for d, _ in outcome.failed] == [tmp_path / "job"]
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "mole-train" in ln]  # (not the progress bar)
    assert lines == ["mole-train: job job failed: RuntimeError: CUDA exploded"]
    metrics = json.loads((tmp_path / "job" / "metrics.json").read_text())
    assert metrics["failed"] and metrics["error"] == "RuntimeError: CUDA exploded" and metrics["steps"] == 0
    trace = (tmp_path / "job" / "error.txt").read_text()
    assert trace.startswith("Traceback") and "in broken" in trace


def test_multirun_sweep_runs_every_job_and_reports_the_failed_ones(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "MOLE_OUTPUT_DIR": str(out)}
    # the failing jobs come first: the valid one still runs after them
    proc = subprocess.run(
        [sys.executable, "-m", "mole.cli.train", "-m", "model=tiny_llama", "eval=none", "trainer.max_steps=2",
         "trainer.batch_size=2", "trainer.lr=-1,1e30,1e-3"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and errors[0].startswith("mole-train: error: 2 of 3 sweep jobs failed ("), errors

    jobs = {re.search(r"trainer\.lr=([^,]+)", p.name).group(1): p for p in (out / "sweeps" / "multirun").iterdir() if p.is_dir()}
    assert set(jobs) == {"-1", "1e+30", "0.001"}, set(jobs)  # Hydra writes the parsed floats
    by_lr = {"bad": jobs["-1"], "nan": jobs["1e+30"], "ok": jobs["0.001"]}
    bad = json.loads((by_lr["bad"] / "metrics.json").read_text())
    assert bad["failed"] and bad["error"] == "trainer.lr must be a positive number, got -1"
    assert "MoleConfigError" in (by_lr["bad"] / "error.txt").read_text()
    nan = json.loads((by_lr["nan"] / "metrics.json").read_text())
    assert nan["failed"] and "at step 2" in nan["error"] and (by_lr["nan"] / "adapter.safetensors").is_file()
    ok = json.loads((by_lr["ok"] / "metrics.json").read_text())
    assert ok["finished"] and ok["steps"] == 2 and "failed" not in ok and not (by_lr["ok"] / "error.txt").exists()
    assert f"job {by_lr['bad'].name} failed: trainer.lr must be a positive number" in proc.stderr

    # mole-report on the sweep: the failed jobs as failed, with their errors, and blanks (not zeros)
    report = subprocess.run([sys.executable, "-m", "mole.cli.report", str(out / "sweeps" / "multirun")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr
    assert "3 job(s): 1 finished, 2 failed" in report.stdout
    rows = {r["job"]: r for r in csv.DictReader(io.StringIO((out / "sweeps" / "multirun" / "report.csv").read_text()))}
    bad_row, ok_row = rows[by_lr["bad"].name], rows[by_lr["ok"].name]
    assert bad_row["status"] == "failed" and bad_row["error"] == "trainer.lr must be a positive number, got -1"
    assert bad_row["steps"] == "" and bad_row["val loss (last)"] == ""
    assert rows[by_lr["nan"].name]["status"] == "failed" and "at step 2" in rows[by_lr["nan"].name]["error"]
    assert ok_row["status"] == "finished" and ok_row["steps"] == "2"
