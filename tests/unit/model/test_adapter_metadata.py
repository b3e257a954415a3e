"""``adapter.safetensors`` says what made it, and loading checks it (mole/model/state.py)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import compose_tiny
from safetensors import safe_open
from safetensors.torch import save_file

from mole.build import build_mole_model
from mole.model.state import ADAPTER_FILE, load_adapter, save_adapter, trainable_state_dict
from mole.utils.errors import MoleConfigError


def _built(*overrides: str):
    model, _, _ = build_mole_model(compose_tiny(overrides))
    return model


def _saved(tmp_path, *overrides: str):
    path = tmp_path / ADAPTER_FILE
    save_adapter(_built(*overrides), path)
    return path


def test_the_file_names_method_router_layout_adapter_base_model_and_version(tmp_path):
    import mole

    path = _saved(tmp_path, "method=mola")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "mole-adapter-v1" and meta["mole_version"] == mole.__version__
    assert json.loads(meta["method"]) == "mola" and json.loads(meta["base_model"]) == "tiny_llama"
    assert json.loads(meta["router"])["_target_"] == "mole.routers.TopKRouter"
    assert json.loads(meta["experts"])["groups"] == [2, 4, 6, 8]
    assert json.loads(meta["adapter"])["alpha"] == 16 and json.loads(meta["adapter"])["rank"] == 8
    shape = json.loads(meta["base_shape"])
    assert shape["num_hidden_layers"] == 4 and shape["hidden_size"] == 64 and shape["model_type"] == "llama"


def test_a_top_k_adapter_is_refused_by_a_soft_router_run(tmp_path):
    path = _saved(tmp_path, "method=mola")
    soft = _built("method=mola", "router=soft")
    topk_state = trainable_state_dict(_built("method=mola"))
    # the weights alone would fit: same names and shapes, only the routing differs
    assert {k: v.shape for k, v in trainable_state_dict(soft).items()} == {k: v.shape for k, v in topk_state.items()}
    with pytest.raises(MoleConfigError) as err:
        load_adapter(soft, path)
    assert str(err.value) == (f"{path}: adapter does not match the run's config: made with "
                              "router._target_=mole.routers.TopKRouter, the config has router._target_=mole.routers.SoftRouter "
                              "(was it trained with another method or model?)")


def test_an_alpha_64_adapter_is_refused_by_an_alpha_16_run(tmp_path):
    path = _saved(tmp_path, "method=mola", "adapter.alpha=64")
    with pytest.raises(MoleConfigError, match=r"made with adapter\.alpha=64, the config has adapter\.alpha=16"):
        load_adapter(_built("method=mola"), path)


def test_another_base_shape_is_named_before_any_tensor(tmp_path):
    path = _saved(tmp_path, "method=lora", "model.hidden_size=32")
    with pytest.raises(MoleConfigError, match=r"made with base_shape\.hidden_size=32, the config has base_shape\.hidden_size=64"):
        load_adapter(_built("method=lora"), path)


def test_training_only_settings_do_not_block_loading(tmp_path):
    path = _saved(tmp_path, "method=mola", "adapter.dropout=0.3")
    model = _built("method=mola")
    load_adapter(model, path)
    saved = trainable_state_dict(_built("method=mola", "adapter.dropout=0.3"))
    assert all(torch.equal(v, saved[k]) for k, v in trainable_state_dict(model).items())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(bad, tmp_path):
    model = _built("method=lora")
    name, param = next((n, p) for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        param.view(-1)[0] = bad
    save_adapter(model, tmp_path / ADAPTER_FILE)
    with pytest.raises(MoleConfigError) as err:
        load_adapter(_built("method=lora"), tmp_path / ADAPTER_FILE)
    assert str(err.value).startswith(f"{tmp_path / ADAPTER_FILE}: {name} holds NaN or infinite values")


def test_an_adapter_without_metadata_loads_with_a_warning(tmp_path, caplog):
    source = _built("method=mola")
    with torch.no_grad():
        for p in source.parameters():
            if p.requires_grad:
                p.add_(0.01)
    state = {k: v.contiguous() for k, v in trainable_state_dict(source).items()}
    save_file(state, str(tmp_path / ADAPTER_FILE), metadata={"format": "mole-adapter-v1"})  # as written before
    model = _built("method=mola")
    with caplog.at_level(logging.WARNING, logger="mole.model.state"):
        load_adapter(model, tmp_path / ADAPTER_FILE)
    assert "has no metadata saying what made it" in caplog.text and "cannot be checked" in caplog.text
    assert all(torch.equal(v, state[k]) for k, v in trainable_state_dict(model).items())


def _run_dir(tmp_path, adapter_overrides: tuple[str, ...], run_overrides: tuple[str, ...] = ()):
    """A run directory as mole-train leaves it, with the adapter of another config."""
    from mole.run_dir import CONFIG_FILE
    from mole.utils.secrets import redacted_yaml

    run = tmp_path / "run"
    run.mkdir()
    cfg = compose_tiny(["method=mola", "eval=fixtures", *run_overrides])
    (run / CONFIG_FILE).write_text(redacted_yaml(cfg))
    save_adapter(_built("method=mola", *adapter_overrides), run / ADAPTER_FILE)
    return run


@pytest.mark.parametrize("adapter, names", [
    (("adapter.alpha=64",), ("adapter.alpha=64", "adapter.alpha=16")),
    (("router=soft",), ("router._target_=mole.routers.SoftRouter",)),
])
def test_mole_eval_refuses_a_mismatched_adapter_in_one_line_and_writes_nothing(adapter, names, tmp_path, capsys):
    import mole.cli.eval

    run = _run_dir(tmp_path, adapter)
    before = sorted(p.name for p in run.iterdir())
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level  # the command logs to this test's captured stdout
    try:
        with pytest.raises(SystemExit) as stop:
            mole.cli.eval.main([f"checkpoint={run}"])
    finally:
        root.handlers[:], root.level = handlers, level
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert stop.value.code == 2 and len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith(f"mole-eval: error: {run / ADAPTER_FILE}: adapter does not match the run's config")
    assert all(n in lines[0] for n in names), lines[0]
    assert sorted(p.name for p in run.iterdir() if p.name != "eval") == before
    assert not any((run / "eval").glob("results*"))
