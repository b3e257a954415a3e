"""The jobs of a paper-table sweep file (conf/sweep/<name>.yaml), composed as ``mole-train sweep=<name>`` runs them.

Hydra's basic sweeper runs the cartesian product of ``hydra.sweeper.params`` (comma lists); each job is
``train.yaml`` + ``sweep=<name>`` + that job's overrides. The grid is expanded by mole-report's own
reader (:func:`mole.report_paper.expected_grid`) and each job composed with Hydra's compose API
(``return_hydra_config=True``, so ``hydra.*`` resolves too).

Data and eval configs (``data=scienceqa``, ``eval=same_as_data``, ...) may be missing from a checkout: while one
is missing here, the shipped fixtures stand in for it (``stand_ins``), so the rest of the job still composes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from mole import CONF_DIR
from mole.config import register_resolvers
from mole.report_paper import canon_key, expected_grid, grid_axes

CONF = Path(CONF_DIR)
PENDING_GROUPS = ("data", "eval")  # groups whose configs may not exist yet on this branch


def sweep_file(name: str) -> dict:
    """The sweep file as plain YAML (no composition)."""
    return yaml.safe_load((CONF / "sweep" / f"{name}.yaml").read_text())


def grid(name: str) -> dict[str, list[str]]:
    """``hydra.sweeper.params`` split into value lists, in file order (mole-report's reading of the grid)."""
    return grid_axes(sweep_file(name))


def all_jobs(name: str) -> list[list[str]]:
    """Every job's overrides (``key=value``), the cartesian product of the grid."""
    return [[f"{k}={v}" for k, v in job.items()] for job in expected_grid(sweep_file(name))]


def covering_jobs(name: str) -> list[list[str]]:
    """A subset in which every value of every grid key occurs: job i takes each key's value i (cycling)."""
    g = grid(name)
    n = max(len(v) for v in g.values())
    return [[f"{k}={values[i % len(values)]}" for k, values in g.items()] for i in range(n)]


def sweep_defaults(name: str) -> dict[str, str]:
    """The groups the sweep file overrides in its defaults list, e.g. ``{"model": "llama2_7b"}``."""
    out = {}
    for entry in sweep_file(name).get("defaults", []):
        ((key, value),) = entry.items()
        out[key.removeprefix("override /")] = value
    return out


def config_exists(group: str, value: str) -> bool:
    return (CONF / group / f"{value}.yaml").is_file()


def stand_ins(name: str, overrides: list[str]) -> list[str]:
    """``overrides`` with a missing data/eval config (of the job or the sweep's defaults) replaced by fixtures."""
    out = []
    for o in overrides:
        key, value = o.split("=", 1)
        out.append(f"{key}=fixtures" if key in PENDING_GROUPS and not config_exists(key, value) else o)
    named = {o.split("=", 1)[0] for o in overrides}
    for group, value in sweep_defaults(name).items():
        if group in PENDING_GROUPS and group not in named and not config_exists(group, value):
            out.append(f"{group}=fixtures")
    return out


@contextmanager
def composer() -> Iterator[Callable[..., DictConfig]]:
    """``make(name, overrides, smoke=False)``: one job of sweep ``name`` (``debug=smoke`` when ``smoke``)."""
    register_resolvers()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):

        def make(name: str, overrides: list[str], smoke: bool = False, extra: tuple[str, ...] = ()) -> DictConfig:
            full = [f"sweep={name}", *stand_ins(name, overrides), *extra, *(["debug=smoke"] if smoke else [])]
            return compose(config_name="train", overrides=full, return_hydra_config=True)

        yield make


def job_dir(cfg: DictConfig, overrides: list[str]) -> Path:
    """The directory Hydra gives a job with these command-line + grid overrides (conf/train.yaml
    ``hydra.sweep.dir``/``subdir``: the overrides minus the excluded keys, sorted, joined by commas, ``/`` -> ``_``)."""
    exclude = set(cfg.hydra.job.config.override_dirname.exclude_keys)
    kept = sorted(o for o in overrides if o.split("=", 1)[0] not in exclude)
    return Path(cfg.hydra.sweep.dir) / (",".join(kept).replace("/", "_") or "default")


def check_paper_block(name: str) -> dict:
    """Structural checks of ``paper:`` shared by every sweep file; returns the block."""
    doc = sweep_file(name)
    assert doc["sweep_name"] == name
    assert doc["hydra"]["mode"] == "MULTIRUN"
    paper = doc["paper"]
    g = grid(name)
    for key in paper["rows_by"]:
        assert key in g, f"{name}: rows_by key {key} is not swept"
    # one label per row value of the grid (a single rows_by key here), and no label for anything else
    (row_key,) = paper["rows_by"]
    assert sorted(canon_key(k) for k in paper["row_labels"]) == sorted(f"{row_key}={v}" for v in g[row_key])
    assert len(set(paper["row_labels"].values())) == len(paper["row_labels"])
    if paper["columns_by"] == "data" and "data" in g:
        assert sorted(paper["column_labels"]) == sorted(g["data"])
    for label, cells in (paper.get("reported") or {}).items():
        assert label in paper["row_labels"].values(), f"{name}: reported row {label!r} has no row"
        for column, value in cells.items():
            assert isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            assert column in (*paper["column_labels"].values(), "Avg.", "Time (h)", "Param (M)"), column
    return paper


def assert_averages(paper: dict, tolerance: float) -> None:
    """Every reported row with all columns and an ``Avg.``: the mean of its columns is ``Avg.`` (to rounding)."""
    columns = list(paper["column_labels"].values())
    checked = 0
    for label, cells in paper["reported"].items():
        if "Avg." in cells and all(c in cells for c in columns):
            mean = sum(cells[c] for c in columns) / len(columns)
            assert abs(mean - cells["Avg."]) <= tolerance, (label, mean, cells["Avg."])
            checked += 1
    assert checked, "no complete row to check"


def compose_smoke(names: list[str], jobs_of: Callable[[str], list[list[str]]]) -> None:
    """Compose ``jobs_of(name)`` of each sweep with ``debug=smoke``: tiny_llama, two steps, valid trainer keys."""
    from mole.training.args import TrainArgs

    with composer() as make:
        for name in names:
            for job in jobs_of(name):
                cfg = make(name, job, smoke=True)
                assert cfg.model.name == "tiny_llama" and cfg.trainer.max_steps == 2
                TrainArgs.from_config(cfg.trainer)
