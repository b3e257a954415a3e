"""Every job of every paper-table sweep (conf/sweep/*.yaml) composes with ``debug=smoke``: the whole grids.

The per-paper files in ``tests/unit/conf/`` compose a covering subset (every value of every grid key once);
here every combination is composed and its trainer config validated (``tests/sweep_jobs.py``), but for the
seed: a sweep over seeds is composed with its first seed only (that the seed changes nothing but ``seed`` is
``tests/unit/conf/test_sweeps_hmora.py``'s test).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sweep_jobs import all_jobs, compose_smoke, grid

from mole import CONF_DIR

SWEEPS = sorted(p.stem for p in (Path(CONF_DIR) / "sweep").glob("*.yaml"))


def test_the_sweep_files_are_found():
    assert len(SWEEPS) >= 20 and "hmora_table3" in SWEEPS


def _jobs_of_the_first_seed(name: str) -> list[list[str]]:
    seed = grid(name).get("seed", [None])[0]
    return [job for job in all_jobs(name) if seed is None or f"seed={seed}" in job]


@pytest.mark.parametrize("name", SWEEPS)
def test_every_job_composes_in_smoke_mode(name):
    compose_smoke([name], _jobs_of_the_first_seed)
