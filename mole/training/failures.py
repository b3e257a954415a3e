"""A failed run leaves a record in its run directory, whatever failed.

``metrics.json`` gets ``finished: false``, ``failed: true``, ``error`` (one line) and ``error_type``,
plus whatever the run had measured (parameter counts, the loss curve up to the failure); ``error.txt``
holds the full traceback. A multirun sweep records a failed job this way and goes on with the next one.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

from mole.run_dir import FAILED, METRICS_FILE, with_status, write_json
from mole.utils.errors import error_line

ERROR_FILE = "error.txt"


def record_failure(run_dir: str | Path, err: BaseException, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the failure record of ``err`` into ``run_dir``; returns the metrics written."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = with_status({**(metrics or {}), "error": error_line(err), "error_type": type(err).__name__}, FAILED)
    write_json(run_dir / METRICS_FILE, record)
    (run_dir / ERROR_FILE).write_text("".join(traceback.format_exception(type(err), err, err.__traceback__)))
    return record


def clear_failure(run_dir: str | Path) -> None:
    """A run that finishes removes the ``error.txt`` of an earlier failed attempt."""
    (Path(run_dir) / ERROR_FILE).unlink(missing_ok=True)
