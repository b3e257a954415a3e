"""A sweep's runs as one table: what ``mole-report <sweep dir>`` writes (Markdown and CSV).

Each job directory of a sweep (Hydra's ``outputs/sweeps/<name>/<job>/``) or a single run directory is
one row. Its status comes from the files the run wrote:

* ``running`` — a live process holds the run directory's lock (:func:`mole.run_dir.run_status`);
* ``finished`` — ``metrics.json`` with ``finished: true``;
* ``interrupted`` — ``metrics.json`` with ``interrupted: true`` (stopped by a signal at a step boundary,
  resumable with ``trainer.resume=true``), or a ``running`` record whose process is gone (killed);
* ``failed`` — ``metrics.json`` with ``failed: true`` or an ``error.txt`` (:mod:`mole.training.failures`);
* ``incomplete`` — the job started (``.hydra/`` or ``config.yaml`` exist) but left no record and no process
  holds its lock: killed before it wrote anything;
* ``unreadable`` — a ``metrics.json`` that is not valid JSON.

A value a run did not produce is an empty cell (``—`` in Markdown), never a zero. Only JSON and YAML are
read. The paper-style layouts of the sweep files build on these rows.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mole.run_dir import FAILED, METRICS_FILE, run_status
from mole.utils.errors import MoleConfigError

ERROR_FILE = "error.txt"
MISSING = "—"
# the headline metric of an lm-eval task, in order of preference
METRIC_KEYS = ("mcc,none", "macro_acc,none", "acc,none", "exact_match,none", "acc_norm,none")  # first found: the headline


@dataclass
class JobRow:
    """One run of a sweep."""

    job: str
    status: str
    overrides: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

    def eval_scores(self) -> dict[str, float]:
        """``{task: headline metric}`` from the run's lm-eval results."""
        scores = {}
        for task, values in (self.metrics.get("eval") or {}).items():
            found = headline_metric(values)
            if found is not None:
                scores[f"{task} ({found[0].split(',')[0]})"] = found[1]
        return scores


def headline_metric(values: Any, metric: str | None = None) -> tuple[str, float] | None:
    """A task's headline ``(metric key, value)`` from its lm-eval results: ``metric`` first when given, then
    :data:`METRIC_KEYS` in order; ``None`` without one."""
    if not isinstance(values, dict):
        return None
    keys = ([f"{metric},none", metric] if metric else []) + list(METRIC_KEYS)
    for key in keys:
        if isinstance(values.get(key), (int, float)) and not isinstance(values.get(key), bool):
            return key, float(values[key])
    return None


def headline(values: Any, metric: str | None = None) -> float | None:
    """A task's headline metric value (see :func:`headline_metric`)."""
    found = headline_metric(values, metric)
    return None if found is None else found[1]


def _is_run_dir(path: Path) -> bool:
    return any((path / name).exists() for name in (METRICS_FILE, "config.yaml", ".hydra", ERROR_FILE))


def find_jobs(root: str | Path) -> list[Path]:
    """The run directories under ``root`` (a sweep directory, or one run directory)."""
    root = Path(root)
    if not root.is_dir():
        raise MoleConfigError(f"mole-report: {root} is not a directory (expected a sweep output directory)")
    if (root / METRICS_FILE).exists() or (root / "config.yaml").exists():
        return [root]
    jobs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and _is_run_dir(p))
    if not jobs:
        raise MoleConfigError(f"mole-report: no run directories under {root} (expected one folder per sweep job)")
    return jobs


def read_job(path: Path) -> JobRow:
    """A job's row: its status, overrides and metrics (whatever it wrote)."""
    overrides: list[str] = []
    hydra_overrides = path / ".hydra" / "overrides.yaml"
    if hydra_overrides.is_file():
        try:
            loaded = yaml.safe_load(hydra_overrides.read_text())
            overrides = [str(o) for o in loaded] if isinstance(loaded, list) else []
        except yaml.YAMLError:
            overrides = []
    metrics: dict[str, Any] = {}
    metrics_path = path / METRICS_FILE
    if metrics_path.is_file():
        try:
            loaded = json.loads(metrics_path.read_text())
            metrics = loaded if isinstance(loaded, dict) else {}
        except json.JSONDecodeError:
            return JobRow(path.name, "unreadable", overrides, {})
    status = run_status(path)  # the lock first: a live run reads as running whatever its last record says
    if status is None:  # no record: failed before writing one, or killed
        status = FAILED if (path / ERROR_FILE).is_file() else "incomplete"
    return JobRow(path.name, status, overrides, metrics)


def _val(metrics: dict, which: str) -> float | None:
    losses = [v["loss"] for v in metrics.get("val_loss") or [] if isinstance(v, dict) and "loss" in v]
    if not losses:
        return None
    return losses[-1] if which == "last" else min(losses)


def table(rows: list[JobRow]) -> tuple[list[str], list[list[Any]]]:
    """Header and cells (``None`` where a run produced no value)."""
    tasks = sorted({t for r in rows for t in r.eval_scores()})
    header = ["job", "status", "method", "steps", "trainable %", "val loss (last)", "val loss (best)",
              *tasks, "s / step", "wall s", "error"]
    cells = []
    for r in rows:
        m, scores = r.metrics, r.eval_scores()
        cells.append([
            r.job, r.status, m.get("method"), m.get("steps"), m.get("trainable_percent"),
            _val(m, "last"), _val(m, "best"), *[scores.get(t) for t in tasks],
            m.get("time_per_step_s"), m.get("wall_time_s"), m.get("error"),
        ])
    return header, cells


def _fmt(value: Any) -> str:
    if value is None or value == "":
        return MISSING
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def to_markdown(header: list[str], cells: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def to_csv(header: list[str], cells: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in row] for row in cells])
    return buf.getvalue()


def summary(rows: list[JobRow]) -> str:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    order = ("finished", "running", "interrupted", "failed", "incomplete", "unreadable")
    parts = ", ".join(f"{counts[s]} {s}" for s in order if s in counts)
    return f"{len(rows)} job(s): {parts}"
