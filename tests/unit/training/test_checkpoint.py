"""Resumable checkpoints: atomic writes, the data position, and a killed run that resumes bit for bit."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from mole.config import compose_config
from mole.recipes.train import run_train
from mole.training import checkpoint as ckpt
from mole.training.loop import TrainState
from mole.utils.errors import MoleConfigError

# ---- the data position ----


def _loader(seed: int) -> DataLoader:
    # 10 items, batches of 3: 4 batches an epoch (the last one of 1 item)
    return DataLoader(list(range(10)), batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(seed))


def test_batch_stream_resumes_the_exact_order_across_an_epoch_boundary():
    fresh = ckpt.BatchStream(_loader(7))
    order = [next(fresh).tolist() for _ in range(12)]  # epochs 0, 1, 2
    for epoch in range(3):  # each epoch is a permutation of the 10 items, in batches of 3, 3, 3, 1
        batches = order[4 * epoch: 4 * epoch + 4]
        assert sorted(sum(batches, [])) == list(range(10)) and [len(b) for b in batches] == [3, 3, 3, 1]
    assert order[0:4] != order[4:8]  # reshuffled each epoch

    stream = ckpt.BatchStream(_loader(7))
    for _ in range(6):  # epoch 0 and 2 batches of epoch 1
        next(stream)
    position, tensors = stream.state_dict()
    assert position == {"epoch": 1, "batch_index": 2}
    other = ckpt.BatchStream(_loader(999))  # another seed: only the restored state can give the same order
    other.resume(position, tensors)
    assert [next(other).tolist() for _ in range(6)] == order[6:12]


def test_batch_stream_restores_the_global_rng_when_the_epoch_restarts():
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    state = torch.get_rng_state()
    stream = ckpt.BatchStream(_loader(1))
    stream.resume({"epoch": 0, "batch_index": 1}, {}, then=lambda: torch.set_rng_state(state))
    torch.rand(5)  # something draws in between; the restore comes right before the next batch is used
    next(stream)
    assert torch.equal(torch.rand(3), expected)


# ---- the checkpoint directory ----


class _Adapter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mole_A = torch.nn.Parameter(torch.arange(6.0).reshape(2, 3) / 10)  # adapter files keep mole_ params

    def forward(self, x):
        return x @ self.mole_A.T


def _tiny_parts(lr: float = 1e-2):
    model = _Adapter()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    for _ in range(2):
        model(torch.ones(4, 3)).pow(2).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


def _save(run_dir, step, keep=2, **parts):
    model, opt, sched = parts.get("parts") or _tiny_parts()
    return ckpt.save_checkpoint(run_dir, step, model=model, optimizer=opt, scheduler=sched, state=TrainState(step=step),
                                stream=ckpt.BatchStream(_loader(0)), config_yaml="a: 1\n", keep=keep)


def test_checkpoint_holds_only_safetensors_json_and_yaml_and_keeps_the_newest(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 3]
    files = sorted(p.name for p in (tmp_path / "checkpoints" / "step-3").iterdir())
    assert files == ["adapter.safetensors", "config.yaml", "optimizer.json", "optimizer.safetensors", "rng.json",
                     "rng.safetensors", "scheduler.json", "trainer_state.json"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step-3"


def test_optimizer_and_scheduler_state_round_trip_exactly(tmp_path):
    model, opt, sched = _tiny_parts()
    path = _save(tmp_path, 2, parts=(model, opt, sched))
    model2, opt2, sched2 = _tiny_parts(lr=0.5)  # other lr and other moments until loaded
    ckpt.load_optimizer_state(opt2, load_file(path / "optimizer.safetensors"),
                              json.loads((path / "optimizer.json").read_text()), path)
    sched2.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    model2.load_state_dict(model.state_dict())
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 3)
    for m, o, s in ((model, opt, sched), (model2, opt2, sched2)):
        m(torch.ones(4, 3)).pow(2).sum().backward()
        o.step()
        s.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters(), strict=True))
    assert sched2.get_last_lr() == sched.get_last_lr() == [pytest.approx(1e-2 / 4)]


def test_optimizer_state_of_another_model_is_a_clear_error(tmp_path):
    path = _save(tmp_path, 1)
    other = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2, 5))])
    with pytest.raises(MoleConfigError, match="optimizer state .* has shape"):
        ckpt.load_optimizer_state(other, load_file(path / "optimizer.safetensors"),
                                  json.loads((path / "optimizer.json").read_text()), path)


def test_a_save_interrupted_half_way_leaves_no_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path, 1)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # as if killed while writing the optimizer state

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2)
    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir()]
    assert sorted(leftovers) == [f".tmp-step-2-{os.getpid()}", "step-1"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step-1"  # the half-written one is never seen
    assert ckpt.prepare_run_dir(tmp_path, resume=True, force=False).name == "step-1"
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-1"]  # the temporary is gone


# ---- resume in-process ----

RESUME = ["model=tiny_llama", "eval=none", "trainer.batch_size=2", "adapter.dropout=0.1", "trainer.max_steps=6",
          "trainer.eval_every=2", "data.max_records=12", "trainer.grad_accum=2", "trainer.save_every=2"]


def _crash_at_micro_batch(monkeypatch, n: int) -> None:
    import mole.training.loop as loop

    real, calls = loop.loss_step, {"n": 0}

    def loss_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "loss_step", loss_step)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    return run_dir, run_train(compose_config(RESUME), run_dir)


def test_resumed_run_has_the_same_metrics_and_adapter(uninterrupted, tmp_path, monkeypatch):
    ref_dir, ref = uninterrupted
    # 10 training records in batches of 2, 2 micro-batches a step: epoch 0 ends in step 3 (micro-batch 5),
    # a crash in micro-batch 10 (step 5) resumes from step 4 inside epoch 1
    _crash_at_micro_batch(monkeypatch, 10)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_train(compose_config(RESUME), tmp_path)
    monkeypatch.undo()
    failed = json.loads((tmp_path / "metrics.json").read_text())
    assert failed["failed"] and not failed["finished"] and failed["steps"] == 4
    assert "simulated crash" in (tmp_path / "error.txt").read_text()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 4]

    resumed = run_train(compose_config([*RESUME, "trainer.resume=true"]), tmp_path)
    assert resumed["finished"] and "failed" not in resumed and not (tmp_path / "error.txt").exists()
    assert resumed["train_loss"] == ref["train_loss"] and len(ref["train_loss"]) == 6
    assert resumed["val_loss"] == ref["val_loss"] and [v["step"] for v in ref["val_loss"]] == [0, 2, 4, 6]
    a, b = load_file(ref_dir / "adapter.safetensors"), load_file(tmp_path / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_restoring_the_rng_would_differ(uninterrupted, tmp_path, monkeypatch):
    """The control: with dropout on, skipping the RNG restore changes the result (the test above can fail)."""
    ref_dir, ref = uninterrupted
    _crash_at_micro_batch(monkeypatch, 10)
    with pytest.raises(RuntimeError):
        run_train(compose_config(RESUME), tmp_path)
    monkeypatch.undo()
    monkeypatch.setattr(ckpt, "set_rng_state", lambda *a: None)
    resumed = run_train(compose_config([*RESUME, "trainer.resume=true"]), tmp_path)
    assert resumed["train_loss"][:4] == ref["train_loss"][:4]
    assert resumed["train_loss"][4:] != ref["train_loss"][4:]


def test_resume_without_a_checkpoint_starts_fresh_with_a_log_line(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        metrics = run_train(compose_config([*RESUME, "trainer.max_steps=1", "trainer.resume=true"]), tmp_path)
    assert metrics["finished"] and metrics["steps"] == 1
    assert "trainer.resume: no checkpoint in" in caplog.text and "starting from scratch" in caplog.text


def test_resume_with_another_config_is_a_clear_error(tmp_path, monkeypatch):
    _crash_at_micro_batch(monkeypatch, 5)
    with pytest.raises(RuntimeError):
        run_train(compose_config(RESUME), tmp_path)
    monkeypatch.undo()
    with pytest.raises(MoleConfigError, match=r"trainer.resume: .*step-2 was made with a different config "
                                              r"\(differs at trainer.lr\)"):
        run_train(compose_config([*RESUME, "trainer.resume=true", "trainer.lr=1e-3"]), tmp_path)
