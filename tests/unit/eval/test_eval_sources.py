"""Evaluation facts kept once: the Alpaca template has one copy, an eval config is checked once per command."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TINY

import mole
import mole.recipes.evaluate as evaluate_recipe
import mole.recipes.train as train_recipe
from mole.config import compose_config
from mole.data.prompts import ALPACA_NO_INPUT, ALPACA_STOP, ALPACA_WITH_INPUT

PACKAGE = Path(mole.__file__).resolve().parent
CONF = PACKAGE.parent / "conf"


def test_the_alpaca_template_is_written_once():
    # a phrase of the template's header: any other copy of the template would carry it
    phrase = "Write a response that appropriately completes the request."
    files = [p for root in (PACKAGE, CONF) for p in root.rglob("*")
             if p.is_file() and (p.suffix in (".py", ".yaml") or p.name.endswith("_yaml"))]
    holders = sorted(p.relative_to(PACKAGE.parent).as_posix() for p in files if phrase in p.read_text(encoding="utf-8"))
    assert holders == ["mole/data/prompts.py"]
    assert all(stop in template for stop in ALPACA_STOP for template in (ALPACA_NO_INPUT, ALPACA_WITH_INPUT))


@pytest.fixture
def counted(monkeypatch):
    calls = []
    check = evaluate_recipe.check_eval_config

    def counting(eval_cfg):
        calls.append(list(eval_cfg.get("tasks") or []))
        return check(eval_cfg)

    for recipe in (evaluate_recipe, train_recipe):  # each recipe calls it by its own name
        monkeypatch.setattr(recipe, "check_eval_config", counting)
    return calls


def test_each_eval_config_is_checked_once(counted, tmp_path):
    from mole.cli.eval import run

    # mole-train: the final evaluation's config and the model selection's (scored twice), each once, up front
    run_dir = tmp_path / "run"
    cfg = compose_config([*TINY, "eval=fixtures", "eval.tasks=[mole_mc]", "eval.limit=2", "eval.at_end=true",
                          "eval.val_tasks=[mole_yesno]", "trainer.val_acc_every=1"])
    metrics = train_recipe.run_train(cfg, run_dir)
    assert "mole_mc" in metrics["eval"] and len(metrics["val_acc"]) >= 2
    assert counted == [["mole_mc"], ["mole_yesno"]]
    # mole-eval: once, before anything is written
    counted.clear()
    results = run([f"checkpoint={run_dir}", "eval.tasks=[mole_yesno]", "eval.limit=2"])
    assert results["n-samples"]["mole_yesno"]["effective"] == 2
    assert counted == [["mole_yesno"]]
