"""ExpertDropout (mole/utils/dropout.py): nn.Dropout's distribution from 16-bit random lanes on the CPU."""

from __future__ import annotations

import math

import pytest
import torch

from mole.utils.dropout import ExpertDropout, keep_mask, quantized_drop_prob


def test_quantized_drop_probability_is_p_rounded_to_16_bits_or_none():
    assert quantized_drop_prob(0.05) == 3277 / 65536
    assert quantized_drop_prob(0.1) == 6554 / 65536
    assert quantized_drop_prob(0.5) == 0.5
    assert abs(quantized_drop_prob(0.05) - 0.05) <= 2**-17
    assert quantized_drop_prob(0.001) is None  # 65.536 -> 66: 0.7% off, the float path is used
    assert quantized_drop_prob(0.0) is None and quantized_drop_prob(1.0) is None


@pytest.mark.parametrize("p", [0.05, 0.1, 0.3, 0.001])
def test_drop_rate_values_and_mean(p):
    torch.manual_seed(0)
    drop = ExpertDropout(p).train()
    x = torch.ones(1000, 1003)  # numel not a multiple of 4: the last 64-bit word is used in part
    y = drop(x)
    q = quantized_drop_prob(p) or p
    scale = 1.0 / (1.0 - q)
    dropped = y == 0
    assert torch.all(dropped | torch.isclose(y, torch.tensor(scale)))  # 0 or exactly the scaled input
    n = x.numel()
    sigma = math.sqrt(q * (1 - q) / n)
    assert abs(dropped.float().mean().item() - q) < 5 * sigma
    assert abs(y.mean().item() - 1.0) < 5 * sigma * scale  # E[dropout(x)] = x


def test_neighbouring_elements_are_dropped_independently():
    """Four elements share a 64-bit word; each pair of them (and of neighbouring words) must be independent."""
    torch.manual_seed(1)
    p = 0.3
    q = quantized_drop_prob(p)
    dropped = (keep_mask((4_000_000,), p) == 0).view(-1, 8).float()  # two words per row
    n = dropped.shape[0]
    for a in range(8):
        for b in range(a + 1, 8):
            both = (dropped[:, a] * dropped[:, b]).mean().item()
            assert abs(both - q * q) < 5 * math.sqrt(q * q * (1 - q * q) / n), (a, b)


def test_gradient_is_the_mask_times_the_scale():
    torch.manual_seed(2)
    drop = ExpertDropout(0.1).train()
    x = torch.randn(64, 33, requires_grad=True)
    y = drop(x)
    g = torch.randn_like(y)
    y.backward(g)
    scale = 1.0 / (1.0 - quantized_drop_prob(0.1))
    kept = (y != 0).float()
    torch.testing.assert_close(x.grad, g * kept * scale)
    torch.testing.assert_close(y, x.detach() * kept * scale)


def test_eval_mode_and_p_zero_are_the_identity_and_seeds_reproduce():
    x = torch.randn(8, 16)
    assert ExpertDropout(0.1).eval()(x) is x
    assert ExpertDropout(0.0).train()(x) is x
    drop = ExpertDropout(0.1).train()
    torch.manual_seed(3)
    a = drop(x)
    torch.manual_seed(3)
    b = drop(x)
    torch.manual_seed(4)
    c = drop(x)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_half_precision_input_keeps_its_dtype_and_rate():
    torch.manual_seed(5)
    x = torch.ones(400, 500, dtype=torch.bfloat16)
    y = ExpertDropout(0.2).train()(x)
    assert y.dtype == torch.bfloat16
    assert abs((y == 0).float().mean().item() - 0.2) < 0.005


def test_torch_compile_traces_it_in_one_graph():
    # the 16-bit draw (random_ over the int64 range) breaks a dynamo graph; traced code takes F.dropout
    drop = ExpertDropout(0.1).train()
    f = torch.compile(lambda x: drop(x) * 2.0, backend="eager", fullgraph=True)
    torch.manual_seed(0)
    y = f(torch.ones(128, 64))
    kept = y != 0
    assert 0.87 < kept.float().mean().item() < 0.93
    assert torch.allclose(y[kept], torch.full_like(y[kept], 2.0 / 0.9))
