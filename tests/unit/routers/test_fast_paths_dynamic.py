"""DynMoLE's eager fast paths against their autograd references, in float64: the entropy-switched
selection (:class:`mole.routers.select._DynamicGates`, eq. 17-18) and the grouped Tsallis loss (eq. 19)."""

from __future__ import annotations

import itertools

import pytest
import torch

from mole.losses import TsallisLoss
from mole.losses.tsallis import mean_tsallis_entropy, row_tsallis_entropy
from mole.routers import RouterOutput
from mole.routers.select import _DynamicGates, dynamic_select, dynamic_select_reference


def _probs(n: int = 64, m: int = 6, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(scale * torch.randn(n, m, generator=g, dtype=torch.float64), dim=-1)


OPTIONS = list(itertools.product([True, False], [True, False], [True, False]))  # normalized, crossing, renormalize


@pytest.mark.parametrize("normalized, crossing, renormalize", OPTIONS)
@pytest.mark.parametrize("q", [1.1, 2.0, 0.5, 1.0])
def test_dynamic_gates_equal_the_reference_values_and_gradients(q, normalized, crossing, renormalize):
    probs = _probs()
    entropy = row_tsallis_entropy(probs, q, normalized)
    threshold = float(entropy.median())  # about half the rows soft, half top-p
    args = (q, threshold, 0.75, 2, normalized, crossing, renormalize)
    ref_in, fast_in = probs.clone().requires_grad_(), probs.clone().requires_grad_()
    ref_g, ref_s = dynamic_select_reference(ref_in, *args)
    fast_g, fast_s = dynamic_select(fast_in, *args)
    assert torch.equal(fast_s, ref_s)
    soft = int((entropy > threshold).sum())
    assert 0 < soft < probs.shape[0]  # both branches are exercised
    torch.testing.assert_close(fast_g, ref_g, rtol=0, atol=1e-15)
    up = torch.randn_like(probs)
    (ref_g * up).sum().backward()
    (fast_g * up).sum().backward()
    torch.testing.assert_close(fast_in.grad, ref_in.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("renormalize", [True, False])
def test_dynamic_gates_gradcheck(renormalize):
    probs = _probs(n=12, m=5, seed=1).requires_grad_()
    # the choices are piecewise constant in probs: gradcheck's small steps stay inside one piece
    assert torch.autograd.gradcheck(
        lambda p: _DynamicGates.apply(p, 1.1, 0.8, 0.75, 2, True, True, renormalize)[0], (probs,))


def test_dynamic_gates_keep_everything_at_top_p_one_and_min_k_m():
    probs = _probs(n=8, m=4)
    for top_p, k in ((1.0, 1), (0.5, 4)):
        g, s = dynamic_select(probs, 1.1, 2.0, top_p, k, False)
        assert bool(s.all())
        torch.testing.assert_close(g, probs)


def test_grouped_tsallis_loss_equals_the_per_router_means():
    # two shapes (6 and 4 experts) and padding; the per-router loop of eq. 19 as the reference
    outs = [_probs(32, 6, s) for s in range(3)] + [_probs(32, 4, s) for s in range(3, 5)]
    mask = torch.arange(32) % 5 != 0
    for reduce, normalized, q, m in itertools.product(("sum", "mean", "pooled"), (False, True), (1.1, 1.0),
                                                       (mask, None)):
        ref_in = [p.clone().requires_grad_() for p in outs]
        fast_in = [p.clone().requires_grad_() for p in outs]
        per = [mean_tsallis_entropy(p, q, m, normalized) for p in ref_in]
        ref = torch.stack(per).sum()
        if reduce == "mean":
            ref = ref / len(per)
        elif reduce == "pooled":  # every router has the same rows: the mean of the per-router means
            ref = ref / len(per)
        fast = TsallisLoss(q=q, normalized=normalized, reduce=reduce)(
            [RouterOutput(gates=p, probs=p) for p in fast_in], m)
        tol = 1e-6  # the entropies are computed in fp32 (tsallis_entropy casts), summed in another order
        torch.testing.assert_close(fast, ref, rtol=tol, atol=0)
        ref.backward()
        fast.backward()
        for a, b in zip(fast_in, ref_in, strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=tol, atol=tol * 1e-3)
