"""mole-analyze: routing statistics on hand-made gates, HMoRA's main expert pairs, end to end on tiny_llama."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import compose_tiny

from mole.analysis.collect import ModuleKey, RoutingCollector
from mole.analysis.data import task_records
from mole.analysis.run import analyze_run, loss_curves, read_curve, smooth
from mole.analysis.stats import GateStats, main_expert_pairs
from mole.routers.base import BalanceStats, GateDist, RouterOutput
from mole.utils.errors import MoleConfigError

LN2, LN4 = math.log(2), math.log(4)

# ---- statistics on hand-made gates ----

GATES = torch.tensor([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])


def test_gate_stats_counts_average_and_entropies_by_hand():
    s = GateStats(4)
    s.update(GATES, GATES > 0)
    summ = s.summary()
    assert summ["activation_counts"] == [3, 2, 1, 1]
    assert summ["avg_active_experts"] == pytest.approx(7 / 3)  # (2 + 1 + 4) / 3
    # mean g = (7/12, 3/12, 1/12, 1/12)
    balance = -(7 / 12 * math.log(7 / 12) + 0.25 * math.log(0.25) + 2 / 12 * math.log(1 / 12))
    assert summ["balance_entropy"] == pytest.approx(balance, abs=1e-6)
    assert summ["certainty_entropy"] == pytest.approx((LN2 + 0 + LN4) / 3, abs=1e-6)
    assert summ["max_entropy"] == pytest.approx(LN4, abs=1e-6)
    assert summ["activation_share"] == pytest.approx([3 / 7, 2 / 7, 1 / 7, 1 / 7], abs=1e-6)


def test_gate_stats_stream_in_batches_equals_one_pass():
    one, two = GateStats(4), GateStats(4)
    one.update(GATES, GATES > 0)
    two.update(GATES[:1], GATES[:1] > 0)
    two.update(GATES[1:], GATES[1:] > 0)
    assert one.summary() == two.summary()


def test_soft_routing_counts_every_expert_and_unnormalised_rows_are_normalised():
    s = GateStats(2)
    s.update(torch.tensor([[0.9, 0.1], [0.2, 0.2], [0.0, 0.0]]), None)  # selected None: all active
    summ = s.summary()
    assert summ["activation_counts"] == [3, 3] and summ["avg_active_experts"] == 2.0
    # rows normalised: (0.9, 0.1), (0.5, 0.5), zeros (entropy 0)
    h1 = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    assert summ["certainty_entropy"] == pytest.approx((h1 + LN2 + 0) / 3, abs=1e-6)
    # mean of the normalised rows: (1.4/3, 0.6/3), renormalised to (0.7, 0.3)
    assert summ["balance_entropy"] == pytest.approx(-(0.7 * math.log(0.7) + 0.3 * math.log(0.3)), abs=1e-6)


def test_collector_leaves_padding_out():
    """Two sequences of 3 token slots, the last slot of the second is padding with a gate that would show."""
    gates = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = RouterOutput(gates=gates, probs=gates, selected=gates > 0, balance=[BalanceStats(gates, gates > 0, 1)])
    key = ModuleKey(0, "self_attn.q_proj", 0)
    col = RoutingCollector(max_points=10)
    col.add_batch({key: [out]}, mask, ["a", "b"])
    res = col.result()
    assert res["tokens"] == 5 and res["tasks"] == {"a": 1, "b": 1}
    mod = res["modules"][0]
    assert mod["activation_counts"] == [3, 2]  # the padded (0, 1) row is not counted
    assert mod["certainty_entropy"] == 0.0
    assert mod["balance_entropy"] == pytest.approx(-(0.6 * math.log(0.6) + 0.4 * math.log(0.4)), abs=1e-6)
    # t-SNE source: the only module; per-sequence means over real tokens
    assert torch.allclose(col.points.vectors, torch.tensor([[2 / 3, 1 / 3], [0.5, 0.5]]))
    assert col.points.labels == ["a", "b"]


# ---- HMoRA's main expert pairs (Appendix E.8, Tables 13-16) ----


def test_main_expert_pairs_tables_by_hand():
    pairs = {
        "A": Counter({(3, 6): 8, (2, 7): 2}),  # MEP (3, 6), 0.8
        "B": Counter({(3, 6): 10}),  # (3, 6), 1.0
        "C": Counter({(0, 4): 3, (1, 2): 3, (5, 6): 4}),  # (5, 6), 0.4
        "D": Counter({(0, 4): 7, (3, 6): 3}),  # (0, 4), 0.7
    }
    res = main_expert_pairs(pairs, 8)
    assert res["per_task"]["A"] == {"main_pair": [3, 6], "proportion": 0.8, "samples": 10}
    assert res["per_task"]["C"]["main_pair"] == [5, 6] and res["per_task"]["C"]["proportion"] == 0.4
    assert res["per_task"]["D"]["main_pair"] == [0, 4] and res["per_task"]["D"]["proportion"] == 0.7
    # Table 14: share of tasks with MEP proportion >= threshold
    assert res["thresholds"] == {"0.7": 0.75, "0.8": 0.5, "0.9": 0.25, "1": 0.25}
    # Tables 15-16: per main pair, tasks and recognised (>= 0.8) tasks
    assert res["pairs"] == [
        {"main_pair": [3, 6], "tasks": 2, "recognised": 2, "ratio": 1.0},
        {"main_pair": [0, 4], "tasks": 1, "recognised": 0, "ratio": 0.0},
        {"main_pair": [5, 6], "tasks": 1, "recognised": 0, "ratio": 0.0},
        {"main_pair": "All", "tasks": 4, "recognised": 2, "ratio": 0.5},
    ]
    # Table 13: activations per expert / all activations (40 samples x 2 experts)
    assert res["expert_share"] == pytest.approx([12.5, 3.75, 6.25, 26.25, 12.5, 5.0, 31.25, 2.5])


def test_main_expert_pair_tie_takes_the_smallest_pair():
    res = main_expert_pairs({"E": Counter({(1, 2): 2, (0, 5): 2})}, 6)
    assert res["per_task"]["E"] == {"main_pair": [0, 5], "proportion": 0.5, "samples": 4}


def test_collector_counts_task_router_pairs_per_task():
    """A hybrid-style output: the task router's selection is its sequence-level balance decision."""
    p_task = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.4, 0.4, 0.1, 0.1], [0.1, 0.1, 0.3, 0.5]])  # (B=3, E=4)
    s_task = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1]]).bool()
    t = 2
    gates = p_task.repeat_interleave(t, dim=0)
    out = RouterOutput(gates=gates, probs=gates, selected=s_task.repeat_interleave(t, dim=0),
                       balance=[BalanceStats(p_task, s_task, 2, "sequence")], dists=[GateDist(p_task, "task", "sequence")])
    col = RoutingCollector()
    col.add_batch({ModuleKey(3, "mlp.down_proj", 0): [out]}, torch.ones(3, t, dtype=torch.long), ["x", "x", "y"])
    res = col.result()
    (tr,) = res["task_routers"]
    assert tr["per_task"] == {"x": {"main_pair": [0, 1], "proportion": 1.0, "samples": 2},
                              "y": {"main_pair": [2, 3], "proportion": 1.0, "samples": 1}}
    task_router = res["modules"][0]["routers"][0]
    assert task_router["kind"] == "task" and task_router["rows"] == 3 and task_router["activation_counts"] == [2, 2, 1, 1]
    assert col.tsne_source[1] == 0 and col.points.vectors.shape == (3, 4)  # the task router's rows


# ---- end to end on tiny_llama ----


def _train(name: str, root: Path, *overrides: str) -> Path:
    from mole.pipeline import run_train

    run_dir = root / name
    run_train(compose_tiny(overrides), run_dir)
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis_runs")
    return {m: _train(m, root, f"method={m}") for m in ("mola", "hmora", "lora")}


def _val_token_count(run_dir: Path) -> tuple[int, int]:
    """Real tokens and sequences of the run's validation records, counted without mole.analysis."""
    from mole.data import encode_records, load_datasets
    from mole.model.tokenizer import byte_tokenizer
    from mole.pipeline import load_run_config

    cfg = load_run_config(run_dir)
    _, val = load_datasets(cfg.data, seed=cfg.seed)
    enc = encode_records(val, byte_tokenizer(), cfg.data.cutoff_len, cfg.data.template)
    return sum(len(e["input_ids"]) for e in enc), len(enc)


def test_analyze_mola_counts_sum_to_tokens_times_top_k(runs, tmp_path):
    res = analyze_run(runs["mola"], out=tmp_path / "a", batch_size=5)
    tokens, seqs = _val_token_count(runs["mola"])
    assert res["tokens"] == tokens and res["sequences"] == seqs
    assert [layer["num_experts"] for layer in res["layers"]] == [2, 4, 6, 8]  # MoLA 2-4-6-8
    assert len(res["modules"]) == 4 * 7
    for mod in res["modules"]:
        assert mod["rows"] == tokens
        assert sum(mod["activation_counts"]) == tokens * 2  # top-2
        assert mod["avg_active_experts"] == 2.0
        assert 0.0 <= mod["certainty_entropy"] <= mod["max_entropy"] + 1e-6
        assert 0.0 <= mod["balance_entropy"] <= mod["max_entropy"] + 1e-6
    for layer in res["layers"]:
        assert sum(layer["activation_counts"]) == 7 * tokens * 2
    assert res["task_routers"] == []
    assert not (tmp_path / "a" / "task_pairs.md").exists()
    for name in ("analysis.json", "activation_counts.png", "entropy.png", "active_experts.png", "tsne.png"):
        assert (tmp_path / "a" / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert saved["layers"] == res["layers"]
    # t-SNE: every sequence (fewer than max_points), labelled by the fixture file it came from
    assert len(saved["tsne"]["embedding"]) == seqs and set(saved["tsne"]["labels"]) <= {"mc_train", "yesno_train"}


def test_analyze_hmora_task_routers_and_main_pairs(runs, tmp_path):
    res = analyze_run(runs["hmora"], out=tmp_path / "h", figures=False, max_points=5)
    tokens, seqs = _val_token_count(runs["hmora"])
    # a_l = sigmoid(-4 + 8 l / 3 - 2) for l = 0..3: 0.0025, 0.034 (token only), 0.34 (both), 0.88 (task only)
    kinds = {layer: set() for layer in range(4)}
    for mod in res["modules"]:
        kinds[mod["layer"]] |= {r["kind"] for r in mod["routers"]}
        sums = sum(mod["activation_counts"])
        if mod["layer"] == 2:  # both routers' top-2 sets: 2 to 4 experts per token
            assert 2 * tokens <= sums <= 4 * tokens and 2.0 <= mod["avg_active_experts"] <= 4.0
        else:
            assert sums == 2 * tokens
    assert kinds == {0: {"token"}, 1: {"token"}, 2: {"token", "task"}, 3: {"task"}}
    assert len(res["task_routers"]) == 14  # 7 modules in layers 2 and 3
    for tr in res["task_routers"]:
        assert sum(v["samples"] for v in tr["per_task"].values()) == seqs
        assert all(len(v["main_pair"]) == 2 for v in tr["per_task"].values())
        th = list(tr["thresholds"].values())
        assert th == sorted(th, reverse=True)
        assert sum(tr["expert_share"]) == pytest.approx(100.0, abs=1e-3)
    task_rows = [r for m in res["modules"] for r in m["routers"] if r["kind"] == "task"]
    assert all(r["rows"] == seqs and sum(r["activation_counts"]) == 2 * seqs for r in task_rows)
    assert res["tsne"]["layer"] == 3 and len(res["tsne"]["vectors"]) == 5 and res["tsne"]["sequences_seen"] == seqs
    md = (tmp_path / "h" / "task_pairs.md").read_text()
    assert "| main expert pair | tasks | recognised | ratio |" in md and "mc_train" in md


@pytest.mark.parametrize("method", ["moa_sparse", "hmora_lw", "mola_mor", "dynmole", "adamole", "mixlora"])
def test_every_router_kind_gives_consistent_statistics(method, tmp_path):
    run_dir = _train(method, tmp_path, f"method={method}")
    res = analyze_run(run_dir, out=tmp_path / "out", figures=False, per_task=3)
    assert res["tasks"] == {"mc_train": 3, "yesno_train": 3}  # the 12 held-out records: 8 mc, 4 yesno
    assert res["modules"]
    for mod in res["modules"]:
        assert sum(mod["activation_counts"]) == pytest.approx(mod["avg_active_experts"] * mod["rows"], abs=1e-3)
        assert 0.0 <= mod["avg_active_experts"] <= mod["num_experts"]
    if method == "moa_sparse":  # one router per layer over the LoRA experts and the parallel adapter
        assert {m["module"] for m in res["modules"]} == {"mole_layer_router"}
        assert all(m["num_experts"] == 6 for m in res["modules"])


def test_per_task_limit_and_data_override(runs, tmp_path):
    from omegaconf import OmegaConf

    from mole.pipeline import load_run_config

    data = load_run_config(runs["mola"]).data
    data = OmegaConf.merge(data, {"val_size": 0})
    with pytest.raises(MoleConfigError, match="split=train"):
        task_records(data, seed=0)
    recs = task_records(data, seed=0, split="train", per_task=4)
    assert Counter(r["task"] for r in recs) == {"mc_train": 4, "yesno_train": 4}


def test_validation_split_matches_training(runs):
    from mole.data import load_datasets
    from mole.data.sources import read_records
    from mole.pipeline import load_run_config

    cfg = load_run_config(runs["mola"])
    _, val = load_datasets(cfg.data, seed=cfg.seed)
    tagged = task_records(cfg.data, seed=cfg.seed)
    assert [{k: v for k, v in r.items() if k != "task"} for r in tagged] == val
    for r in tagged:  # each record is in the file its task names
        path = next(p for p in cfg.data.path if Path(p).stem == r["task"])
        assert {k: v for k, v in r.items() if k != "task"} in read_records(path)


# ---- loss curves ----


def test_smooth_is_a_trailing_moving_average():
    assert smooth([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    assert smooth([1.0, 2.0], 1) == [1.0, 2.0]


def test_loss_curves_of_two_runs(runs, tmp_path):
    label, steps, values = read_curve(runs["mola"])
    metrics = json.loads((runs["mola"] / "metrics.json").read_text())
    assert label == "mola" and steps == [1, 2] and values == [h["loss"] for h in metrics["train_loss"]]
    assert read_curve(runs["lora"], "lm_loss")[2] == [h["lm_loss"] for h in json.loads((runs["lora"] / "metrics.json").read_text())["train_loss"]]
    out = loss_curves([runs["mola"], runs["lora"]], tmp_path / "curves.png")
    assert out.stat().st_size > 0
    with pytest.raises(MoleConfigError, match="metrics.json not found"):
        loss_curves([tmp_path], tmp_path / "x.png")


# ---- the command ----


def _cli(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "mole.cli.analyze", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_analyze_and_curves(runs, tmp_path):
    proc = _cli(str(runs["hmora"]), "data=fixtures", "data.val_size=6", f"out={tmp_path / 'o'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = json.loads((tmp_path / "o" / "analysis.json").read_text())
    assert saved["sequences"] == 6 and saved["data"]["name"] == "fixtures"
    assert (tmp_path / "o" / "tsne.png").is_file() and (tmp_path / "o" / "task_pairs.md").is_file()
    proc = _cli("curves", str(runs["mola"]), str(runs["hmora"]), "out=loss.png", "key=lm_loss", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "loss.png").stat().st_size > 0


def test_cli_run_without_routers_is_one_line(runs, tmp_path):
    proc = _cli(str(runs["lora"]), cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mole-analyze: error:") and "no routers" in lines[0]
    assert "curves" in lines[0] and not (runs["lora"] / "analysis").exists()


@pytest.mark.parametrize("args, match", [
    (["{run}", "bogus=1"], "unknown option 'bogus'"),
    (["{run}", "data.nope=1"], r"unknown keys \['nope'\]"),
    (["{run}", "split=test"], "split must be one of"),
    (["{run}", "max_points=0"], "max_points must be a positive integer"),
    (["{run}", "device=gpu0"], "not a torch device"),
    (["/nonexistent/run"], "is not a directory"),
    (["curves"], "usage"),
])
def test_cli_bad_input_messages(runs, capsys, args, match):
    from mole.cli.analyze import run

    with pytest.raises(SystemExit) as exc:
        run([a.format(run=runs["mola"]) for a in args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mole-analyze: error:")
    assert re.search(match, err[0]), err[0]
