"""MoLELinear: parity with peft's LoRA, stacked computation vs a per-expert loop, fresh model = base."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from mole.adapters import LoRAExperts
from mole.bench.loops import lora_reference
from mole.build import build_mole_model
from mole.model.base import build_model
from mole.model.inject import mole_layers
from mole.model.layer import MoLELinear
from mole.routers import (
    CRWRouter,
    DynamicRouter,
    MoRRouter,
    SigmoidRouter,
    SoftRouter,
    ThresholdRouter,
    TopKRouter,
    TopPRouter,
)
from mole.routers.select import Dynamic, Soft, TopK


class _One(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(12, 7)

    def forward(self, x):
        return self.lin(x)


def test_single_expert_equals_peft_lora_outputs_and_gradients():
    torch.manual_seed(0)
    ref = get_peft_model(_One(), LoraConfig(r=4, lora_alpha=8, target_modules=["lin"], lora_dropout=0.0))
    peft_lin = ref.base_model.model.lin
    with torch.no_grad():
        peft_lin.lora_B["default"].weight.normal_()  # a trained-looking B, so the update is not zero
    base = nn.Linear(12, 7)
    base.load_state_dict(peft_lin.base_layer.state_dict())
    ours = MoLELinear(base.requires_grad_(False), LoRAExperts(12, 7, num_experts=1, rank=4, alpha=8), None)
    with torch.no_grad():
        ours.mole_experts.lora_A.copy_(peft_lin.lora_A["default"].weight)
        ours.mole_experts.lora_B.copy_(peft_lin.lora_B["default"].weight)

    x1 = torch.randn(3, 5, 12, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y_ref, y_ours = ref(x1), ours(x2)
    torch.testing.assert_close(y_ours, y_ref)
    w = torch.randn_like(y_ref)  # a non-trivial upstream gradient
    (y_ref * w).sum().backward()
    (y_ours * w).sum().backward()
    torch.testing.assert_close(ours.mole_experts.lora_A.grad, peft_lin.lora_A["default"].weight.grad)
    torch.testing.assert_close(ours.mole_experts.lora_B.grad, peft_lin.lora_B["default"].weight.grad)
    torch.testing.assert_close(x2.grad, x1.grad)


ROUTERS = {
    "soft": lambda d, e: SoftRouter(d, e),
    "topk": lambda d, e: TopKRouter(d, e, top_k=2),
    "mor": lambda d, e: MoRRouter(d, e, n_routers=3, selection=partial(TopK, top_k=2)),
    "mor_soft": lambda d, e: MoRRouter(d, e, n_routers=2, selection=Soft),
    "crw": lambda d, e: CRWRouter(d, e, n_routers=2, selection=partial(TopK, top_k=2)),
    "topp": lambda d, e: TopPRouter(d, e, top_p=0.6),
    "dynamic": lambda d, e: DynamicRouter(d, e),
    "sigmoid": lambda d, e: SigmoidRouter(d, e),
    "threshold": lambda d, e: ThresholdRouter(d, e, tau_max=0.5),
    "mor_dynamic": lambda d, e: MoRRouter(d, e, n_routers=2, selection=Dynamic),
}


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_stacked_experts_equal_the_per_expert_loop(router):
    torch.manual_seed(1)
    experts = LoRAExperts(16, 24, num_experts=6, rank=4, alpha=8)
    with torch.no_grad():
        experts.lora_B.normal_()
    r = ROUTERS[router](16, 6)
    x = torch.randn(40, 16)
    gates = r(x).gates
    torch.testing.assert_close(experts(x, gates), lora_reference(experts, x, gates), rtol=1e-5, atol=1e-5)
    # and gradients agree too
    experts.zero_grad()
    experts(x, gates.detach()).square().sum().backward()
    g_stacked = (experts.lora_A.grad.clone(), experts.lora_B.grad.clone())
    experts.zero_grad()
    lora_reference(experts, x, gates.detach()).square().sum().backward()
    # fp32 summation order differs between the two; tolerate rounding relative to the gradients' scale
    for got, want in zip(g_stacked, (experts.lora_A.grad, experts.lora_B.grad), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))


def test_sparse_gates_give_zero_contribution_from_unchosen_experts():
    experts = LoRAExperts(8, 8, num_experts=3, rank=2)
    with torch.no_grad():
        experts.lora_B.normal_()
    x = torch.randn(5, 8)
    only_first = torch.tensor([[1.0, 0.0, 0.0]]).expand(5, 3)
    single = LoRAExperts(8, 8, num_experts=1, rank=2)
    with torch.no_grad():
        single.lora_A.copy_(experts.lora_A[:2])
        single.lora_B.copy_(experts.lora_B[:, :2])
    torch.testing.assert_close(experts(x, only_first), single(x))


@pytest.mark.parametrize(
    "overrides",
    [
        # every preset: tests/unit/conf/test_presets.py
        ["router=topk", "experts=uniform_8", "router.renorm=softmax"],
        ["router=mor", "router.n_routers=4", "router.main_top_k=2"],
    ],
)
def test_fresh_mole_model_gives_exactly_the_base_logits(tiny_cfg, overrides):
    cfg = tiny_cfg(*overrides)
    base, _ = build_model(cfg.model, seed=cfg.seed)
    model, _, _ = build_mole_model(cfg)
    assert mole_layers(model), "nothing was injected"
    ids = torch.randint(0, 1000, (2, 17))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)
