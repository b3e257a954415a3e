"""Trackers (TensorBoard, W&B offline), routing statistics, and secrets kept out of run directories."""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch
from conftest import TINY

from mole.config import compose_config
from mole.recipes.train import run_train
from mole.routers.base import RouterOutput
from mole.training.tracking import RoutingMonitor, check_trackers
from mole.utils.errors import MoleConfigError
from mole.utils.secrets import REDACTED, is_secret_key, redact, redact_overrides

SECRET = "sk-live-1234567890abcdef"
LN2 = math.log(2)


def _files_containing(root: Path, text: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


# ---- secrets ----


@pytest.mark.parametrize(
    "key, secret",
    [
        ("api_key", True), ("wandb.api_key", True), ("WANDB_API_KEY", True), ("openai-apikey", True),
        ("token", True), ("hf_token", True), ("auth.access_token", True), ("password", True),
        ("db_passwd", True), ("client_secret", True), ("aws_secret_access_key", True), ("credentials", True),
        # not secrets: tokenizer special tokens, token counts, ordinary keys
        ("pad_token", False), ("eos_token", False), ("max_new_tokens", False), ("tokenizer", False),
        ("pad_token_id", False), ("num_tokens", False), ("lr", False), ("tracker_project", False),
        ("router.task_encoder.init_token", False),  # HMoRA: the vocabulary token e_task starts from
    ],
)
def test_which_keys_look_like_secrets(key, secret):
    assert is_secret_key(key) is secret


def test_redact_replaces_values_of_secret_keys_only():
    data = {"a": 1, "wandb": {"api_key": SECRET, "project": "p"}, "hf_token": None, "pad_token": "<pad>",
            "overrides": ["x=1", f"creds.password={SECRET}"]}
    clean, found = redact(data)
    assert clean == {"a": 1, "wandb": {"api_key": REDACTED, "project": "p"}, "hf_token": None, "pad_token": "<pad>",
                     "overrides": ["x=1", f"creds.password={REDACTED}"]}
    assert found == {"wandb.api_key": SECRET}
    assert data["wandb"]["api_key"] == SECRET  # a copy; the input is untouched
    assert redact_overrides(f"method=mola,+wandb.api_key={SECRET},seed=1") == f"method=mola,+wandb.api_key={REDACTED},seed=1"


# ---- routing statistics: hand-computed ----


def test_routing_monitor_entropies_by_hand():
    # 3 tokens, the last one padding (its gates would change every statistic)
    mask = torch.tensor([True, True, False])
    layer0 = RouterOutput(gates=torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), probs=torch.zeros(3, 2))
    soft = RouterOutput(gates=torch.tensor([[0.5, 0.5], [0.5, 0.5], [1.0, 0.0]]), probs=torch.zeros(3, 2))
    sure = RouterOutput(gates=torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), probs=torch.zeros(3, 2))
    monitor = RoutingMonitor([1, 0, 2])  # layer 1 has no router
    monitor([layer0, soft, sure], mask)
    stats = monitor.pop(None)
    # layer 0: mean gate (0.5, 0.5) -> H = ln 2; each token one-hot -> certainty 0
    assert stats["routing/balance_entropy/layer_00"] == pytest.approx(LN2)
    assert stats["routing/certainty_entropy/layer_00"] == pytest.approx(0.0, abs=1e-7)
    # layer 2: soft router (ln 2, ln 2) and sure router (0, 0), averaged -> ln2 / 2 each
    assert stats["routing/balance_entropy/layer_02"] == pytest.approx(LN2 / 2)
    assert stats["routing/certainty_entropy/layer_02"] == pytest.approx(LN2 / 2)
    assert "routing/balance_entropy/layer_01" not in stats
    assert stats["routing/balance_entropy/mean"] == pytest.approx((LN2 + LN2 / 2) / 2)
    assert stats["routing/certainty_entropy/mean"] == pytest.approx((0 + LN2 / 2) / 2)
    assert monitor.pop(None) == {}  # popped: reset


def test_routing_monitor_averages_micro_batches():
    monitor = RoutingMonitor([1])
    mask = torch.tensor([True, True])
    monitor([RouterOutput(gates=torch.tensor([[1.0, 0.0], [1.0, 0.0]]), probs=torch.zeros(2, 2))], mask)  # H = 0
    monitor([RouterOutput(gates=torch.tensor([[0.5, 0.5], [0.5, 0.5]]), probs=torch.zeros(2, 2))], mask)  # H = ln 2
    assert monitor.pop(None)["routing/balance_entropy/layer_00"] == pytest.approx(LN2 / 2)


# ---- TensorBoard, and secrets out of config.yaml and the trackers ----


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="pip install 'mole[tensorboard]'")
def test_tensorboard_events_hold_the_scalars_and_no_secret(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = compose_config([*TINY, "trainer.max_steps=3", "trainer.log_every=2", "trainer.eval_every=0",
                          "trainer.log_with=[tensorboard]", f"+creds.wandb_api_key={SECRET}", "+creds.pad_token=PAD"])
    metrics = run_train(cfg, tmp_path)
    events = EventAccumulator(str(tmp_path / "tb" / "mole"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "lm_loss", "lr", "aux/balance", "val/loss"} <= tags
    assert {"routing/balance_entropy/layer_00", "routing/certainty_entropy/layer_03", "routing/balance_entropy/mean"} <= tags
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
    assert [round(e.value, 4) for e in events.Scalars("loss")] == [round(r["loss"], 4) for r in metrics["train_loss"]]
    assert [e.step for e in events.Scalars("routing/balance_entropy/mean")] == [2, 3]  # log_every=2, and the last step
    assert [e.step for e in events.Scalars("val/loss")] == [0, 3]
    # the same statistics in metrics.json; entropies lie in [0, log E] (layer 0 of MoLA 2-4-6-8 has 2 experts)
    assert [r["step"] for r in metrics["routing_stats"]] == [2, 3]
    assert 0.0 <= metrics["routing_stats"][0]["routing/balance_entropy/layer_00"] <= LN2 + 1e-6
    # the secret is redacted in config.yaml and the tracker's hparams; the tokenizer's pad_token is not
    text = (tmp_path / "config.yaml").read_text()
    assert f"wandb_api_key: {REDACTED}" in text and "pad_token: PAD" in text
    assert _files_containing(tmp_path, SECRET) == []


def test_missing_tracker_package_is_one_line(monkeypatch):
    import mole.training.tracking as tracking

    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MoleConfigError, match=r"trainer.log_with: wandb is not installed; pip install 'mole\[wandb\]'"):
        check_trackers(["wandb"])


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="pip install 'mole[wandb]'")
def test_wandb_runs_offline_without_a_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose_config([*TINY, "trainer.max_steps=2", "trainer.eval_every=0", "trainer.log_with=[wandb]",
                          f"+creds.api_key={SECRET}"])
    run_train(cfg, tmp_path)
    assert os.environ["WANDB_MODE"] == "offline"
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert _files_containing(tmp_path, SECRET) == []


# ---- the real command: Hydra's own files and the run directory's name ----
