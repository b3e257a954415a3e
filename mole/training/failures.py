"""A failed run leaves a record in its run directory, whatever failed.

``metrics.json`` gets ``finished: false``, ``failed: true``, ``error`` (one line) and ``error_type``,
plus whatever the run had measured (parameter counts, the loss curve up to the failure); ``error.txt``
holds the full traceback. A multirun sweep records a failed job this way and goes on with the next one.
"""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path
from typing import Any

from mole.utils.errors import error_line

ERROR_FILE = "error.txt"
METRICS_FILE = "metrics.json"


def record_failure(run_dir: str | Path, err: BaseException, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the failure record of ``err`` into ``run_dir``; returns the metrics written."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {**(metrics or {}), "finished": False, "failed": True, "error": error_line(err),
              "error_type": type(err).__name__}
    tmp = run_dir / (METRICS_FILE + ".tmp")
    try:
        tmp.write_text(json.dumps(record, indent=2, default=str))
        os.replace(tmp, run_dir / METRICS_FILE)
    except OSError:  # the disk that failed the run may fail the record too: leave no half-written file
        tmp.unlink(missing_ok=True)
        raise
    (run_dir / ERROR_FILE).write_text("".join(traceback.format_exception(type(err), err, err.__traceback__)))
    return record


def clear_failure(run_dir: str | Path) -> None:
    """A run that finishes removes the ``error.txt`` of an earlier failed attempt."""
    (Path(run_dir) / ERROR_FILE).unlink(missing_ok=True)
