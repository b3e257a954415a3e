"""Model selection on validation accuracy (trainer.val_acc_every / early_stop_patience / keep_best) and label
smoothing (trainer.label_smoothing): HMoRA's training recipe (Sec. 5.1)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from mole.losses.lm import lm_loss
from mole.recipes.train import run_train
from mole.training.args import TrainArgs
from mole.training.loop import TrainState
from mole.training.selection import BestSelector
from mole.utils.errors import MoleConfigError
from tests.conftest import compose_tiny


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mole_w = torch.nn.Parameter(torch.zeros(2))


def test_selector_keeps_the_best_and_stops_after_patience(tmp_path):
    scores = iter([0.5, 0.7, 0.6, 0.65])
    net = _Net()
    sel = BestSelector(lambda m: {"a": next(scores), "b": 0.1}, every=2, patience=2, run_dir=tmp_path)
    state = TrainState()
    stops = []
    for step in (2, 4, 6, 8):
        with torch.no_grad():
            net.mole_w.fill_(step)  # the weights at this step
        stops.append(sel.update(net, step, state))
    # means 0.3, 0.4, 0.35, 0.375: best at step 4; two evaluations without improvement -> stop at step 8
    assert stops == [False, False, False, True]
    assert state.best_step == 4
    assert [e["mean"] for e in state.val_acc] == [0.3, 0.4, 0.35, 0.375]
    assert torch.equal(load_file(str(tmp_path / "best" / "adapter.safetensors"))["mole_w"], torch.full((2,), 4.0))
    sel.restore_best(net)
    assert torch.equal(net.mole_w.detach(), torch.full((2,), 4.0))
    assert sel.due(3, 3) and sel.due(4, 9) and not sel.due(5, 9)


def test_a_resumed_selector_continues_its_patience():
    sel = BestSelector(lambda m: {"a": 0.2}, every=1, patience=2)
    sel.resume([{"step": 1, "mean": 0.5}, {"step": 2, "mean": 0.4}])
    assert sel.update(_Net(), 3, TrainState())  # a second evaluation without beating 0.5


def test_label_smoothing_matches_the_hand_computed_loss():
    logits = torch.tensor([[[math.log(2.0), 0.0, 0.0], [0.0, 0.0, 0.0]]])  # (1, 2, 3): position 0 predicts label 1
    labels = torch.tensor([[-100, 0]])
    # p = (0.5, 0.25, 0.25); eps = 0.3 -> (1 - eps) * -log 0.5 + eps * mean(-log p)
    expected = 0.7 * math.log(2) + 0.3 * (math.log(2) + 2 * math.log(4)) / 3
    assert lm_loss(logits, labels, label_smoothing=0.3).item() == pytest.approx(expected, rel=1e-6)
    assert lm_loss(logits, labels).item() == pytest.approx(math.log(2), rel=1e-6)


def test_selection_keys_are_checked():
    with pytest.raises(MoleConfigError, match="trainer.early_stop_patience and trainer.keep_best need trainer.val_acc_every"):
        TrainArgs(early_stop_patience=3)
    with pytest.raises(MoleConfigError, match="trainer.label_smoothing must be a number in \\[0, 1\\)"):
        TrainArgs(label_smoothing=1.0)


def test_a_run_selects_on_validation_accuracy_and_ends_with_the_best_adapter(tmp_path):
    cfg = compose_tiny(["method=mola", "eval=fixtures", "eval.at_end=false", "eval.val_tasks=[mole_yesno]",
                        "eval.limit=4", "trainer.max_steps=6", "trainer.val_acc_every=2",
                        "trainer.keep_best=true", "trainer.label_smoothing=0.1", "trainer.lr=5e-3"])
    metrics = run_train(cfg, tmp_path)
    steps = [e["step"] for e in metrics["val_acc"]]
    assert steps[:1] == [2] and set(steps) <= {2, 4, 6}
    best = max(metrics["val_acc"], key=lambda e: (e["mean"], -e["step"]))
    assert metrics["best_step"] == best["step"]
    final = load_file(str(tmp_path / "adapter.safetensors"))
    kept = load_file(str(tmp_path / "best" / "adapter.safetensors"))
    assert final.keys() == kept.keys() and all(torch.equal(final[k], kept[k]) for k in final)


def test_val_acc_every_without_validation_tasks_is_one_clear_error(tmp_path):
    cfg = compose_tiny(["trainer.val_acc_every=2"])
    with pytest.raises(MoleConfigError, match="eval.val_tasks"):
        run_train(cfg, tmp_path)


def test_selection_on_the_validation_subsets_of_paper_benchmarks(tmp_path):
    """eval=hmora7 scores its seven benchmarks' validation split (smoke fixtures here) for model selection."""
    cfg = compose_tiny(["method=hmora", "eval=hmora7", "eval.smoke=true", "data.smoke=true", "eval.limit=2",
                        "eval.max_gen_toks=4", "eval.at_end=false", "trainer.max_steps=2",
                        "trainer.val_acc_every=1", "trainer.keep_best=true"])
    metrics = run_train(cfg, tmp_path)
    assert [e["step"] for e in metrics["val_acc"]] == [1, 2]
    assert set(metrics["val_acc"][0]) == {"step", "mean", "mmlu", "mmlu_pro", "arc_c", "arc_e", "openbookqa",
                                          "swag", "commonsenseqa"}
    assert (tmp_path / "best" / "adapter.safetensors").is_file()
