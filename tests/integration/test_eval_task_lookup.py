"""A task name that is not local makes mole index lm-eval's built-in tasks (tens of seconds): an unknown
name, or a built-in task whose data needs the Hub, is then refused in one line naming ``eval.tasks``,
before anything runs."""

from __future__ import annotations

import pytest
from conftest import TINY

from mole.config import compose_config
from mole.eval.harness import RESULTS_FILENAME, evaluate_model
from mole.model.base import build_model
from mole.recipes.evaluate import run_eval
from mole.recipes.train import run_train
from mole.utils.errors import MoleConfigError


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One short training run without evaluation (shared by the tests below)."""
    run_dir = tmp_path_factory.mktemp("run")
    run_train(compose_config([*TINY, "trainer.max_steps=1"]), run_dir)
    return run_dir


def test_unknown_eval_task_is_a_clear_error(run_dir):
    with pytest.raises(MoleConfigError, match="eval.tasks"):
        run_eval(run_dir, {"tasks": ["no_such_task"]})


def test_builtin_lm_eval_task_offline_is_a_clear_error(run_dir, monkeypatch):
    # arc_easy is one of lm-eval's own tasks: it is found, but its data needs the Hub
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MoleConfigError, match=r"eval.tasks: \['arc_easy'\] are lm-eval's built-in tasks.*not reachable"):
        run_eval(run_dir, {"tasks": ["arc_easy"], "limit": 2})


def test_unknown_task_is_refused_before_running(tmp_path):
    model, tokenizer = build_model(compose_config(TINY).model, seed=0)
    with pytest.raises(ValueError, match=r"eval\.tasks") as info:
        evaluate_model(model, tokenizer, ["mole_mc", "no_such_task"], output_dir=tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert "no_such_task" in message and "eval.include_path" in message
    assert "mole_mc" in message and "mole_yesno" in message
    assert not (tmp_path / RESULTS_FILENAME).exists()
