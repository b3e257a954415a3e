"""The trainer's AdamW: torch's fused kernel by default (``trainer.fused_optimizer``), the same update as
the per-parameter loop, and a fallback where the fused kernel cannot run."""

from __future__ import annotations

import math

import pytest
import torch

from mole.build import build_mole_model
from mole.training import TrainArgs
from mole.training.optim import adamw, build_optimizer
from mole.utils.errors import MoleConfigError


def _train(model, opt, steps: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for _ in range(steps):
        for p in params.values():
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {n: p.detach().clone() for n, p in params.items()}


@pytest.mark.parametrize("lora_plus", ["1.0", "2.0"])
def test_fused_adamw_is_the_default_and_updates_as_the_loop_does(tiny_cfg, lora_plus):
    finals = {}
    for fused in (True, False):
        cfg = tiny_cfg("method=mola_mor", "trainer.lr=1e-2", "trainer.weight_decay=0.1",
                       f"trainer.lora_plus_ratio={lora_plus}", f"trainer.fused_optimizer={str(fused).lower()}")
        torch.manual_seed(0)
        model, _, _ = build_mole_model(cfg)
        opt = build_optimizer(model, TrainArgs.from_config(cfg.trainer))
        assert bool(opt.defaults.get("fused")) is fused
        assert all(bool(g.get("fused")) is fused for g in opt.param_groups)
        finals[fused] = _train(model, opt)
    fused, loop = finals[True], finals[False]
    assert fused.keys() == loop.keys() and fused
    moved = 0
    for name in fused:
        torch.testing.assert_close(fused[name], loop[name], rtol=1e-5, atol=1e-6, msg=name)
        moved += int(not torch.equal(fused[name], torch.zeros_like(fused[name])))
    assert moved == len(fused)  # every tensor was updated (B matrices start at zero)


def test_fused_is_skipped_where_the_parameters_do_not_allow_it():
    doubles = [torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))]
    assert adamw(doubles, lr=1e-3).defaults.get("fused")  # float64 on the CPU: the fused kernel takes it
    meta = [torch.nn.Parameter(torch.zeros(3, device="meta"))]
    opt = adamw(meta, lr=1e-3)
    assert not opt.defaults.get("fused")  # a device the fused kernel does not run on: the default AdamW


def test_bad_fused_optimizer_value_names_the_key(tiny_cfg):
    with pytest.raises(MoleConfigError, match="trainer.fused_optimizer must be true or false"):
        TrainArgs.from_config(tiny_cfg("trainer.fused_optimizer=maybe").trainer)


def _lrs(scheduler, optimizer, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("kind, hf", [("linear", "linear"), ("cosine", "cosine"), ("constant", "constant_with_warmup")])
def test_schedule_by_hand_and_against_transformers_get_scheduler(kind, hf):
    """Warm-up 4 of 10 steps: (step + 1) / 4 here, step / 4 in transformers (first step at lr 0); the decay
    after the warm-up is the same."""
    from transformers import get_scheduler

    from mole.training.optim import build_scheduler

    def sgd():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)

    opt = sgd()
    ours = _lrs(build_scheduler(opt, TrainArgs(scheduler=kind, warmup_steps=4), 10), opt, 10)
    opt = sgd()
    theirs = _lrs(get_scheduler(hf, opt, num_warmup_steps=4, num_training_steps=10), opt, 10)
    assert ours[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0]) and theirs[:4] == pytest.approx([0.0, 0.25, 0.5, 0.75])
    # after the warm-up: linear (10 - s) / 6, cosine (1 + cos(pi (s - 4) / 6)) / 2, constant 1
    want = {"linear": [(10 - s) / 6 for s in range(4, 10)],
            "cosine": [(1 + math.cos(math.pi * (s - 4) / 6)) / 2 for s in range(4, 10)],
            "constant": [1.0] * 6}[kind]
    assert ours[4:] == pytest.approx(want) and theirs[4:] == pytest.approx(want)
