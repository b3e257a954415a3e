"""What the rows of HMoRA's table sweeps build, every seed-1 job composed at full size (meta device: no weights).

A row of token routing only builds no task router (Table 2), and each row's trainable share is the paper's
TP column (Liao et al., ICLR 2025, Sec. 4, App. E.3-E.7). The sweep files themselves:
``tests/unit/conf/test_sweeps_hmora.py``.
"""

from __future__ import annotations

import math

import pytest
from sweep_jobs import all_jobs, composer, sweep_file

from mole.build import build_mole_model, parameter_report
from mole.training.args import TrainArgs

HYBRID = "mole.routers.HybridRouter"


def _as_dict(job: list[str]) -> dict[str, str]:
    return dict(o.split("=", 1) for o in job)


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
    paper = sweep_file(name)["paper"]
    for job, full in composed(name):
        TrainArgs.from_config(full.trainer)  # the full-size job is valid, not only its smoke version
        model, _, rep = build_mole_model(full, meta=True)
        pct = parameter_report(model, rep)["percent"]
        label = paper["row_labels"][f"row={job['row']}"]
        # the paper mostly truncates to two decimals (HMoRA w LW's 3.909% -> 3.90), but LoRA r=8's 0.598% -> 0.60
        assert paper["reported"][label]["TP (%)"] in (_floor2(pct), round(pct, 2)), (name, label, pct)
