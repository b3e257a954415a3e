"""MoA's Tables 1-5 as sweep files (conf/sweep/moa_table{1..5}.yaml).

Facts from MoA Sec. 4.3, 5 and App. B.1: Llama-3.1-8B, batch 32, cutoff 200 (commonsense) / 300 (math),
LoRA-based methods r=8 alpha=8 on q/k/v/o/up, 8 experts for the MoE baselines, LoRA alone r=16. Trainable
counts are hand-derived for Llama-3.1-8B (d = 4096, FFN width 14336, k/v width 1024, 32 heads, 32 layers)
on the meta device (no weights).
"""

from __future__ import annotations

import contextlib
import io

import pytest
from sweep_jobs import (
    all_jobs,
    check_paper_block,
    composer,
    config_exists,
    grid,
    stand_ins,
    sweep_defaults,
)

from mole.cli.params import run as params_run
from mole.training.args import TrainArgs

SWEEPS = ["moa_table1", "moa_table2", "moa_table3", "moa_table4", "moa_table5"]
Q5 = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]
T1_ROWS = ["lora", "molora", "hydralora", "mola", "adamole", "moa_soft", "moa_sparse"]
T3_ROWS = ["prompt", "parallel_adapter", "lora", "lora_sigmoid", "composition", "composition_softmax",
           "composition_sigmoid"]
T4_ROWS = ["fixed_0_2", "fixed_0_5", "fixed_0_8", "learned_0_2", "learned_0_5", "learned_0_8", "learned_1_0"]
T5_ROWS = ["soft_instance", "soft_token", "sparse_token"]
L = 32  # layers


def _lora(r: int) -> int:
    """r (d_in + d_out) for q 4096->4096, k/v 4096->1024, o 4096->4096, up 4096->14336 (one layer)."""
    return r * ((4096 + 4096) + 2 * (4096 + 1024) + (4096 + 4096) + (4096 + 14336))


PARALLEL = 2 * 16 * 4096  # d -> 16 -> d, no biases
PROMPT = 10 * 4096 + 32  # 10 prompts + one gate per head
ROUTER5 = 5 * 8 * 4096  # an 8-way router on each of the 5 Linears (all read 4096 features)
EXPECTED_T1 = {
    "lora": L * _lora(16),  # 23,068,672 = the paper's 23.06M
    "molora": L * (_lora(8 * 8) + ROUTER5),  # 8 experts r=8 ~ one r=64 LoRA
    "mola": L * (_lora(8 * 8) + ROUTER5),
    "hydralora": L * (8 * 5 * 4096 + 8 * 8 * (4096 + 1024 + 1024 + 4096 + 14336) + ROUTER5),  # shared A, 8 B
    "adamole": L * (_lora(8 * 8) + 5 * (8 * 4096 + 4096 + 1)),  # + a threshold Linear(d, 1) with bias each
    "moa_soft": L * (_lora(8) + PARALLEL + PROMPT + 7 * 4096),  # one 7-way router per layer
    "moa_sparse": L * (_lora(8) + PARALLEL + 6 * 4096 + 4096 + 1),  # 6-way router + threshold network
}
EXPECTED_T3 = {
    "prompt": L * PROMPT,
    "parallel_adapter": L * PARALLEL,
    "lora": L * _lora(8),
    "lora_sigmoid": L * (_lora(8) + 5 * 4096),
    "composition": L * (_lora(8) + PARALLEL + PROMPT),  # no router
    "composition_softmax": L * (_lora(8) + PARALLEL + PROMPT + 7 * 4096),
    "composition_sigmoid": EXPECTED_T1["moa_soft"],
}


def _trainable(sweep: str, row: str) -> int:
    with contextlib.redirect_stdout(io.StringIO()):
        return params_run([f"sweep={sweep}", *stand_ins(sweep, [f"row={sweep}/{row}"])])["trainable"]


def test_grids_have_the_papers_table_sizes():
    rows = lambda table, names: [f"{table}/{r}" for r in names]  # noqa: E731
    assert grid("moa_table1") == {"row": rows("moa_table1", T1_ROWS)}
    assert grid("moa_table2") == {"row": rows("moa_table1", T1_ROWS)}  # the same seven methods
    assert grid("moa_table3") == {"row": rows("moa_table3", T3_ROWS), "data": ["commonsense15k", "math14k"]}
    assert grid("moa_table4") == {"row": rows("moa_table4", T4_ROWS)}
    assert grid("moa_table5") == {"row": rows("moa_table5", T5_ROWS), "data": ["commonsense15k", "math14k"]}
    assert [len(all_jobs(n)) for n in SWEEPS] == [7, 7, 14, 7, 6]


def test_paper_blocks_and_reported_numbers():
    papers = {n: check_paper_block(n) for n in SWEEPS}
    for name in ["moa_table1", "moa_table2"]:
        paper = papers[name]
        assert paper["extra_columns"] == ["params"] and paper["columns_by"] == "tasks"
        params = {label: cells["Param (M)"] for label, cells in paper["reported"].items()}
        assert params == {"LoRA": 23.06, "MoLoRA": 100.14, "HydraLoRA": 45.09, "MoLA": 100.14, "AdaMoLE": 101.12,
                          "Soft MoA": 24.52, "Sparse MoA": 22.29}
    assert papers["moa_table1"]["reported"]["Sparse MoA"]["Avg."] == 84.62  # Sec. 4.4
    assert papers["moa_table2"]["reported"]["Soft MoA"]["Avg."] == 81.51
    assert papers["moa_table2"]["reported"]["Sparse MoA"]["Avg."] == 81.20
    assert len(papers["moa_table1"]["column_labels"]) == 8 and len(papers["moa_table2"]["column_labels"]) == 6
    for name in ["moa_table3", "moa_table4", "moa_table5"]:  # every row, every column
        paper = papers[name]
        assert list(paper["reported"]) == list(paper["row_labels"].values())
        for cells in paper["reported"].values():
            assert set(cells) == set(paper["column_labels"].values())
    t3 = papers["moa_table3"]["reported"]
    assert t3["Prompt-tuning"] == {"Commonsense": 78.03, "Math": 78.06}
    assert t3["Composition + Sigmoid R (Soft MoA)"] == {"Commonsense": 84.96, "Math": 81.51}
    # Sec. 5.1: Soft MoA over standalone LoRA +2.33 (math) and +1.72 (commonsense); LoRA + router +1.32 (math)
    assert round(t3["Composition + Sigmoid R (Soft MoA)"]["Math"] - t3["LoRA"]["Math"], 2) == 2.33
    assert round(t3["Composition + Sigmoid R (Soft MoA)"]["Commonsense"] - t3["LoRA"]["Commonsense"], 2) == 1.72
    assert round(t3["LoRA + Sigmoid R"]["Math"] - t3["LoRA"]["Math"], 2) == 1.32
    t4 = papers["moa_table4"]["reported"]
    assert [c["Math"] for c in t4.values()] == [81.22, 80.92, 78.58, 81.24, 81.51, 81.36, 80.61]
    t5 = papers["moa_table5"]["reported"]
    assert t5["Soft MoA (instance)"] == {"Commonsense15K": 73.18, "Math14K": 76.11}
    assert t5["Sparse MoA (token)"] == {"Commonsense15K": 84.62, "Math14K": 81.20}


def _check_training(cfg, cutoff):
    assert cfg.model.name == "llama3_1_8b"
    assert cfg.trainer.lr == pytest.approx(6e-3 * 32 / 256)  # the paper's 6e-3 as a base rate at batch 32
    assert cfg.trainer.batch_size * cfg.trainer.grad_accum == 32
    assert cfg.trainer.epochs == 2 and cfg.trainer.max_steps is None
    assert cfg.data.cutoff_len == cutoff
    TrainArgs.from_config(cfg.trainer)


def test_table1_and_table2_rows():
    assert sweep_defaults("moa_table1") == {"model": "llama3_1_8b", "data": "commonsense15k", "eval": "commonsense8"}
    assert sweep_defaults("moa_table2") == {"model": "llama3_1_8b", "data": "math14k", "eval": "math6"}
    with composer() as make:
        for table, cutoff in [("moa_table1", 200), ("moa_table2", 300)]:
            rows = {r: make(table, [f"row=moa_table1/{r}"]) for r in T1_ROWS}
            for cfg in rows.values():
                _check_training(cfg, cutoff)
            assert (rows["lora"].adapter.rank, rows["lora"].adapter.alpha) == (16, 8)
            for name in ["lora", "molora", "hydralora", "mola", "adamole"]:
                assert list(rows[name].experts.targets) == Q5
            for name in ["molora", "hydralora", "mola", "adamole"]:  # 8 experts r=8 alpha=8
                cfg = rows[name]
                assert (cfg.adapter.rank, cfg.adapter.alpha, cfg.experts.num_experts) == (8, 8, 8)
            assert rows["mola"].router._target_ == "mole.routers.TopKRouter" and rows["mola"].router.top_k == 2
            assert rows["hydralora"].adapter._target_ == "mole.adapters.HydraLoRAExperts"
            assert rows["adamole"].router.gate == "softmax" and rows["moa_sparse"].router.gate == "sigmoid"
            assert rows["moa_soft"].router._target_ == "mole.routers.SigmoidRouter"
            assert rows["moa_soft"].experts.placement == "layer" and rows["moa_sparse"].router.tau_max == 0.5


def test_table1_trainable_parameters():
    got = {row: _trainable("moa_table1", row) for row in T1_ROWS}
    assert got == EXPECTED_T1
    # LoRA r=16 as built against the sweep file's Param (M) column (the paper's 23.06M, truncated)
    reported = check_paper_block("moa_table1")["reported"]["LoRA"]["Param (M)"]
    assert 0 <= got["lora"] / 1e6 - reported < 0.01


def test_table3_rows_and_parameters():
    got = {row: _trainable("moa_table3", row) for row in T3_ROWS}
    assert got == EXPECTED_T3
    with composer() as make:
        rows = {r: make("moa_table3", [f"row=moa_table3/{r}", "data=math14k"]) for r in T3_ROWS}
    assert rows["composition"].router._target_ == "mole.routers.no_router"
    assert rows["composition_softmax"].router._target_ == "mole.routers.SoftRouter"
    assert rows["composition_softmax"].experts.placement == "layer"
    assert rows["lora_sigmoid"].adapter.blocks == {"parallel_adapter": None, "prompt": None}
    assert rows["prompt"].adapter.layers is None and rows["prompt"].adapter.length == 10


def test_table4_rows():
    assert sweep_defaults("moa_table4") == {"model": "llama3_1_8b", "data": "math14k", "eval": "math6"}
    with composer() as make:
        for row in T4_ROWS:
            cfg = make("moa_table4", [f"row=moa_table4/{row}"])
            _check_training(cfg, 300)
            kind, value = row.split("_", 1)
            assert cfg.method_name == "moa_sparse" and cfg.router.gate == "sigmoid"
            assert cfg.router.tau_max == float(value.replace("_", "."))
            assert cfg.router.learnable is (kind == "learned")
    # the fixed threshold has no threshold network (w, b: 4096 + 1 per layer)
    assert _trainable("moa_table4", "fixed_0_5") == EXPECTED_T1["moa_sparse"] - L * 4097


def test_table5_rows():
    with composer() as make:
        rows = {r: make("moa_table5", [f"row=moa_table5/{r}", "data=commonsense15k"]) for r in T5_ROWS}
    assert [rows[r].experts.level for r in T5_ROWS] == ["instance", "token", "token"]
    assert [rows[r].method_name for r in T5_ROWS] == ["moa_soft", "moa_soft", "moa_sparse"]


@pytest.mark.parametrize("name", ["moa_table3", "moa_table5"])
def test_the_cutoff_follows_the_data_set(name):
    """Tables 3 and 5 train on both data sets: 200 tokens for Commonsense15K, 300 for Math14K (MoA Sec. 4.3)."""
    with composer() as make:
        for data, cutoff in [("commonsense15k", 200), ("math14k", 300)]:
            job = [f"row={grid(name)['row'][0]}", f"data={data}"]
            extra = () if config_exists("data", data) else (f"data.name={data}",)  # the fixtures stand in
            _check_training(make(name, job, extra=extra), cutoff)
        assert make(name, [f"row={grid(name)['row'][0]}", "data=fixtures"]).data.cutoff_len == 256


