"""The balance loss of routing decisions that carry their chosen columns (``index``) against the per-decision
formula: one set of operations over decisions of any width and k gives the same value and gradients, with
padding rows, sequence rows and ``reduce=mean``; the kept mask built from an index on first read."""

from __future__ import annotations

import pytest
import torch

from mole.losses.routing import BalanceLoss, balance_loss, indexed_slots_balance
from mole.routers.base import BalanceStats, RouterOutput, chosen_mask, keep_top_k
from mole.routers.topk import TopKRouter


def _decisions(widths_k, rows, level="token", seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = [torch.randn(rows, m, dtype=torch.float64, generator=g, requires_grad=True) for m, _ in widths_k]
    stats = []
    for z, (_, k) in zip(logits, widths_k, strict=True):
        probs = torch.softmax(z, dim=-1)
        stats.append(BalanceStats(probs, None, k, level, index=probs.topk(k, dim=-1).indices))
    return logits, stats


@pytest.mark.parametrize("padded", [False, True])
def test_indexed_balance_equals_the_sum_of_per_decision_losses(padded):
    # MoLA-like widths (2 to 8 experts) and two values of k, token rows with or without padding
    logits, stats = _decisions([(2, 1), (4, 2), (8, 2), (6, 2), (8, 2), (3, 1)], rows=11)
    mask = torch.ones(11, dtype=torch.bool)
    if padded:
        mask[[0, 4, 9]] = False
    got = indexed_slots_balance(stats, mask)
    ref = sum(balance_loss(BalanceStats(st.probs, chosen_mask(st.index, st.probs), st.k), mask) for st in stats)
    torch.testing.assert_close(got, ref)
    grads = torch.autograd.grad(got, logits, retain_graph=True)  # the softmaxes are shared with ref
    ref_grads = torch.autograd.grad(ref, logits)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b)
    assert any(a.abs().max() > 0 for a in grads)


def test_indexed_balance_mixes_token_and_sequence_rows_and_counts_no_padding_row():
    _, tok = _decisions([(4, 2), (4, 2)], rows=6, seed=1)
    _, seq = _decisions([(4, 1)], rows=2, level="sequence", seed=2)
    mask = torch.tensor([True, True, False, True, False, True])
    got = indexed_slots_balance([*tok, *seq], mask)
    ref = sum(balance_loss(BalanceStats(st.probs, st.selected, st.k, st.level), mask) for st in [*tok, *seq])
    torch.testing.assert_close(got, ref)
    # no real row: every count is 0, and so is the loss (no division by zero)
    assert indexed_slots_balance(tok, torch.zeros(6, dtype=torch.bool)).item() == 0.0


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_balance_loss_term_is_the_same_with_or_without_indices(reduce):
    _, stats = _decisions([(8, 2), (2, 1), (8, 2)], rows=9, seed=3)
    mask = torch.tensor([True] * 7 + [False] * 2)
    with_index = [RouterOutput(gates=st.probs, probs=st.probs, balance=[st]) for st in stats]
    plain = [RouterOutput(gates=st.probs, probs=st.probs, balance=[BalanceStats(st.probs, st.selected.clone(), st.k)])
             for st in stats]
    term = BalanceLoss(weight=0.5, reduce=reduce)
    torch.testing.assert_close(term(with_index, mask), term(plain, mask))


def test_the_kept_mask_is_built_from_the_index_on_first_read():
    torch.manual_seed(0)
    router = TopKRouter(6, 5, top_k=2)
    x = torch.randn(7, 6)
    out = router(x)
    assert out.index is not None and out.index.shape == (7, 2)
    _, ref_selected = keep_top_k(out.probs, 2, "sum")
    assert torch.equal(out.selected, ref_selected)
    assert torch.equal(out.balance[0].selected, ref_selected)
    assert out.selected is out.selected  # built once
    given = torch.zeros(7, 5, dtype=torch.bool)
    assert BalanceStats(out.probs, given, 2, index=out.index).selected is given  # a given mask stands
