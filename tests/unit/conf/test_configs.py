"""Every config file composes, and every method-side option builds a model (tiny_llama, or on meta)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TINY, compose_tiny, partners

from mole import CONF_DIR
from mole.build import build_aux_losses, build_mole_model
from mole.config import compose_config
from mole.data import load_datasets
from mole.training import TrainArgs

GROUPS = ["model", "method", "router", "experts", "adapter", "loss", "data", "trainer", "eval", "distributed", "paths"]


def _options():
    for group in GROUPS:
        for path in sorted((Path(CONF_DIR) / group).glob("*.yaml")):
            yield group, path.stem


@pytest.mark.parametrize("group, option", list(_options()))
def test_every_config_option_composes_and_builds(group, option):
    overrides = [*TINY, f"{group}={option}", *partners(group, option)]
    if group == "model":
        overrides = [o for o in overrides if not o.startswith("model=")] + [f"model={option}"]
    cfg = compose_tiny(overrides, base=[])
    assert cfg[group] is not None if group not in ("method",) else cfg.method_name == option
    TrainArgs.from_config(cfg.trainer)
    build_aux_losses(cfg)
    if group == "model" and option != "tiny_llama":
        if option == "smollm2_135m":
            pytest.importorskip("gguf")
        model, _, report = build_mole_model(cfg, meta=True)  # shapes only: no weights, no download
    else:
        model, _, report = build_mole_model(cfg)
        train, val = load_datasets(cfg.data, seed=cfg.seed)
        assert train and val
    assert any(p.requires_grad for p in model.parameters())
    assert len(report.experts_per_layer) == model.config.num_hidden_layers  # one layout entry per decoder layer


def test_the_users_own_example_composes():
    cfg = compose_config(["router=mor", "experts=mola_2468"])
    assert cfg.router._target_ == "mole.routers.MoRRouter" and list(cfg.experts.groups) == [2, 4, 6, 8]


def test_command_line_choice_beats_the_method_preset():
    cfg = compose_config(["method=mola", "router=soft", "loss=none"])
    assert cfg.router._target_ == "mole.routers.SoftRouter" and dict(cfg.loss) == {}
    assert list(cfg.experts.groups) == [2, 4, 6, 8]  # the rest of the preset stays


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("trainer.lr", "0", "trainer.lr must be a positive number"),
        ("trainer.lr", "-1e-4", "trainer.lr must be a positive number"),
        ("trainer.batch_size", "0", "trainer.batch_size must be a positive integer"),
        ("trainer.scheduler", "step", "trainer.scheduler must be one of"),
        ("trainer.max_steps", "-1", "trainer.max_steps must be null or a non-negative integer"),
    ],
)
def test_bad_trainer_values_name_the_key(key, value, message):
    from mole.utils.errors import MoleConfigError

    with pytest.raises(MoleConfigError, match=message):
        TrainArgs.from_config(compose_config([*TINY, f"{key}={value}"]).trainer)


def test_evaluate_config_composes():
    cfg = compose_config(["checkpoint=/some/run", "eval.tasks=[mole_mc]", "eval.limit=3"], config_name="evaluate")
    assert cfg.checkpoint == "/some/run" and list(cfg.eval.tasks) == ["mole_mc"] and cfg.eval.include_path is None
