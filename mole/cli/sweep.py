"""A sweep's outcome, read from its jobs' run directories: right under every Hydra launcher.

Sweep jobs run in ``mole-train``'s own process (Hydra's basic launcher), in worker processes (joblib) or on
other machines (submitit, SLURM), so nothing a job keeps in memory reaches the process that reports the
sweep. Each job instead records its run directory in the sweep directory, as
``SWEEP_DIR/.mole-sweeps/<id>/<job number>.json`` (``<id>``: this ``mole-train``'s, handed to the jobs in
:data:`SWEEP_ENV`; the sweep directory is shared with the jobs, as it must be for their outputs), with the
error line when the job raised. After the launcher returns, :func:`finish` reads that list and each job's
status (:func:`mole.run_dir.run_status`, from its ``metrics.json``): a job succeeded only when its run is
``finished`` and it raised nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from mole.run_dir import FINISHED, run_status, write_json

SWEEP_ENV = "MOLE_SWEEP_ID"
MANIFEST_DIR = ".mole-sweeps"
_STATE: dict[str, Any] = {"dir": None}  # this process's multirun: its sweep directory, once it has started


class SweepRecorder(Callback):
    """Hydra callback (``hydra.callbacks`` in ``conf/train.yaml``): notes the sweep directory in the process
    that runs the sweep, before any job starts."""

    def on_multirun_start(self, config, **kwargs: Any) -> None:
        _STATE["dir"] = Path(config.hydra.sweep.dir).resolve()


@dataclass
class SweepOutcome:
    jobs: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)  # (run directory, why)


def start() -> str:
    """A new sweep id for the jobs this process launches."""
    token = uuid.uuid4().hex
    os.environ[SWEEP_ENV] = token
    _STATE["dir"] = None
    return token


def started() -> Path | None:
    """The sweep directory of this process's multirun, once it has started."""
    return _STATE["dir"]


def record_job(sweep_dir: str | Path, job_num: int, run_dir: str | Path, error: str | None = None) -> None:
    """In a job: say where its run directory is and, if it raised, why (see the module docstring)."""
    token = os.environ.get(SWEEP_ENV)
    if not token:  # a job outside a mole-train sweep (Hydra called from elsewhere)
        return
    folder = Path(sweep_dir).resolve() / MANIFEST_DIR / token
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / f"{int(job_num)}.json", {"run_dir": str(Path(run_dir).resolve()), "error": error})


def finish() -> SweepOutcome | None:
    """The outcome of this process's sweep (``None`` when it ran none), from the job records; removes them."""
    token, sweep_dir = os.environ.pop(SWEEP_ENV, None), _STATE["dir"]
    _STATE["dir"] = None
    if not token or sweep_dir is None:
        return None
    folder = sweep_dir / MANIFEST_DIR / token
    outcome = SweepOutcome()
    records = sorted(folder.glob("*.json"), key=lambda p: int(p.stem)) if folder.is_dir() else []
    for path in records:
        try:
            record = json.loads(path.read_text())
            run_dir = Path(record["run_dir"])
        except (OSError, ValueError, KeyError, TypeError):
            outcome.failed.append((path, "unreadable job record"))
            continue
        outcome.jobs.append(run_dir)
        status = run_status(run_dir)
        if record.get("error") or status != FINISHED:
            outcome.failed.append((run_dir, record.get("error") or f"status {status or 'unknown (no metrics.json)'}"))
    shutil.rmtree(folder, ignore_errors=True)
    try:
        folder.parent.rmdir()  # only when no other sweep is recording there
    except OSError:
        pass
    return outcome
