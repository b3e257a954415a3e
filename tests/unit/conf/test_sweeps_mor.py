"""MoR's Tables 2 and 3 as sweep files (conf/sweep/mor_table2_stage1.yaml, mor_table2.yaml, mor_table3.yaml).

Stage 2 is composed from stage 1 for a covering subset of jobs (every job under ``-m slow``; every job with
``debug=smoke``: ``tests/integration/test_sweep_grids.py``); the facts checked are the paper's (MoR Sec.
4.1-4.3, App. C): Llama-2-7B, lr 3e-4, batch 64 = 4 x 16, cutoff 256, epochs {10, 15, 20}.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sweep_jobs import (
    all_jobs,
    assert_averages,
    check_paper_block,
    composer,
    covering_jobs,
    grid,
    job_dir,
    sweep_defaults,
)

from mole.recipes.train import init_from_run
from mole.training.args import TrainArgs
from mole.utils.errors import MoleConfigError

SWEEPS = ["mor_table2_stage1", "mor_table2", "mor_table3"]
TASKS = ["scienceqa", "commonsenseqa", "openbookqa", "mrpc", "cola", "rte"]
METHODS = ["lora", "mola", "mola_mor", "mola_crw"]
ROUTERS = {  # _target_ and whether the sub-routers weigh equally (CRW: conf/router/crw.yaml over mor.yaml)
    "lora": ("mole.routers.no_router", None),
    "mola": ("mole.routers.TopKRouter", None),
    "mola_mor": ("mole.routers.MoRRouter", None),
    "mola_crw": ("mole.routers.MoRRouter", True),
}


def _router(cfg) -> tuple:
    return cfg.router._target_, cfg.router.get("equal_weights")


def _top_k(cfg) -> int:
    """The experts kept per token: a top-k router's own key, MoR/CRW's selection's."""
    return cfg.router.selection.top_k if "selection" in cfg.router else cfg.router.top_k


def test_grids_have_the_papers_table_sizes():
    assert grid("mor_table2_stage1") == {"method": METHODS}
    assert len(all_jobs("mor_table2_stage1")) == 4  # one instruction-tuning job per method
    assert grid("mor_table2") == {"method": METHODS, "data": TASKS, "trainer.epochs": ["10", "15", "20"]}
    assert len(all_jobs("mor_table2")) == len(METHODS) * len(TASKS) * 3
    g3 = grid("mor_table3")
    assert g3["data"] == TASKS and g3["trainer.epochs"] == ["10", "15", "20"]
    assert len(g3["row"]) == 4 and len(all_jobs("mor_table3")) == 72


def test_paper_blocks_and_reported_numbers():
    for name in SWEEPS:
        check_paper_block(name)
    for name in ["mor_table2", "mor_table3"]:
        paper = check_paper_block(name)
        assert paper["best_over"] == ["trainer.epochs"] and paper["scale"] == 100
        labels = list(paper["row_labels"].values())
        assert list(paper["reported"]) == labels  # a number for every row, in the paper's order
        for cells in paper["reported"].values():
            assert set(paper["column_labels"].values()) | {"Avg."} <= set(cells)
        assert_averages(paper, tolerance=0.006)  # the paper's Avg. is the mean of its six tasks
    t2 = check_paper_block("mor_table2")["reported"]
    assert t2["MoLA + CRW"] == {"SciQA": 93.21, "ComQA": 78.79, "OpenQA": 81.6, "MRPC": 85.39, "CoLA": 86.77,
                                "RTE": 88.45, "Avg.": 85.70}
    t3 = check_paper_block("mor_table3")
    assert t3["extra_columns"] == ["train_hours"]
    assert [cells["Time (h)"] for cells in t3["reported"].values()] == [11.79, 12.36, 12.55, 12.69]
    assert t3["reported"]["MoLA + MoR (r = 3)"]["SciQA"] == 93.30


def _check_table1_settings(cfg, epochs=None):
    """MoR App. C: the settings shared by Tables 1-3."""
    assert cfg.model.name == "llama2_7b"
    assert cfg.trainer.lr == 3e-4
    assert cfg.trainer.batch_size * cfg.trainer.grad_accum == 64 and cfg.trainer.batch_size == 4
    assert cfg.data.cutoff_len == 256
    assert cfg.trainer.max_steps is None
    if epochs is not None:
        assert cfg.trainer.epochs == epochs
    if cfg.get("adapter", {}).get("rank") is not None:
        assert (cfg.adapter.rank, cfg.adapter.alpha, cfg.adapter.dropout) == (8, 16, 0.05)
    assert list(cfg.experts.targets) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    TrainArgs.from_config(cfg.trainer)


def test_stage1_instruction_tunes_each_method_once():
    assert sweep_defaults("mor_table2_stage1") == {"model": "llama2_7b", "data": "mor_instruct", "eval": "none"}
    with composer() as make:
        for job in all_jobs("mor_table2_stage1"):
            cfg = make("mor_table2_stage1", job)
            _check_table1_settings(cfg, epochs=3)
            assert cfg.trainer.init_from is None
            assert cfg.method_name == job[0].split("=")[1]
            assert _router(cfg) == ROUTERS[cfg.method_name]


@pytest.mark.parametrize("jobs_of", [covering_jobs, pytest.param(all_jobs, marks=pytest.mark.slow)])
def test_stage2_starts_each_job_from_the_stage1_job_of_its_method(jobs_of):
    with composer() as make:
        for smoke in (False, True):
            stage1 = {}
            for job in all_jobs("mor_table2_stage1"):
                cfg1 = make("mor_table2_stage1", job, smoke=smoke)
                stage1[cfg1.method_name] = job_dir(cfg1, job)
            assert stage1["mola_crw"].name == "method=mola_crw"
            for job in jobs_of("mor_table2"):
                cfg = make("mor_table2", job, smoke=smoke)
                method = job[0].split("=")[1]
                assert cfg.method_name == method
                # the very directory Hydra gives stage 1's job of this method (under outputs/smoke/ with debug=smoke)
                assert Path(cfg.trainer.init_from) == stage1[method]
                assert ("/smoke/" in cfg.trainer.init_from) == smoke


def test_stage2_and_table3_rows():
    assert sweep_defaults("mor_table2") == {"model": "llama2_7b", "eval": "same_as_data"}
    assert sweep_defaults("mor_table3") == {"model": "llama2_7b", "eval": "same_as_data"}
    with composer() as make:
        for method in METHODS:
            cfg = make("mor_table2", [f"method={method}", "data=rte", "trainer.epochs=15"])
            _check_table1_settings(cfg, epochs=15)
            assert _router(cfg) == ROUTERS[method]
            if method == "lora":
                assert cfg.experts.num_experts == 1 and dict(cfg.loss) == {}
            else:  # MoLA 2-4-6-8, top-2, balance loss (on the main router for MoR)
                assert list(cfg.experts.groups) == [2, 4, 6, 8] and _top_k(cfg) == 2
                assert list(cfg.loss) == ["balance"]
            if method in ("mola_mor", "mola_crw"):
                assert cfg.router.n_routers == 2
        expected = {"mola": None, "mola_mor_r2": 2, "mola_mor_r3": 3, "mola_mor_r4": 4}
        for value in grid("mor_table3")["row"]:
            cfg = make("mor_table3", [f"row={value}", "data=cola", "trainer.epochs=20"])
            _check_table1_settings(cfg, epochs=20)
            n = expected[value.split("/")[1]]
            assert list(cfg.experts.groups) == [2, 4, 6, 8] and _top_k(cfg) == 2
            if n is None:
                assert cfg.method_name == "mola" and _router(cfg) == ROUTERS["mola"]
            else:
                assert cfg.method_name == "mola_mor" and _router(cfg) == ROUTERS["mola_mor"]
                assert cfg.router.n_routers == n and cfg.router.main_top_k is None


def test_missing_stage1_directory_is_a_clear_error(tmp_path):
    with composer() as make:
        job = ["method=mola_crw", "data=rte", "trainer.epochs=10"]
        cfg = make("mor_table2", job, extra=(f"paths.output_dir={tmp_path}",))
    missing = tmp_path / "sweeps" / "mor_table2_stage1" / "method=mola_crw"
    assert cfg.trainer.init_from == str(missing)
    expected = r"trainer\.init_from: .*mor_table2_stage1/method=mola_crw.* is not a directory"
    with pytest.raises(MoleConfigError, match=expected):
        init_from_run(None, cfg, cfg.trainer.init_from)  # refused before any model is touched
