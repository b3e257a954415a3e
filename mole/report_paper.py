"""A paper table's layout over a sweep's jobs: what ``mole-report`` writes for a ``sweep=<paper>_table<N>`` run.

A sweep file (``conf/sweep/*.yaml``) carries a ``paper:`` block that says how its jobs make the paper's
table, and what the paper reported:

* ``rows_by`` — override keys whose job values make a row (``[method]``, ``[row]``, ``[router, loss.gamma_c]``);
  a key that varies in the grid but is named nowhere else is added to the rows, so no job is hidden.
* ``columns_by`` — an override key (one column per value; the cell is the job's headline metric on the
  benchmark of that name, else the mean over the benchmarks the job evaluated, e.g. MoA's per-domain
  averages) or ``tasks`` (one column per benchmark each job evaluated).
* ``best_over`` — keys over which the best value is kept (MoR: "the highest value from the three experiments").
* ``mean_over`` — keys over which values are averaged, shown as mean ± sample std (HMoRA: 5 seeds).
* ``scale`` (ours × scale, e.g. 100 for percent), ``average`` (an ``Avg.`` column), ``extra_columns``
  (``trainable_pct``, ``params``, ``train_hours``), ``time_rows`` (a second line per row with the training
  hours of each cell, MoR Table 3), ``row_labels`` / ``column_labels`` (labels and order), ``reported``
  (the paper's numbers by row label and column label), ``title``, ``source``, ``notes``.

The expected jobs are the grid of ``hydra.sweeper.params`` (``multirun.yaml``), so a job that never started
is shown as ``missing``; running, interrupted, failed, incomplete and unreadable jobs are shown as such. A cell that is only partly
done says how many of its jobs it has (``83.1 (2/3)``). Nothing missing is ever shown as a zero.
"""

from __future__ import annotations

import csv
import io
import itertools
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mole.report import MISSING, JobRow, headline
from mole.utils.errors import MoleConfigError

AVG = "Avg."
EXTRA_COLUMNS = {"trainable_pct": "TP (%)", "params": "Param (M)", "train_hours": "Time (h)"}
LAYOUT_KEYS = {"title", "source", "rows_by", "columns_by", "best_over", "mean_over", "scale", "average",
               "extra_columns", "time_rows", "row_labels", "column_labels", "reported", "notes", "metric"}


@dataclass
class PaperLayout:
    """The ``paper:`` block of a sweep file (see the module docstring)."""

    title: str = ""
    source: str = ""
    rows_by: list[str] = field(default_factory=lambda: ["method"])
    columns_by: str = "tasks"
    best_over: list[str] = field(default_factory=list)
    mean_over: list[str] = field(default_factory=list)
    scale: float = 1.0
    average: bool = False
    extra_columns: list[str] = field(default_factory=list)
    time_rows: bool = False
    row_labels: dict[str, str] = field(default_factory=dict)
    column_labels: dict[str, str] = field(default_factory=dict)
    reported: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: str = ""
    metric: str | None = None

    @classmethod
    def from_dict(cls, block: Any, where: str) -> PaperLayout:
        if not isinstance(block, dict):
            raise MoleConfigError(f"{where}: paper must be a mapping, got {type(block).__name__}")
        unknown = sorted(set(block) - LAYOUT_KEYS)
        if unknown:
            raise MoleConfigError(f"{where}: paper: unknown keys {unknown}; known keys are {sorted(LAYOUT_KEYS)}")
        out = cls(**{k: v for k, v in block.items() if v is not None})
        for key in ("rows_by", "best_over", "mean_over", "extra_columns"):
            value = getattr(out, key)
            if isinstance(value, str):
                setattr(out, key, [value])
            elif not isinstance(getattr(out, key), list):
                raise MoleConfigError(f"{where}: paper.{key} must be a list of keys, got {value!r}")
        bad = [c for c in out.extra_columns if c not in EXTRA_COLUMNS]
        if bad:
            raise MoleConfigError(f"{where}: paper.extra_columns {bad} unknown; choose from {sorted(EXTRA_COLUMNS)}")
        if not isinstance(out.columns_by, str) or not out.columns_by:
            raise MoleConfigError(f"{where}: paper.columns_by must be an override key or 'tasks', got {out.columns_by!r}")
        out.row_labels = {canon_key(k): str(v) for k, v in (out.row_labels or {}).items()}
        out.column_labels = {canon(k): str(v) for k, v in (out.column_labels or {}).items()}
        return out


# ---------------------------------------------------------------------------------------------- reading


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def sweep_config(root: Path, rows: list[JobRow]) -> dict | None:
    """The sweep's composed config: ``multirun.yaml`` (written by Hydra when the sweep started), else a job's."""
    candidates = [root / "multirun.yaml"]
    candidates += [root / r.job / ".hydra" / "config.yaml" for r in rows] + [root / r.job / "config.yaml" for r in rows]
    for path in candidates:
        if path.is_file():
            loaded = _read_yaml(path)
            if isinstance(loaded, dict) and "paper" in loaded:
                return loaded
    return None


def _normalise_key(key: str) -> str:
    return key.lstrip("+~")


def canon(value: str) -> str:
    """A grid value in one spelling: numbers by value (Hydra records ``1e-4`` as ``0.0001``), the rest as is."""
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() and "." not in text and "e" not in text.lower() else repr(number)


def canon_key(key: str) -> str:
    """``"k1=v1,k2=v2"`` with each value in :func:`canon`'s spelling."""
    parts = []
    for part in str(key).split(","):
        k, sep, v = part.partition("=")
        parts.append(f"{k.strip()}{sep}{canon(v)}" if sep else part.strip())
    return ",".join(parts)


def overrides_dict(overrides: list[str]) -> dict[str, str]:
    """``["method=lora", "+row=a/b"]`` -> ``{"method": "lora", "row": "a/b"}``."""
    out = {}
    for item in overrides:
        if "=" in item:
            key, value = item.split("=", 1)
            out[_normalise_key(key.strip())] = canon(value)
    return out


def _split_values(spec: Any) -> list[str]:
    """A basic-sweeper value list (``a,b,c``; YAML may have made it a number or a list)."""
    if isinstance(spec, (list, tuple)):
        return [str(v) for v in spec]
    text = str(spec)
    for prefix in ("choice(", "range("):
        if text.startswith(prefix):
            raise MoleConfigError(f"mole-report: sweep parameter {text!r}: only comma lists are laid out")
    return [v.strip() for v in text.split(",") if v.strip()]


def grid_axes(config: dict | None) -> dict[str, list[str]]:
    """The sweep's grid (``hydra.sweeper.params``) as ``{key: values}`` in file order, values in :func:`canon`'s spelling."""
    params = (((config or {}).get("hydra") or {}).get("sweeper") or {}).get("params") or {}
    return {_normalise_key(str(k)): [canon(v) for v in _split_values(spec)] for k, spec in params.items()}


def expected_grid(config: dict | None) -> list[dict[str, str]]:
    """Every job the sweep's grid asks for (the cartesian product of :func:`grid_axes`), as ``{key: value}``."""
    axes = grid_axes(config)
    if not axes:
        return []
    return [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*axes.values())]


def _fixed_values(config: dict | None, keys: set[str]) -> dict[str, str]:
    """Each of ``keys`` as the composed sweep config has it: a config group's choice or a dotted value."""
    hydra_cfg = (config or {}).get("hydra") or {}
    choices = (hydra_cfg.get("runtime") or {}).get("choices") or {}
    out = {}
    for key in keys:
        if key == "tasks":
            continue
        if choices.get(key) is not None:
            out[key] = canon(choices[key])
            continue
        node: Any = config or {}
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None and not isinstance(node, (dict, list)):
            out[key] = canon(node)
    return out


# ---------------------------------------------------------------------------------------------- layout


@dataclass
class Cell:
    """One table cell: the value and how many of its jobs contributed."""

    value: float | None = None
    std: float | None = None
    done: int = 0
    expected: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    hours: float | None = None

    def text(self, digits: int = 2) -> str:
        if self.value is None:
            if not self.statuses:
                return "missing"
            return "/".join(sorted(self.statuses))  # e.g. running, interrupted, failed, missing, no metric
        out = f"{self.value:.{digits}f}"
        if self.std is not None:
            out += f" ± {self.std:.{digits}f}"
        if self.done < self.expected:
            out += f" ({self.done}/{self.expected})"
        return out


def _job_value(row: JobRow, column: str, layout: PaperLayout) -> float | None:
    results = row.metrics.get("eval") or {}
    if layout.columns_by == "tasks":
        return headline(results.get(column), layout.metric)
    if column in results:
        return headline(results[column], layout.metric)
    # a job evaluated on several benchmarks (MoA: a domain's test sets): the mean of their headline metrics
    values = [headline(v, layout.metric) for v in results.values()]
    if not values or any(v is None for v in values):
        return None
    return statistics.fmean(values)


def _cell(jobs: list[tuple[dict[str, str], JobRow | None]], column: str, layout: PaperLayout) -> Cell:
    """Combine the jobs of one cell: best over ``best_over`` within each ``mean_over`` group, then the mean."""
    cell = Cell(expected=len(jobs))
    groups: dict[tuple, list[float]] = {}
    hours: list[float] = []
    for values, row in jobs:
        status = "missing" if row is None else row.status
        value = _job_value(row, column, layout) if row is not None and status == "finished" else None
        if status == "finished" and value is None:
            status = "no metric"
        if value is None:
            cell.statuses[status] = cell.statuses.get(status, 0) + 1
            continue
        cell.done += 1
        key = tuple(values.get(k) for k in layout.mean_over)
        groups.setdefault(key, []).append(value)
        if isinstance(row.metrics.get("wall_time_s"), (int, float)):
            hours.append(row.metrics["wall_time_s"] / 3600.0)
    if groups:
        per_group = [max(v) for v in groups.values()]  # best over best_over (a group of one: that value)
        cell.value = statistics.fmean(per_group) * layout.scale
        if layout.mean_over and len(per_group) > 1:
            cell.std = statistics.stdev(per_group) * layout.scale
    if hours:
        cell.hours = statistics.fmean(hours)
    return cell


def _label(mapping: dict[str, str], key: str) -> str:
    return mapping.get(key, key)


def build_table(layout: PaperLayout, config: dict | None, rows: list[JobRow]) -> dict[str, Any]:
    """The paper table: ordered row labels, column labels and cells, plus the paper's numbers."""
    found = [(overrides_dict(r.overrides), r) for r in rows]
    grid = expected_grid(config)
    grid_keys = list(grid[0]) if grid else []
    # keys that vary across the grid (or the found jobs) but are named nowhere in the layout make rows too
    varying = [k for k in grid_keys if len({g[k] for g in grid}) > 1]
    placed = set(layout.rows_by) | set(layout.best_over) | set(layout.mean_over) | {layout.columns_by}
    rows_by = list(layout.rows_by) + [k for k in varying if k not in placed]

    jobs: list[tuple[dict[str, str], JobRow | None]] = []
    matched: set[int] = set()
    for g in grid:
        hit = next((i for i, (ov, _) in enumerate(found) if i not in matched
                    and all(ov.get(k) == v for k, v in g.items())), None)
        if hit is not None:
            matched.add(hit)
        jobs.append((g, found[hit][1] if hit is not None else None))
    jobs += [found[i] for i in range(len(found)) if i not in matched]  # jobs outside the grid still show

    # a key the grid does not vary (e.g. data chosen in the sweep file's defaults) has the sweep's one value
    fixed = _fixed_values(config, set(layout.rows_by) | {layout.columns_by})
    jobs = [({**fixed, **values}, row) for values, row in jobs]

    def row_key(values: dict[str, str]) -> str:
        return ",".join(f"{k}={values.get(k, '')}" for k in rows_by)

    row_keys = list(dict.fromkeys(row_key(v) for v, _ in jobs))
    order = {k: i for i, k in enumerate(layout.row_labels)}
    first_seen = {k: i for i, k in enumerate(row_keys)}
    row_keys.sort(key=lambda k: (order.get(k.split(",")[0] if len(layout.rows_by) == 1 else k, len(order)), first_seen[k]))

    if layout.columns_by == "tasks":
        columns = list(dict.fromkeys(t for _, r in jobs if r is not None for t in (r.metrics.get("eval") or {})))
    else:
        columns = list(dict.fromkeys(v.get(layout.columns_by, "") for v, _ in jobs))
    corder = {k: i for i, k in enumerate(layout.column_labels)}
    col_seen = {c: i for i, c in enumerate(columns)}
    columns.sort(key=lambda c: (corder.get(c, len(corder)), col_seen[c]))

    table_rows = []
    for rk in row_keys:
        members = [(v, r) for v, r in jobs if row_key(v) == rk]
        cells = {}
        for col in columns:
            if layout.columns_by == "tasks":
                in_cell = members
            else:
                in_cell = [(v, r) for v, r in members if v.get(layout.columns_by, "") == col]
            cells[col] = _cell(in_cell, col, layout)
        values = [c.value for c in cells.values()]
        avg = statistics.fmean(values) if values and all(v is not None for v in values) else None
        finished = [r for _, r in members if r is not None and r.status == "finished"]
        extra: dict[str, float | None] = {}
        for name in layout.extra_columns:
            if name == "trainable_pct":
                extra[name] = next((r.metrics.get("trainable_percent") for r in finished
                                    if isinstance(r.metrics.get("trainable_percent"), (int, float))), None)
            elif name == "params":
                extra[name] = next((r.metrics["trainable_params"] / 1e6 for r in finished
                                    if isinstance(r.metrics.get("trainable_params"), (int, float))), None)
            elif name == "train_hours":
                hrs = [r.metrics["wall_time_s"] / 3600.0 for r in finished
                       if isinstance(r.metrics.get("wall_time_s"), (int, float))]
                extra[name] = statistics.fmean(hrs) if hrs else None
        first = members[0][0]
        base = ",".join(f"{k}={first.get(k, '')}" for k in layout.rows_by)
        more = ",".join(f"{k}={first.get(k, '')}" for k in rows_by[len(layout.rows_by):])
        label = _label(layout.row_labels, base) + (f" ({more})" if more else "")
        table_rows.append({"key": rk, "label": label, "cells": cells, "avg": avg, "extra": extra})
    return {"columns": columns, "rows": table_rows, "rows_by": rows_by}


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or value == "":
        return MISSING
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render(layout: PaperLayout, table: dict[str, Any]) -> tuple[str, str]:
    """Markdown and CSV of the paper table: each row of ours, then the paper's row beneath it."""
    columns = table["columns"]
    labels = [_label(layout.column_labels, c) for c in columns]
    extra_labels = [EXTRA_COLUMNS[e] for e in layout.extra_columns]
    header = ["", *labels] + ([AVG] if layout.average else []) + extra_labels
    md = [f"## {layout.title or 'Paper table'}", ""]
    if layout.source:
        md += [f"Source: {layout.source}. Rows marked *paper* are the paper's numbers; the others are this sweep's.", ""]
    md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    buf = io.StringIO()
    writer = csv.writer(buf)
    csv_header = ["row", "source", *labels] + ([AVG] if layout.average else []) + extra_labels
    csv_header += [f"{lab} std" for lab in labels] + [f"{lab} jobs" for lab in labels]
    writer.writerow(csv_header)
    for row in table["rows"]:
        cells = [row["cells"][c] for c in columns]
        ours = [c.text() for c in cells]
        avg = [_fmt(row["avg"])] if layout.average else []
        extra = [_fmt(row["extra"].get(e), 4 if e == "trainable_pct" else 2) for e in layout.extra_columns]
        md.append("| " + " | ".join([f"**{row['label']}**", *ours, *avg, *extra]) + " |")
        if layout.time_rows:
            md.append("| " + " | ".join([f"{row['label']} — Time (h)", *[_fmt(c.hours) for c in cells]]
                                        + ([MISSING] if layout.average else []) + [""] * len(extra)) + " |")
        reported = layout.reported.get(row["label"])
        if reported:
            paper = [_fmt(reported.get(lab)) for lab in labels]
            paper += [_fmt(reported.get(AVG))] if layout.average else []
            paper += [_fmt(reported.get(lab)) for lab in extra_labels]
            md.append("| " + " | ".join([f"*{row['label']} (paper)*", *paper]) + " |")
        writer.writerow([row["label"], "mole", *["" if c.value is None else round(c.value, 6) for c in cells]]
                        + (["" if row["avg"] is None else round(row["avg"], 6)] if layout.average else [])
                        + ["" if row["extra"].get(e) is None else row["extra"][e] for e in layout.extra_columns]
                        + ["" if c.std is None else round(c.std, 6) for c in cells]
                        + [f"{c.done}/{c.expected}" for c in cells])
        if reported:
            writer.writerow([row["label"], "paper", *[reported.get(lab, "") for lab in labels]]
                            + ([reported.get(AVG, "")] if layout.average else [])
                            + [reported.get(lab, "") for lab in extra_labels] + [""] * (2 * len(labels)))
    # paper rows the sweep has no row for (a label that matches none of ours) still appear
    ours_labels = {r["label"] for r in table["rows"]}
    for label, reported in layout.reported.items():
        if label not in ours_labels:
            paper = [_fmt(reported.get(lab)) for lab in labels] + ([_fmt(reported.get(AVG))] if layout.average else [])
            paper += [_fmt(reported.get(lab)) for lab in extra_labels]
            md.append("| " + " | ".join([f"*{label} (paper; no such row in this sweep)*", *paper]) + " |")
    if layout.notes:
        md += ["", f"Notes: {' '.join(str(layout.notes).split())}"]
    return "\n".join(md) + "\n", buf.getvalue()


def paper_report(root: Path, rows: list[JobRow]) -> tuple[str, str] | None:
    """Markdown and CSV of the sweep's paper table, or ``None`` for a sweep without a ``paper:`` block."""
    config = sweep_config(root, rows)
    if config is None:
        return None
    layout = PaperLayout.from_dict(config["paper"], f"{root}")
    return render(layout, build_table(layout, config, rows))
