"""mole-train / mole-eval / mole-params end to end on tiny_llama, in-process (the real commands: tests/integration/test_commands.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mole.build import build_mole_model
from mole.model.state import load_adapter
from mole.recipes.evaluate import run_eval
from mole.recipes.train import run_train
from mole.run_dir import load_run_config
from mole.utils.errors import MoleConfigError


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One short mola_mor training run with lm-eval at the end (shared by the tests below)."""
    from conftest import TINY

    from mole.config import compose_config

    run_dir = tmp_path_factory.mktemp("run")
    cfg = compose_config([*TINY, "trainer.max_steps=3", "trainer.lr=1e-2", "eval=fixtures", "eval.limit=4"])
    metrics = run_train(cfg, run_dir)
    return run_dir, metrics


def test_run_directory_holds_config_adapter_metrics_and_log(trained_run):
    run_dir, metrics = trained_run
    assert {"config.yaml", "adapter.safetensors", "metrics.json"} <= {p.name for p in run_dir.iterdir()}
    saved = json.loads((run_dir / "metrics.json").read_text())
    for key in ("trainable_params", "total_params", "trainable_percent", "train_loss", "val_loss", "eval"):
        assert key in saved
    assert saved["finished"] and saved["steps"] == 3 and len(saved["train_loss"]) == 3
    assert [v["step"] for v in saved["val_loss"]] == [0, 3]
    assert set(saved["eval"]) >= {"mole_mc", "mole_yesno"}
    assert 0.0 <= saved["eval"]["mole_mc"]["acc,none"] <= 1.0
    # only trainable weights are saved, and training moved them off the zero initialisation of B
    state = load_file(run_dir / "adapter.safetensors")
    assert state and all(".mole_" in k for k in state)
    assert any(k.endswith("lora_B") and v.abs().sum() > 0 for k, v in state.items())
    # the resolved config is plain YAML that rebuilds the run
    cfg = load_run_config(run_dir)
    assert cfg.method_name == "mola_mor" and cfg.model.name == "tiny_llama"


def test_saved_adapter_reloads_to_identical_outputs(trained_run):
    run_dir, _ = trained_run
    cfg = load_run_config(run_dir)
    a, _, _ = build_mole_model(cfg)
    load_adapter(a, run_dir / "adapter.safetensors")
    cfg.seed = cfg.seed + 1  # different adapter/router initialisation before loading
    b, _, _ = build_mole_model(cfg)
    ids = torch.randint(0, 1000, (2, 11))
    with torch.no_grad():
        before = b(input_ids=ids).logits
        load_adapter(b, run_dir / "adapter.safetensors")
        after = b(input_ids=ids).logits
    assert not torch.equal(before, after)  # the load did something
    b.load_state_dict({k: v for k, v in a.state_dict().items() if "base_layer" in k or "mole_" not in k}, strict=False)
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)


def test_mole_eval_rebuilds_the_run_and_writes_results(trained_run):
    run_dir, metrics = trained_run
    results = run_eval(run_dir, {"tasks": ["mole_yesno"], "limit": 4})
    on_disk = json.loads((run_dir / "eval" / "results.json").read_text())
    assert set(on_disk["results"]) == {"mole_yesno"}
    # same model, same data: the same accuracy as the evaluation at the end of training
    assert results["results"]["mole_yesno"]["acc,none"] == metrics["eval"]["mole_yesno"]["acc,none"]


def test_max_steps_zero_writes_an_untrained_checkpoint(tiny_cfg, tmp_path):
    metrics = run_train(tiny_cfg("trainer.max_steps=0"), tmp_path)
    state = load_file(tmp_path / "adapter.safetensors")
    assert metrics["steps"] == 0 and metrics["finished"]
    assert all(v.abs().sum() == 0 for k, v in state.items() if k.endswith("lora_B"))
    assert len(metrics["val_loss"]) == 1


def test_finished_run_is_not_overwritten_without_force(tiny_cfg, tmp_path):
    first = run_train(tiny_cfg("trainer.max_steps=1"), tmp_path)
    again = run_train(tiny_cfg("trainer.max_steps=1"), tmp_path)  # the same config: skipped
    assert again == first and again["steps"] == 1
    with pytest.raises(MoleConfigError, match=r"finished run of another config \(differs at trainer\.max_steps\)"):
        run_train(tiny_cfg("trainer.max_steps=2"), tmp_path)
    forced = run_train(tiny_cfg("trainer.max_steps=2", "force=true"), tmp_path)
    assert forced["steps"] == 2


def test_init_from_starts_the_second_stage_from_the_first_stage_adapter(tmp_path, tiny_cfg):
    """Two-stage training (MoR Table 2): stage 2 starts from stage 1's adapter, not from B = 0."""
    stage1 = tmp_path / "stage1"
    run_train(tiny_cfg("trainer.max_steps=2", "trainer.lr=1e-2"), stage1)
    cfg = tiny_cfg("trainer.max_steps=0", f"trainer.init_from={stage1}", "seed=7")
    stage2 = tmp_path / "stage2"
    run_train(cfg, stage2)
    first, second = load_file(stage1 / "adapter.safetensors"), load_file(stage2 / "adapter.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)  # 0 steps: exactly stage 1's weights


def test_init_from_another_model_or_method_is_a_clear_error(tmp_path, tiny_cfg):
    stage1 = tmp_path / "stage1"
    run_train(tiny_cfg("trainer.max_steps=0", "method=lora"), stage1)
    with pytest.raises(MoleConfigError, match=r"trainer.init_from.*method=lora"):
        run_train(tiny_cfg("trainer.max_steps=0", "method=mola", f"trainer.init_from={stage1}"), tmp_path / "b")
    with pytest.raises(MoleConfigError, match=r"trainer.init_from.*model=tiny_llama"):
        run_train(tiny_cfg("trainer.max_steps=0", "model.name=other", f"trainer.init_from={stage1}"), tmp_path / "c")
    with pytest.raises(MoleConfigError, match="trainer.init_from"):
        run_train(tiny_cfg("trainer.max_steps=0", f"trainer.init_from={tmp_path / 'nowhere'}"), tmp_path / "d")
