"""HMoRA's CGJS loss (eq. 9-12): the eager autograd function against the autograd reference and gradcheck."""

from __future__ import annotations

import itertools

import pytest
import torch

from mole.losses.cgjs import _CGJS, cgjs_losses, cgjs_losses_reference


def _probs(r: int, n: int, e: int, seed: int, scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(scale * torch.randn(r, n, e, generator=g, dtype=torch.float64), dim=-1)


# scales: peaked rows (certainty below the floor: the certainty clamp blocks the gradient), flat rows, mixed
CASES = list(itertools.product([0.3, 3.0, 8.0], ["mean", "per_row"], [True, False], [(1.0, 0.4), (0.7, 0.2)]))


@pytest.mark.parametrize("scale, floor, weighted, gammas", CASES)
def test_cgjs_function_equals_the_reference(scale, floor, weighted, gammas):
    probs = _probs(3, 40, 8, 0, scale).float()
    w = (torch.arange(40) % 7 != 0) if weighted else None
    a, b = probs.clone().requires_grad_(), probs.clone().requires_grad_()
    fast = cgjs_losses(a, w, *gammas, floor)
    ref = cgjs_losses_reference(b, w, *gammas, floor)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    up = torch.tensor([1.0, -2.0, 0.5])
    (fast * up).sum().backward()
    (ref * up).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
    assert bool((ref > 0).any()) == bool(a.grad.abs().sum() > 0)  # a non-zero loss has a gradient here


@pytest.mark.parametrize("floor, weighted", list(itertools.product([False, True], [True, False])))
def test_cgjs_function_gradcheck(floor, weighted):
    # float64; rows spread enough that no clamp sits at its bound (gradcheck steps would cross it)
    probs = _probs(2, 6, 4, 1, 1.5).requires_grad_()
    w = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0], dtype=torch.float64) if weighted else None
    loss = _CGJS.apply(probs, w, 1.0, 0.4, floor)
    assert bool((loss > 0).all()) and torch.autograd.grad(loss.sum(), probs)[0].abs().sum() > 0
    assert torch.autograd.gradcheck(lambda p: _CGJS.apply(p, w, 1.0, 0.4, floor), (probs,))
    assert torch.autograd.gradcheck(lambda p: _CGJS.apply(p, w, 0.9, 0.9, floor), (probs,))  # certainty above floor


def test_cgjs_function_without_real_rows_is_zero_with_zero_gradient():
    probs = _probs(2, 5, 4, 2, 1.0).float().requires_grad_()
    loss = cgjs_losses(probs, torch.zeros(5))
    assert torch.equal(loss, torch.zeros(2))
    loss.sum().backward()
    assert torch.equal(probs.grad, torch.zeros_like(probs))
