"""Top-k routing that leaves ``softmax(logits)`` to be computed where read: the kept weights' autograd function
(``_KeptSoftmax``) against autograd in float64, probabilities computed lazily (one tensor for the output and
its balance decision), and the balance loss's one softmax per width against the per-decision loss."""

from __future__ import annotations

import pytest
import torch

from mole.losses.routing import balance_loss, indexed_slots_balance
from mole.routers.base import BalanceStats, RouterOutput, _KeptSoftmax, chosen_mask, keep_top_k
from mole.routers.topk import TopKRouter


@pytest.mark.parametrize("m,k", [(8, 2), (4, 1), (6, 6)])
def test_kept_softmax_matches_autograd(m, k):
    torch.manual_seed(m + k)
    logits = torch.randn(9, m, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, m, dtype=torch.float64)
    gates, index = _KeptSoftmax.apply(logits, k)
    ref, selected = keep_top_k(torch.softmax(logits, dim=-1).unsqueeze(0), k, "sum")  # 3-d: the plain products
    torch.testing.assert_close(gates, ref[0])
    assert torch.equal(chosen_mask(index, logits), selected[0])
    (grad,) = torch.autograd.grad((gates * w).sum(), logits)
    (ref_grad,) = torch.autograd.grad((ref[0] * w).sum(), logits)
    torch.testing.assert_close(grad, ref_grad)
    assert torch.autograd.gradcheck(lambda z: _KeptSoftmax.apply(z, k)[0], (logits,))


def test_lazy_probs_are_one_tensor_and_equal_softmax():
    logits = torch.randn(5, 4, dtype=torch.float64)
    stats = BalanceStats(None, None, 2, index=logits.topk(2, dim=-1).indices, logits=logits)
    out = RouterOutput(gates=torch.zeros(5, 4), probs=None, logits=logits, balance=[stats])
    assert not stats.has_probs()
    torch.testing.assert_close(out.probs, torch.softmax(logits, dim=-1))
    assert stats.has_probs() and out.probs is stats.probs and out.distributions()[0].probs is stats.probs
    given = torch.full((5, 4), 0.25)
    assert RouterOutput(gates=given, probs=given, logits=logits).probs is given


@pytest.mark.parametrize("padded", [False, True])
def test_balance_from_logits_equals_the_per_decision_loss(padded):
    # MoLA-like widths: routers of 2, 4 and 8 experts (two of 8), one decision with its probabilities given
    g = torch.Generator().manual_seed(3)
    widths_k = [(8, 2), (2, 1), (4, 2), (8, 2), (4, 2)]
    logits = [torch.randn(11, m, dtype=torch.float64, generator=g, requires_grad=True) for m, _ in widths_k]
    stats = [BalanceStats(None, None, k, index=z.topk(k, dim=-1).indices, logits=z)
             for z, (_, k) in zip(logits, widths_k, strict=True)]
    stats[2] = BalanceStats(torch.softmax(logits[2], dim=-1), None, 2, index=stats[2].index)
    mask = torch.ones(11, dtype=torch.bool)
    if padded:
        mask[[1, 7]] = False
    got = indexed_slots_balance(stats, mask)
    assert all(st.has_probs() for st in stats)
    ref_probs = [torch.softmax(z, dim=-1) for z in logits]
    ref = sum(balance_loss(BalanceStats(p, chosen_mask(st.index, p), st.k), mask)
              for p, st in zip(ref_probs, stats, strict=True))
    torch.testing.assert_close(got, ref)
    for st, p in zip(stats, ref_probs, strict=True):
        torch.testing.assert_close(st.probs, p)
    grads = torch.autograd.grad(got, logits)
    ref_grads = torch.autograd.grad(ref, logits)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b)
    assert all(a.abs().max() > 0 for a in grads)


def test_topk_router_eager_equals_reference_path(monkeypatch):
    """The router's eager outputs and gradients (gates and a balance loss) equal those of the path compiled
    code takes (``softmax_top_k``'s plain products)."""
    torch.manual_seed(2)
    router = TopKRouter(16, 6, top_k=2).double()
    x = torch.randn(10, 16, dtype=torch.float64)
    w = torch.randn(10, 6, dtype=torch.float64)

    def run():
        router.zero_grad()
        out = router(x)
        ((out.gates * w).sum() + indexed_slots_balance(out.balance)).backward()
        return out, router.gate.weight.grad.clone()

    out, grad = run()
    assert out.logits is not None and out.balance[0].logits is not None
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    ref, ref_grad = run()
    assert ref.logits is None
    torch.testing.assert_close(out.gates, ref.gates)
    torch.testing.assert_close(out.probs, ref.probs)
    assert torch.equal(out.index, ref.index) and torch.equal(out.selected, ref.selected)
    torch.testing.assert_close(grad, ref_grad)
