"""HydraLoRA experts (shared A, per-expert B) and LoRA+ learning rates."""

from __future__ import annotations

import pytest
import torch

from mole.adapters import HydraLoRAExperts
from mole.bench.loops import hydra_reference
from mole.build import build_mole_model, parameter_report
from mole.model.inject import mole_layers
from mole.training import TrainArgs
from mole.training.optim import build_optimizer, build_scheduler
from mole.utils.errors import MoleConfigError


def _random_hydra(e: int = 4, d_in: int = 6, d_out: int = 5, r: int = 3) -> HydraLoRAExperts:
    h = HydraLoRAExperts(d_in, d_out, num_experts=e, rank=r, alpha=6.0)
    with torch.no_grad():
        h.lora_B.normal_()
    return h


def test_shapes_share_one_a():
    h = HydraLoRAExperts(10, 7, num_experts=8, rank=4)
    assert h.lora_A.shape == (4, 10) and h.lora_B.shape == (7, 32)
    assert sum(p.numel() for p in h.parameters()) == 4 * 10 + 8 * 4 * 7  # r d_in + E r d_out
    assert torch.count_nonzero(h.lora_B) == 0


@pytest.mark.parametrize("sparse", [False, True])
def test_stacked_hydra_equals_the_per_expert_loop_outputs_and_gradients(sparse):
    h = _random_hydra()
    x = torch.randn(9, 6)
    gates = torch.softmax(torch.randn(9, 4), -1)
    if sparse:
        gates = gates * (gates >= gates.topk(2, -1).values[:, -1:])  # top-2, the rest exactly 0
    out = h(x, gates)
    grads = torch.autograd.grad(out.square().sum(), [h.lora_A, h.lora_B])
    ref = hydra_reference(h, x, gates)
    ref_grads = torch.autograd.grad(ref.square().sum(), [h.lora_A, h.lora_B])
    torch.testing.assert_close(out, ref)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg)


def test_hydra_by_hand_two_experts():
    h = HydraLoRAExperts(2, 1, num_experts=2, rank=1, alpha=2.0)  # scaling 2
    with torch.no_grad():
        h.lora_A.copy_(torch.tensor([[1.0, 2.0]]))
        h.lora_B.copy_(torch.tensor([[3.0, -1.0]]))  # B_1 = 3, B_2 = -1
    x = torch.tensor([[1.0, 1.0]])  # A x = 3
    gates = torch.tensor([[0.25, 0.75]])
    # 2 * (0.25 * 3 * 3 + 0.75 * (-1) * 3) = 2 * (2.25 - 2.25) = 0; and gate (1, 0): 2 * 9 = 18
    assert h(x, gates).item() == pytest.approx(0.0)
    assert h(x, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(18.0)


def test_fresh_hydralora_model_equals_the_base(tiny_cfg):
    ids = torch.randint(0, 500, (2, 7))
    base, _, _ = build_mole_model(tiny_cfg("experts=single", "router=none", "experts.targets=[q_proj]"))
    model, _, rep = build_mole_model(tiny_cfg("method=hydralora"))
    assert all(isinstance(m.mole_experts, HydraLoRAExperts) for _, m in mole_layers(model))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits, rtol=0, atol=0)
    # per layer: shared A (8 x d_in) + 8 B_i (d_out x 8) per Linear, plus a d_in x 8 soft router
    shapes = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]
    per_layer = sum(8 * i + 8 * 8 * o + 8 * i for i, o in shapes)
    assert parameter_report(model, rep)["trainable"] == 4 * per_layer


def test_bad_rank_is_a_config_error():
    with pytest.raises(MoleConfigError, match="adapter.rank"):
        HydraLoRAExperts(4, 4, num_experts=2, rank=0)


# ---- LoRA+ ----


def test_lora_plus_gives_b_matrices_eta_b_times_the_learning_rate(tiny_cfg):
    cfg = tiny_cfg("method=hmora_lw", "trainer.lr=1e-3")
    model, _, _ = build_mole_model(cfg)
    args = TrainArgs.from_config(cfg.trainer)
    assert args.lora_plus_ratio == 2.0  # the preset's eta_B
    opt = build_optimizer(model, args)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 2e-3]
    names = {id(p): n for n, p in model.named_parameters()}
    rest, b = ({names[id(p)] for p in g["params"]} for g in opt.param_groups)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert b == {n for n in trainable if n.endswith("lora_B")} and b
    assert rest == trainable - b and "mole_task_encoder.e_task" in rest
    # the schedule scales both groups alike: warm-up step 1 of 4 -> lr / 4 and 2 lr / 4
    sched = build_scheduler(opt, TrainArgs(lr=1e-3, warmup_steps=4, lora_plus_ratio=2.0), total_steps=10)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2.5e-4, 5e-4])
    del sched


def test_lora_plus_ratio_one_is_a_single_group(tiny_cfg):
    cfg = tiny_cfg("method=hydralora", "trainer.lr=1e-3")
    model, _, _ = build_mole_model(cfg)
    opt = build_optimizer(model, TrainArgs.from_config(cfg.trainer))
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["lr"] == 1e-3


def test_bad_lora_plus_ratio_names_the_key(tiny_cfg):
    with pytest.raises(MoleConfigError, match="trainer.lora_plus_ratio"):
        TrainArgs.from_config(tiny_cfg("trainer.lora_plus_ratio=0").trainer)
