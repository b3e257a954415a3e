"""mole-report: a sweep's jobs as one table, failed and unfinished jobs shown as such, never as zeros.

mole-report on a real sweep with failed jobs: tests/integration/test_failures.py."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from mole.recipes.report import write_report
from mole.report import find_jobs, read_job
from mole.utils.errors import MoleConfigError


def _job(root: Path, name: str, metrics: dict | None = None, error: str | None = None, hydra: bool = True) -> Path:
    d = root / name
    (d / ".hydra").mkdir(parents=True) if hydra else d.mkdir(parents=True)
    if hydra:
        (d / ".hydra" / "overrides.yaml").write_text(f"- {name}\n")
    if metrics is not None:
        (d / "metrics.json").write_text(json.dumps(metrics))
    if error is not None:
        (d / "error.txt").write_text(error)
    return d


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    _job(root, "method=lora", {"finished": True, "method": "lora", "steps": 10, "trainable_percent": 0.6,
                               "val_loss": [{"step": 0, "loss": 2.0}, {"step": 5, "loss": 0.5}, {"step": 10, "loss": 0.7}],
                               "eval": {"mole_mc": {"acc,none": 0.25, "acc_stderr,none": 0.1}},
                               "time_per_step_s": 1.5, "wall_time_s": 20.0})
    _job(root, "method=mola", {"finished": False, "failed": True, "method": "mola", "steps": 3,
                               "val_loss": [{"step": 0, "loss": 2.0}],
                               "error": "training loss became nan at step 4; lower trainer.lr"}, error="Traceback ...")
    _job(root, "method=hmora")  # started (Hydra wrote .hydra/), no result: killed or still running
    _job(root, "method=dora", error="Traceback: boom")  # failed before writing metrics
    (root / "multirun.yaml").write_text("hydra: {}\n")  # sweep-level files are not jobs
    return root


def test_statuses_come_from_what_each_run_wrote(sweep):
    rows = {r.job: r for r in (read_job(p) for p in find_jobs(sweep))}
    assert {k: r.status for k, r in rows.items()} == {
        "method=lora": "finished", "method=mola": "failed", "method=hmora": "incomplete", "method=dora": "failed",
    }
    assert rows["method=lora"].overrides == ["method=lora"]


def test_report_has_values_of_finished_runs_and_blanks_not_zeros_elsewhere(sweep):
    md, csv_path, _ = write_report(sweep)
    text = md.read_text()
    assert "4 job(s): 1 finished, 2 failed, 1 incomplete" in text
    rows = {r["job"]: r for r in csv.DictReader(io.StringIO(csv_path.read_text()))}
    lora, mola, hmora = rows["method=lora"], rows["method=mola"], rows["method=hmora"]
    # last and best validation loss of the finished run: 0.7 and 0.5
    assert float(lora["val loss (last)"]) == 0.7 and float(lora["val loss (best)"]) == 0.5
    assert float(lora["mole_mc (acc)"]) == 0.25 and float(lora["trainable %"]) == 0.6
    # the failed run: its error, its partial curve, and no accuracy (an empty cell, not 0)
    assert mola["status"] == "failed" and mola["error"].startswith("training loss became nan at step 4")
    assert mola["mole_mc (acc)"] == "" and float(mola["val loss (last)"]) == 2.0
    assert all(hmora[k] == "" for k in ("steps", "val loss (last)", "mole_mc (acc)", "error"))
    md_row = next(line for line in text.splitlines() if line.startswith("| method=hmora |"))
    assert "| incomplete |" in md_row and "0" not in md_row.replace("method=hmora", "")


def test_report_of_a_directory_without_runs_is_a_clear_error(tmp_path):
    with pytest.raises(MoleConfigError, match="no run directories"):
        write_report(tmp_path)
    with pytest.raises(MoleConfigError, match="not a directory"):
        write_report(tmp_path / "nowhere")


def test_running_and_interrupted_runs_are_shown_as_such(tmp_path):
    """The status comes from mole.run_dir: the lock for a live run, the record for a stopped one."""
    from mole.run_dir import INTERRUPTED, RUNNING, RunLock, with_status

    root = tmp_path / "sweep"
    live = _job(root, "seed=1", {"status": RUNNING, "finished": False})  # an earlier attempt's record, now running
    _job(root, "seed=2", with_status({"steps": 3, "signal": "SIGTERM"}, INTERRUPTED))  # stopped at a step boundary
    _job(root, "seed=3", {"status": RUNNING, "finished": False})  # a running record, no process: killed
    _job(root, "seed=4")  # started, no record, no lock
    fresh = _job(root, "seed=5")  # a fresh run, still running: no record yet, only its lock
    _job(root, "seed=6", with_status({"steps": 9}, "finished"))
    _job(root, "seed=7", with_status({"error": "boom"}, "failed"), error="Traceback ...")
    with RunLock(live), RunLock(fresh):
        rows = {r.job: r.status for r in (read_job(p) for p in find_jobs(root))}
        md, _, _ = write_report(root)
    assert rows == {"seed=1": "running", "seed=2": "interrupted", "seed=3": "interrupted", "seed=4": "incomplete",
                    "seed=5": "running", "seed=6": "finished", "seed=7": "failed"}
    assert "7 job(s): 1 finished, 2 running, 2 interrupted, 1 failed, 1 incomplete" in md.read_text()
    # once the runs' locks are gone, the fresh run (no record) reads as incomplete, the other as killed
    rows = {r.job: r.status for r in (read_job(p) for p in find_jobs(root))}
    assert rows["seed=1"] == "interrupted" and rows["seed=5"] == "incomplete"


def test_paper_cells_name_running_and_interrupted_jobs(tmp_path):
    import yaml

    from mole.run_dir import INTERRUPTED, RunLock, with_status

    root = tmp_path / "s"
    root.mkdir()
    paper = {"rows_by": ["method"], "columns_by": "data"}
    (root / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"sweeper": {"params": {"method": "lora,mola",
                                                                                          "data": "a"}}}, "paper": paper}))
    for method in ("lora", "mola"):
        d = root / f"method={method},data=a"
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"method={method}", "data=a"]))
    write = with_status({"steps": 2}, INTERRUPTED)
    (root / "method=mola,data=a" / "metrics.json").write_text(json.dumps(write))
    with RunLock(root / "method=lora,data=a"):
        md, _, _ = write_report(root)
    text = md.read_text()
    assert "| **method=lora** | running |" in text and "| **method=mola** | interrupted |" in text, text
