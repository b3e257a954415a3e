"""DynMoLE's Table 1 and Figure 4 ablations as sweep files (conf/sweep/dynmole_table1.yaml, dynmole_figure4_*.yaml).

Facts from DynMoLE Sec. 5.1-5.3 and App. A.4 (Table 3): Llama-2-7B, lr 2e-4, batch 16 with 8 accumulation
steps, cutoff 512, dropout 0.05, 2 epochs, everything on gate/up/down; trainable counts are hand-derived for
Llama-2-7B (d = 4096, FFN width 11008, 32 layers) on the meta device. Every job composes with ``debug=smoke``:
``tests/integration/test_sweep_grids.py``.
"""

from __future__ import annotations

import contextlib
import io

import pytest
from sweep_jobs import (
    all_jobs,
    assert_averages,
    check_paper_block,
    composer,
    grid,
    stand_ins,
    sweep_defaults,
    sweep_file,
)

from mole.cli.params import run as params_run
from mole.training.args import TrainArgs

TASKS9 = ["rte", "arc_e", "arc_c", "boolq", "openbookqa", "piqa", "siqa", "hellaswag", "winogrande"]
ABLATION_TASKS = ["arc_e", "arc_c", "openbookqa", "boolq", "piqa"]  # Sec. 5.3: ARC, OpenBookQA, BoolQ, PIQA
FIGURE4 = {  # sweep -> (swept key, values)
    "dynmole_figure4_beta": ("loss.tsallis.weight", [0.0, 1e-4, 1e-3, 1e-2, 1e-1]),
    "dynmole_figure4_q": ("router.q", [1.0, 1.1, 1.2, 1.3, 1.4]),
    "dynmole_figure4_threshold": ("router.threshold", [0.7, 0.75, 0.8, 0.85, 0.9, 0.95]),
    "dynmole_figure4_top_p": ("router.top_p", [0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]),
    "dynmole_figure4_keep_top_k": ("router.keep_top_k", [1, 2, 3, 4]),
}
SWEEPS = ["dynmole_table1", *FIGURE4]
FFN = ["gate_proj", "up_proj", "down_proj"]
ROWS = ["lora", "dora", "loramoe", "mola", "dynmole_topp", "dynmole_no_entropy", "dynmole"]


def _lora(r: int) -> int:
    """One rank-r LoRA on gate/up/down of every layer: r (d_in + d_out) per Linear, 4096 <-> 11008."""
    return 32 * 3 * r * (4096 + 11008)


ROUTERS_6 = 32 * 6 * (4096 + 4096 + 11008)  # a 6-way router per FFN Linear (reading 4096, 4096, 11008 features)
DORA_MAGNITUDES = 32 * (11008 + 11008 + 4096)  # DoRA's m: one per output column


def test_grids_have_the_papers_sizes():
    assert grid("dynmole_table1") == {"row": [f"dynmole_table1/{r}" for r in ROWS], "data": TASKS9}
    assert len(all_jobs("dynmole_table1")) == len(ROWS) * len(TASKS9)
    sizes = {name: len(all_jobs(name)) for name in FIGURE4}
    assert sizes == {"dynmole_figure4_beta": 25, "dynmole_figure4_q": 25, "dynmole_figure4_threshold": 30,
                     "dynmole_figure4_top_p": 40, "dynmole_figure4_keep_top_k": 20}
    for name, (key, values) in FIGURE4.items():
        g = grid(name)
        assert list(g) == [key, "data"] and g["data"] == ABLATION_TASKS
        assert [float(v) for v in g[key]] == values


def test_paper_blocks():
    for name in SWEEPS:
        check_paper_block(name)
    t1 = check_paper_block("dynmole_table1")
    assert list(t1["reported"]) == list(t1["row_labels"].values())  # every row, in the paper's order
    for cells in t1["reported"].values():
        assert list(cells) == [*t1["column_labels"].values(), "Avg."]
    assert_averages(t1, tolerance=0.051)  # one decimal in the paper
    assert t1["reported"]["DynMoLE"]["RTE"] == 80.1 and t1["reported"]["DoRA"]["SIQA"] == 74.1
    assert t1["reported"]["DynMoLE (-)"] == {"RTE": 69.0, "ARC-e": 76.8, "ARC-c": 54.9, "BoolQ": 73.5, "OBQA": 78.0,
                                              "PIQA": 81.9, "SIQA": 78.1, "HellaS": 93.2, "WinoG": 76.7, "Avg.": 75.8}
    for name in FIGURE4:  # a plot without numbers: nothing reported, and the notes say so
        paper = sweep_file(name)["paper"]
        assert "reported" not in paper and "no numbers" in paper["notes"]


def _check_training(cfg):
    assert cfg.model.name == "llama2_7b"
    assert cfg.trainer.lr == 2e-4 and cfg.trainer.epochs == 2 and cfg.trainer.max_steps is None
    assert cfg.trainer.batch_size * cfg.trainer.grad_accum == 16 and cfg.trainer.grad_accum == 8
    assert cfg.data.cutoff_len == 512
    assert cfg.adapter.dropout == 0.05
    assert list(cfg.experts.targets) == FFN
    TrainArgs.from_config(cfg.trainer)


def test_table1_rows():
    assert sweep_defaults("dynmole_table1") == {"model": "llama2_7b", "eval": "same_as_data"}
    with composer() as make:
        rows = {r: make("dynmole_table1", [f"row=dynmole_table1/{r}", "data=piqa"]) for r in ROWS}
    for cfg in rows.values():
        _check_training(cfg)
    lora, dora = rows["lora"], rows["dora"]
    assert (lora.adapter.rank, lora.adapter.alpha, lora.experts.num_experts) == (80, 160, 1)
    assert lora.router._target_ == "mole.routers.no_router" and dict(lora.loss) == {}
    assert dora.adapter._target_ == "mole.adapters.DoRAExpert" and (dora.adapter.rank, dora.adapter.alpha) == (80, 160)
    for name in ["loramoe", "mola", "dynmole_topp", "dynmole_no_entropy", "dynmole"]:
        cfg = rows[name]
        assert (cfg.adapter.rank, cfg.adapter.alpha) == (24, 48)
        assert cfg.experts.num_experts == 6 and cfg.experts.groups is None
    assert rows["loramoe"].router._target_ == "mole.routers.SoftRouter" and dict(rows["loramoe"].loss) == {}
    mola = rows["mola"]
    assert mola.router._target_ == "mole.routers.TopKRouter" and mola.router.top_k == 2
    assert list(mola.loss) == ["balance"]
    topp = rows["dynmole_topp"]  # Sec. 5.2: no soft switch, no entropy loss, keep-top-k 1
    assert topp.router._target_ == "mole.routers.TopPRouter" and list(topp.loss) == ["balance"]
    assert (topp.router.top_p, topp.router.keep_top_k) == (0.75, 1)
    for name in ["dynmole_no_entropy", "dynmole"]:
        r = rows[name].router
        assert r._target_ == "mole.routers.DynamicRouter"
        assert (r.q, r.threshold, r.top_p, r.keep_top_k) == (1.1, 0.9, 0.75, 2)
    assert list(rows["dynmole_no_entropy"].loss) == ["balance"]
    full = rows["dynmole"].loss
    assert list(full) == ["balance", "tsallis"] and full.tsallis.weight == 0.01 and full.tsallis.q == 1.1


def _trainable(row: str) -> int:
    overrides = stand_ins("dynmole_table1", [f"row=dynmole_table1/{row}", "data=rte"])
    with contextlib.redirect_stdout(io.StringIO()):
        return params_run(["sweep=dynmole_table1", *overrides])["trainable"]


def test_trainable_parameters_are_the_papers_3_percent():
    # Sec. 5.1: the MoE methods ~200M (3%) trainable; 6 experts r=24 on gate/up/down + their routers
    moe = _lora(6 * 24) + ROUTERS_6
    for row in ["loramoe", "mola", "dynmole"]:
        assert _trainable(row) == moe
    assert _trainable("lora") == _lora(80)
    assert _trainable("dora") == _lora(80) + DORA_MAGNITUDES


@pytest.mark.parametrize("name", list(FIGURE4))
def test_figure4_sweeps_vary_only_their_key(name):
    key, values = FIGURE4[name]
    assert sweep_defaults(name) == {"model": "llama2_7b", "eval": "same_as_data", "method": "dynmole"}
    with composer() as make:
        for value, raw in zip(values, grid(name)[key], strict=True):
            cfg = make(name, [f"{key}={raw}", "data=boolq"])
            _check_training(cfg)
            assert cfg.method_name == "dynmole" and cfg.router._target_ == "mole.routers.DynamicRouter"
            assert (cfg.adapter.rank, cfg.experts.num_experts) == (24, 6)
            settings = {"loss.tsallis.weight": cfg.loss.tsallis.weight, "router.q": cfg.router.q,
                        "router.threshold": cfg.router.threshold, "router.top_p": cfg.router.top_p,
                        "router.keep_top_k": cfg.router.keep_top_k}
            defaults = {"loss.tsallis.weight": 0.01, "router.q": 1.1, "router.threshold": 0.9,
                        "router.top_p": 0.75, "router.keep_top_k": 2}
            assert settings == {**defaults, key: value}
            assert cfg.loss.tsallis.q == cfg.router.q  # the entropy loss uses the routing q
            assert list(cfg.loss) == ["balance", "tsallis"] and cfg.loss.balance.weight == 0.01
