"""MixLoRA's pair activations in one autograd function (``_PairHidden``): its backward is the derivative of
its forward (gradcheck in float64, with and without a dropout mask); in training with dropout the block
equals the autograd form (the same mask from the same seed), outputs and gradients; it saves fewer bytes
for the backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mole.adapters.ffn import FFNLoRAExperts, _PairHidden
from mole.memory import SavedTensorAccount
from mole.routers.topk import TopKRouter
from tests.conftest import assert_same_outputs_and_grads


@pytest.mark.parametrize("with_mask", [False, True])
def test_pair_hidden_passes_gradcheck(with_mask):
    g = torch.Generator().manual_seed(0)
    n, k, i, er = 3, 2, 5, 4
    args = [torch.randn(n, k, i, dtype=torch.float64, generator=g, requires_grad=True),
            torch.randn(n, k, i, dtype=torch.float64, generator=g, requires_grad=True),
            torch.rand(n, k, dtype=torch.float64, generator=g, requires_grad=True),
            torch.randn(er, i, dtype=torch.float64, generator=g, requires_grad=True)]
    keep = (torch.rand(n, k, i, dtype=torch.float64, generator=g) > 0.3) / 0.7 if with_mask else None
    assert torch.autograd.gradcheck(lambda *t: _PairHidden.apply(*t, keep), args)


class _UnrecognisedSiLU(torch.nn.Module):
    """SiLU that the block does not recognise as such: it takes the autograd form."""

    def forward(self, t):
        return F.silu(t)


def _block(dropout: float):
    from tests.unit.adapters.test_adapters_blocks import _layer

    torch.manual_seed(5)
    layer = _layer(hidden=8, heads=2, kv_heads=1, inter=12)
    experts = FFNLoRAExperts(layer, num_experts=4, rank=2, alpha=4.0, dropout=dropout)
    experts.router = TopKRouter(8, 4, top_k=2)
    experts.attach(layer)
    with torch.no_grad():
        for b in (experts.gate_B, experts.up_B, experts.down_B):
            b.normal_(std=0.5)
    return layer.train(), experts


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_pair_function_equals_the_autograd_form_in_training(dropout):
    layer, experts = _block(dropout)
    x = torch.randn(2, 5, 8, requires_grad=True)
    torch.manual_seed(11)
    out = layer.mlp(x)
    act = layer.mlp.act_fn
    layer.mlp.act_fn = _UnrecognisedSiLU()
    torch.manual_seed(11)
    ref = layer.mlp(x)
    layer.mlp.act_fn = act
    assert_same_outputs_and_grads(out, ref, [x, *experts.parameters()])
    if dropout:  # the mask really acted
        layer.eval()
        assert not torch.allclose(out, layer.mlp(x))


def test_pair_function_saves_fewer_bytes_for_the_backward():
    layer, experts = _block(0.25)
    x = torch.randn(2, 16, 8, requires_grad=True)
    saved = []
    for act in (layer.mlp.act_fn, _UnrecognisedSiLU()):
        layer.mlp.act_fn = act
        account = SavedTensorAccount.for_model(layer)
        with account():
            layer.mlp(x)
        saved.append(sum(account.sizes.values()))
    # (N, k, I) = 64 x 12 floats each: g, u and the mask against those and silu(g), h and the dropped h
    assert saved[1] - saved[0] >= 3 * 32 * 2 * 12 * 4
