"""mole-report's paper layouts (mole/report_paper.py) on hand-made sweep directories with known numbers."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import yaml

from mole.recipes.report import write_report
from mole.report_paper import PaperLayout, expected_grid, overrides_dict
from mole.utils.errors import MoleConfigError


def _sweep(root: Path, params: dict, paper: dict) -> Path:
    root.mkdir(parents=True)
    (root / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"sweeper": {"params": params}}, "paper": paper}, sort_keys=False))
    return root


def _job(root: Path, overrides: list[str], metrics: dict | None, error: str | None = None) -> None:
    d = root / ",".join(o.replace("/", "_") for o in overrides)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides + ["sweep=x", "debug=smoke"]))
    if metrics is not None:
        (d / "metrics.json").write_text(json.dumps(metrics))
    if error is not None:
        (d / "error.txt").write_text(error)


def _done(acc: dict[str, float], **extra) -> dict:
    return {"finished": True, "eval": {t: {"acc,none": v, "acc_stderr,none": 0.01} for t, v in acc.items()}, **extra}


def _csv(path: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


MOR = {
    "title": "T1", "source": "MoR Table 1", "rows_by": ["method"], "columns_by": "data",
    "best_over": ["trainer.epochs"], "scale": 100, "average": True, "extra_columns": ["trainable_pct"],
    "row_labels": {"method=lora": "LoRA", "method=mola": "MoLA"},
    "column_labels": {"a": "A", "b": "B"},
    "reported": {"LoRA": {"A": 91.01, "B": 75.51, "Avg.": 83.26}, "MoLA": {"A": 92.36}},
}


def test_best_over_epochs_scale_average_and_the_papers_numbers_beside_ours(tmp_path):
    root = _sweep(tmp_path / "s", {"method": "lora,mola", "data": "a,b", "trainer.epochs": "10,20"}, MOR)
    # LoRA on a: 0.80 at 10 epochs, 0.90 at 20 -> best 90.00; on b: 0.70, 0.60 -> 70.00; avg 80.00
    _job(root, ["method=lora", "data=a", "trainer.epochs=10"], _done({"a": 0.80}, trainable_percent=0.6))
    _job(root, ["method=lora", "data=a", "trainer.epochs=20"], _done({"a": 0.90}, trainable_percent=0.6))
    _job(root, ["method=lora", "data=b", "trainer.epochs=10"], _done({"b": 0.70}, trainable_percent=0.6))
    _job(root, ["method=lora", "data=b", "trainer.epochs=20"], _done({"b": 0.60}, trainable_percent=0.6))
    # MoLA: a has one finished (0.5) and one failed job; b's jobs never ran (missing)
    _job(root, ["method=mola", "data=a", "trainer.epochs=10"], _done({"a": 0.50}))
    _job(root, ["method=mola", "data=a", "trainer.epochs=20"], {"failed": True, "error": "nan"}, error="nan")
    md, csv_path, _ = write_report(root)
    rows = {(r["row"], r["source"]): r for r in _csv(csv_path)}
    lora, mola = rows[("LoRA", "mole")], rows[("MoLA", "mole")]
    assert float(lora["A"]) == pytest.approx(90.0) and float(lora["B"]) == pytest.approx(70.0)
    assert float(lora["Avg."]) == pytest.approx(80.0)
    assert float(lora["TP (%)"]) == 0.6
    assert lora["A jobs"] == "2/2"
    assert float(mola["A"]) == pytest.approx(50.0) and mola["A jobs"] == "1/2"
    assert mola["B"] == "" and mola["B jobs"] == "0/2"  # missing is blank, never 0
    assert mola["Avg."] == ""  # an average over a missing cell is not an average
    assert rows[("LoRA", "paper")]["A"] == "91.01" and rows[("LoRA", "paper")]["Avg."] == "83.26"
    text = md.read_text()
    assert "| **LoRA** | 90.00 | 70.00 | 80.00 | 0.6000 |" in text
    assert "| **MoLA** | 50.00 (1/2) | missing |" in text
    assert "*LoRA (paper)* | 91.01 | 75.51 | 83.26" in text
    assert (root / "jobs.csv").read_text().count("\n") == 7  # header + 6 jobs: the generic table is kept


def test_mean_and_spread_over_seeds_and_task_columns(tmp_path):
    paper = {"rows_by": ["row"], "columns_by": "tasks", "mean_over": ["seed"], "scale": 100,
             "row_labels": {"row=t/hmora": "HMoRA"}, "column_labels": {"mmlu": "MMLU", "arc_e": "ARC-E"}}
    root = _sweep(tmp_path / "s", {"row": "t/hmora", "seed": "1,2,3"}, paper)
    for seed, (m, a) in zip((1, 2, 3), ((0.40, 0.60), (0.50, 0.70), (0.60, 0.80)), strict=True):
        _job(root, ["row=t/hmora", f"seed={seed}"], _done({"arc_e": a, "mmlu": m}))
    _, csv_path, _ = write_report(root)
    (row,) = [r for r in _csv(csv_path) if r["source"] == "mole"]
    # mean of 40, 50, 60 = 50; sample std = 10
    assert float(row["MMLU"]) == pytest.approx(50.0) and float(row["MMLU std"]) == pytest.approx(10.0)
    assert float(row["ARC-E"]) == pytest.approx(70.0) and float(row["ARC-E std"]) == pytest.approx(10.0)
    assert list(row)[2:4] == ["MMLU", "ARC-E"]  # the paper's column order, not the run's


def test_a_grid_key_the_layout_does_not_name_becomes_part_of_the_row(tmp_path):
    paper = {"rows_by": ["router"], "columns_by": "tasks", "row_labels": {"router=topk": "Top-2"}}
    root = _sweep(tmp_path / "s", {"router": "topk", "loss.gamma_c": "0,0.4"}, paper)
    _job(root, ["router=topk", "loss.gamma_c=0"], _done({"t": 0.1}))
    _job(root, ["router=topk", "loss.gamma_c=0.4"], _done({"t": 0.2}))
    _, csv_path, _ = write_report(root)
    labels = [r["row"] for r in _csv(csv_path)]
    assert labels == ["Top-2 (loss.gamma_c=0)", "Top-2 (loss.gamma_c=0.4)"]


def test_layout_errors_name_the_key(tmp_path):
    with pytest.raises(MoleConfigError, match="paper: unknown keys \\['colums_by'\\]"):
        PaperLayout.from_dict({"colums_by": "data"}, "x")
    with pytest.raises(MoleConfigError, match="paper.extra_columns \\['flops'\\]"):
        PaperLayout.from_dict({"extra_columns": ["flops"]}, "x")


def test_grid_and_overrides_parsing():
    assert expected_grid({"hydra": {"sweeper": {"params": {"+row": "a,b", "seed": 1}}}}) == [
        {"row": "a", "seed": "1"}, {"row": "b", "seed": "1"}]
    assert overrides_dict(["+row=t/a", "trainer.lr=1e-4", "seed=3"]) == {"row": "t/a", "trainer.lr": "0.0001", "seed": "3"}


def test_a_column_over_several_benchmarks_is_their_mean(tmp_path):
    """MoA Table 3: one job per domain, evaluated on the domain's test sets; the cell is their mean."""
    paper = {"rows_by": ["row"], "columns_by": "data", "scale": 100, "column_labels": {"math14k": "Math"}}
    root = _sweep(tmp_path / "s", {"row": "t/lora", "data": "math14k"}, paper)
    _job(root, ["row=t/lora", "data=math14k"], _done({"gsm8k": 0.30, "svamp": 0.50, "aqua": 0.40}))
    _, csv_path, _ = write_report(root)
    (row,) = [r for r in _csv(csv_path) if r["source"] == "mole"]
    assert float(row["Math"]) == pytest.approx(40.0)


def test_numbers_match_whatever_their_spelling(tmp_path):
    """The grid says 1e-4, Hydra records 0.0001 in the job's overrides; labels may use either."""
    paper = {"rows_by": ["loss.tsallis.weight"], "columns_by": "tasks", "scale": 100,
             "row_labels": {"loss.tsallis.weight=0.0": "beta = 0", "loss.tsallis.weight=1e-4": "beta = 1e-4"}}
    root = _sweep(tmp_path / "s", {"loss.tsallis.weight": "0.0,1e-4"}, paper)
    _job(root, ["loss.tsallis.weight=0.0"], _done({"t": 0.25}))
    _job(root, ["loss.tsallis.weight=0.0001"], _done({"t": 0.5}))
    _, csv_path, _ = write_report(root)
    rows = {r["row"]: r for r in _csv(csv_path)}
    assert set(rows) == {"beta = 0", "beta = 1e-4"}
    assert float(rows["beta = 1e-4"]["t"]) == pytest.approx(50.0) and rows["beta = 1e-4"]["t jobs"] == "1/1"


def test_a_column_key_the_grid_does_not_vary_takes_the_sweeps_choice(tmp_path):
    """MoA Table 4 picks data=math14k in its defaults list: one column, named by that choice."""
    paper = {"rows_by": ["row"], "columns_by": "data", "scale": 100, "column_labels": {"math14k": "Math"},
             "reported": {"row=t/a": {"Math": 81.2}}}
    root = tmp_path / "s"
    root.mkdir()
    config = {"hydra": {"sweeper": {"params": {"row": "t/a"}}, "runtime": {"choices": {"data": "math14k"}}},
              "paper": paper}
    (root / "multirun.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    _job(root, ["row=t/a"], _done({"gsm8k": 0.2, "svamp": 0.4}))
    _, csv_path, _ = write_report(root)
    rows = {(r["row"], r["source"]): r for r in _csv(csv_path)}
    assert float(rows[("row=t/a", "mole")]["Math"]) == pytest.approx(30.0)
    assert rows[("row=t/a", "paper")]["Math"] == "81.2"
