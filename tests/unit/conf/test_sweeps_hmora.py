"""HMoRA's tables as sweep files (conf/sweep/hmora_table*.yaml, conf/row/hmora_table*/).

The grid is expanded by mole-report's reader (``tests/sweep_jobs.py``); one test shows that the seed changes
nothing but ``seed``, and ``tests/integration/test_sweep_grids.py`` composes every job with ``debug=smoke``.
What the rows build (every row's trainable share against the paper's TP column, token-only routing in
Table 2) is checked in ``tests/integration/test_sweeps_hmora_rows.py``. Nothing is trained here: the smoke
runs (``-m sweeps``) train.
"""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf
from sweep_jobs import all_jobs, composer, sweep_file

SWEEPS = ["hmora_table2", "hmora_table3", "hmora_table4", "hmora_table9", "hmora_table10", "hmora_table11",
          "hmora_table12"]
BENCH = ["MMLU", "MMLU-Pro", "ARC-C", "ARC-E", "OpenBook", "SWAG", "Comm"]
SEEDS = 5  # HMoRA reports the mean over five seeds


def _as_dict(job: list[str]) -> dict[str, str]:
    return dict(o.split("=", 1) for o in job)


def _raw(name: str) -> dict:
    return sweep_file(name)


# ---- the sweep files themselves ----


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_file_is_a_multirun_named_after_itself(name):
    raw = _raw(name)
    assert raw["sweep_name"] == name and raw["hydra"]["mode"] == "MULTIRUN"


@pytest.mark.parametrize("name", SWEEPS)
def test_grid_is_every_row_label_times_five_seeds(name):
    paper = _raw(name)["paper"]
    jobs = [_as_dict(job) for job in all_jobs(name)]
    rows = {",".join(f"{k}={job[k]}" for k in paper["rows_by"]) for job in jobs}
    assert rows == set(paper["row_labels"])
    assert len(jobs) == SEEDS * len(rows) and len({job["seed"] for job in jobs}) == SEEDS
    assert paper["mean_over"] == ["seed"]


def test_the_seed_changes_nothing_but_seed():
    with composer() as make:
        one, five = (OmegaConf.to_container(make("hmora_table3", ["row=hmora_table3/hmora_lw", f"seed={s}"]))
                     for s in (1, 5))
    del one["hydra"], five["hydra"]  # Hydra's own record of the command line names the seed
    assert (one["seed"], five["seed"]) == (1, 5)
    one["seed"] = 5
    assert one == five


@pytest.mark.parametrize("name", SWEEPS)
def test_every_reported_row_has_a_row_and_its_average_is_the_mean(name):
    paper = _raw(name)["paper"]
    labels = list(paper["row_labels"].values())
    assert list(paper["reported"]) == labels  # every row, in the paper's order
    tp = "trainable_pct" in paper.get("extra_columns", [])
    for label in labels:
        row = paper["reported"][label]
        assert set(row) == set(BENCH) | {"Avg."} | ({"TP (%)"} if tp else set()), label
        # the transcription: the paper's average is the mean of its 7 columns (to its rounding)
        assert abs(sum(row[b] for b in BENCH) / 7 - row["Avg."]) < 0.01, label
    assert paper["columns_by"] == "tasks" and paper["average"] is True
