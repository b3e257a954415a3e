"""mole-analyze end to end on tiny_llama runs: statistics, loss curves, the command and its errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import compose_tiny

from mole.analysis.data import task_records
from mole.analysis.run import analyze_run, loss_curves, read_curve
from mole.utils.errors import MoleConfigError


def _train(name: str, root: Path, *overrides: str) -> Path:
    from mole.recipes.train import run_train

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
    from mole.run_dir import load_run_config

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

    from mole.run_dir import load_run_config

    data = load_run_config(runs["mola"]).data
    data = OmegaConf.merge(data, {"val_size": 0})
    with pytest.raises(MoleConfigError, match="split=train"):
        task_records(data, seed=0)
    recs = task_records(data, seed=0, split="train", per_task=4)
    assert Counter(r["task"] for r in recs) == {"mc_train": 4, "yesno_train": 4}


def test_validation_split_matches_training(runs):
    from mole.data import load_datasets
    from mole.data.sources import read_records
    from mole.run_dir import load_run_config

    cfg = load_run_config(runs["mola"])
    _, val = load_datasets(cfg.data, seed=cfg.seed)
    tagged = task_records(cfg.data, seed=cfg.seed)
    assert [{k: v for k, v in r.items() if k != "task"} for r in tagged] == val
    for r in tagged:  # each record is in the file its task names
        path = next(p for p in cfg.data.path if Path(p).stem == r["task"])
        assert {k: v for k, v in r.items() if k != "task"} in read_records(path)


# ---- loss curves ----


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
