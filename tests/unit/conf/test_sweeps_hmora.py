"""HMoRA's tables as sweep files (conf/sweep/hmora_table*.yaml, conf/row/hmora_table*/).

The grid is expanded by mole-report's reader (``tests/sweep_jobs.py``); one test shows that the seed changes
nothing but ``seed``, and ``tests/integration/test_sweep_grids.py`` composes every job with ``debug=smoke``. The rows are checked through what they build: a row of token routing only builds no task router,
and each row's trainable share is the paper's TP column (Liao et al., ICLR 2025, Sec. 4, App. E.3-E.7).
Nothing is trained here: the smoke runs (``-m sweeps``) train.
"""

from __future__ import annotations

import math

import pytest
from omegaconf import OmegaConf
from sweep_jobs import all_jobs, composer, sweep_file

from mole.build import build_mole_model, parameter_report
from mole.training.args import TrainArgs

SWEEPS = ["hmora_table2", "hmora_table3", "hmora_table4", "hmora_table9", "hmora_table10", "hmora_table11",
          "hmora_table12"]
BENCH = ["MMLU", "MMLU-Pro", "ARC-C", "ARC-E", "OpenBook", "SWAG", "Comm"]
SEEDS = 5  # HMoRA reports the mean over five seeds
HYBRID = "mole.routers.HybridRouter"


def _as_dict(job: list[str]) -> dict[str, str]:
    return dict(o.split("=", 1) for o in job)


def _raw(name: str) -> dict:
    return sweep_file(name)


@pytest.fixture(scope="module")
def composed():
    """``composed(sweep)``: ``[(job overrides, full-size cfg), ...]`` for every seed-1 job of the sweep."""
    done = {}

    def jobs(name: str) -> list:
        if name not in done:
            with composer() as make:
                done[name] = [(_as_dict(job), make(name, job)) for job in all_jobs(name) if _as_dict(job)["seed"] == "1"]
        return done[name]

    return jobs


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


# ---- what the rows build (meta device: no weights) ----


def _router_kinds(cfg) -> set[tuple[str, ...]]:
    model, _, _ = build_mole_model(cfg, meta=True)
    return {tuple(m.kinds) for m in model.modules() if type(m).__name__ == "HybridRouter"}


def test_table2_rows_route_by_token_only(composed):
    # Table 2 compares token-level routers: eps 0, mu -2 put a_l below beta_low in every layer (eq. 8)
    for job, full in composed("hmora_table2"):
        assert full.router._target_ == HYBRID and _router_kinds(full) == {("token",)}, job["row"]


# ---- the rows reproduce the paper's TP column (meta device: no weights) ----


def _floor2(x: float) -> float:
    return math.floor(x * 100) / 100


@pytest.mark.parametrize("name", ["hmora_table3", "hmora_table10", "hmora_table11", "hmora_table12"])
def test_rows_give_the_papers_trainable_percent(name, composed):
    paper = _raw(name)["paper"]
    for job, full in composed(name):
        TrainArgs.from_config(full.trainer)  # the full-size job is valid, not only its smoke version
        model, _, rep = build_mole_model(full, meta=True)
        pct = parameter_report(model, rep)["percent"]
        label = paper["row_labels"][f"row={job['row']}"]
        # the paper mostly truncates to two decimals (HMoRA w LW's 3.909% -> 3.90), but LoRA r=8's 0.598% -> 0.60
        assert paper["reported"][label]["TP (%)"] in (_floor2(pct), round(pct, 2)), (name, label, pct)
