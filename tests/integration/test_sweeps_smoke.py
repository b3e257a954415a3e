"""Every paper table's sweep (conf/sweep/*.yaml) runs end to end with debug=smoke, and mole-report lays it out.

Marked ``sweeps`` (``make test-sweeps``, run by CI): each job trains tiny_llama for two steps on the shipped
fixtures and evaluates it, so the whole set takes minutes. The fast suite checks that a rerun skips finished
jobs, on a two-job sweep."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mole import CONF_DIR
from mole.report_paper import expected_grid

ALL_SWEEPS = sorted(p.stem for p in (Path(CONF_DIR) / "sweep").glob("*.yaml"))
# a second stage reads its first stage's runs (trainer.init_from): one test runs both, in order, so that the
# stages share a directory whichever test process (pytest-xdist) runs them
SWEEPS = [name for name in ALL_SWEEPS if not (name.endswith("_stage1") and name.removesuffix("_stage1") in ALL_SWEEPS)]


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _run(*args: str, timeout: int = 3000) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=_env(), timeout=timeout)


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sweeps")


@pytest.mark.sweeps
@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_runs_in_smoke_mode_and_reports(name, out_dir):
    if f"{name}_stage1" in ALL_SWEEPS:
        _check_sweep(f"{name}_stage1", out_dir)
    _check_sweep(name, out_dir)


def _check_sweep(name: str, out_dir: Path) -> None:
    proc = _run("-m", "mole.cli.train", f"sweep={name}", "debug=smoke", f"paths.output_dir={out_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep_dir = out_dir / "smoke" / "sweeps" / name
    grid = expected_grid(yaml.safe_load((sweep_dir / "multirun.yaml").read_text()))
    proc = _run("-m", "mole.cli.report", str(sweep_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    has_paper = (sweep_dir / "jobs.csv").is_file()  # a sweep with a paper: block (a first stage may have none)
    jobs = list(csv.DictReader(io.StringIO((sweep_dir / ("jobs.csv" if has_paper else "report.csv")).read_text())))
    assert len(jobs) == len(grid) > 0
    assert {j["status"] for j in jobs} == {"finished"}
    if not has_paper:
        return
    table = list(csv.DictReader(io.StringIO((sweep_dir / "report.csv").read_text())))
    ours = [r for r in table if r["source"] == "mole"]
    assert ours, "the paper table has no row"
    for row in ours:  # every cell of ours got all its jobs and a number (a first stage: no cells, TP and time)
        done = [v for k, v in row.items() if k.endswith(" jobs")]
        assert all(d.split("/")[0] == d.split("/")[1] != "0" for d in done), row
        assert any(v for k, v in row.items() if k not in ("row", "source")), row


SMALL_SWEEP = """# @package _global_
sweep_name: two_jobs
eval: {tasks: [mole_yesno], limit: 4}
hydra:
  mode: MULTIRUN
  sweeper:
    params:
      method: lora,mola
paper:
  rows_by: [method]
  columns_by: tasks
  row_labels: {method=lora: LoRA, method=mola: MoLA}
  reported: {LoRA: {mole_yesno: 50.0}}
  scale: 100
"""


def test_a_rerun_skips_finished_jobs(tmp_path):
    (tmp_path / "conf" / "sweep").mkdir(parents=True)
    (tmp_path / "conf" / "sweep" / "two_jobs.yaml").write_text(SMALL_SWEEP)
    args = ("-m", "mole.cli.train", "sweep=two_jobs", "debug=smoke", f"paths.output_dir={tmp_path / 'out'}",
            f"hydra.searchpath=[file://{tmp_path / 'conf'}]")
    first = _run(*args, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    sweep_dir = tmp_path / "out" / "smoke" / "sweeps" / "two_jobs"
    metrics = sorted(sweep_dir.glob("*/metrics.json"))
    assert len(metrics) == 2
    before = [m.read_bytes() for m in metrics]
    second = _run(*args, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert (second.stdout + second.stderr).count("already holds a finished run of this config; skipping") == 2
    assert [m.read_bytes() for m in metrics] == before
    report = _run("-m", "mole.cli.report", str(sweep_dir))
    assert report.returncode == 0, report.stderr
    text = (sweep_dir / "report.md").read_text()
    assert "| **LoRA** |" in text and "*LoRA (paper)* | 50.00" in text
