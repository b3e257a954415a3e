"""The balance loss against hand-computed values (HMoRA eq. 17-19)."""

from __future__ import annotations

import pytest
import torch

from mole.losses import BalanceLoss, balance_loss, lm_loss
from mole.routers import BalanceStats, RouterOutput


def _stats(probs, chosen, k):
    probs = torch.tensor(probs)
    selected = torch.zeros_like(probs, dtype=torch.bool)
    for row, idx in enumerate(chosen):
        selected[row, idx] = True
    return BalanceStats(probs, selected, k)


def test_balance_is_one_at_uniform_routing():
    # 4 tokens, 4 experts, top-2; each expert gets 2 of the 8 slots and mean probability 1/4
    s = _stats([[0.25] * 4] * 4, [[0, 1], [2, 3], [0, 1], [2, 3]], 2)
    assert balance_loss(s).item() == pytest.approx(1.0)


def test_balance_by_hand_when_imbalanced():
    # every token picks experts 0 and 1: F = [1/2, 1/2, 0, 0], P = [0.4, 0.3, 0.2, 0.1]
    s = _stats([[0.4, 0.3, 0.2, 0.1]] * 3, [[0, 1]] * 3, 2)
    assert balance_loss(s).item() == pytest.approx(4 * (0.5 * 0.4 + 0.5 * 0.3))  # 1.4


def test_balance_is_one_whenever_slots_are_uniform_whatever_the_probabilities():
    # F_i = 1/E for every i gives E * sum_i P_i / E = 1, since the P_i sum to 1
    probs = torch.softmax(torch.randn(4, 4), -1).tolist()
    s = _stats(probs, [[0, 1], [2, 3], [0, 1], [2, 3]], 2)
    assert balance_loss(s).item() == pytest.approx(1.0)


def test_balance_grows_as_routing_concentrates():
    # all tokens on experts {0, 1}, with more and more probability on them: 4 * (0.5 p + 0.5 p) = 4 p
    for p in (0.3, 0.4, 0.5):
        rest = (1 - 2 * p) / 2
        s = _stats([[p, p, rest, rest]] * 2, [[0, 1]] * 2, 2)
        assert balance_loss(s).item() == pytest.approx(4 * p)


def test_balance_ignores_padding_tokens():
    s = _stats([[0.25] * 4, [0.25] * 4, [0.4, 0.3, 0.2, 0.1]], [[0, 1], [2, 3], [0, 1]], 2)
    mask = torch.tensor([True, True, False])
    assert balance_loss(s, mask).item() == pytest.approx(1.0)


def test_balance_term_sums_over_routers():
    s = _stats([[0.4, 0.3, 0.2, 0.1]] * 3, [[0, 1]] * 3, 2)
    out = RouterOutput(gates=s.probs, probs=s.probs, selected=s.selected, balance=[s])
    term = BalanceLoss(weight=0.01)
    assert term([out, out]).item() == pytest.approx(2 * 1.4)
    assert term.weight == 0.01


def test_balance_term_is_zero_for_soft_routing():
    p = torch.full((2, 3), 1 / 3)
    with pytest.warns(UserWarning, match="soft routing"):
        assert BalanceLoss()([RouterOutput(gates=p, probs=p)]).item() == 0.0


def test_lm_loss_counts_only_labelled_tokens():
    logits = torch.zeros(1, 4, 5)
    logits[0, 1, 3] = 10.0  # position 1 predicts token 3 (label at position 2)
    labels = torch.tensor([[-100, -100, 3, -100]])
    expected = -torch.log_softmax(logits[0, 1], -1)[3]
    torch.testing.assert_close(lm_loss(logits, labels), expected)


def test_balance_with_a_variable_number_of_slots_per_token():
    # top-p / dynamic / threshold routing: token 1 takes experts {0, 1}, token 2 only {0}: 3 slots,
    # F = [2/3, 1/3, 0, 0], P = [0.4, 0.3, 0.2, 0.1] -> 4 * (2/3 * 0.4 + 1/3 * 0.3) = 4 * 11/30
    s = _stats([[0.4, 0.3, 0.2, 0.1]] * 2, [[0, 1], [0]], None)
    assert balance_loss(s).item() == pytest.approx(44 / 30)


def test_balance_with_variable_slots_and_no_slot_at_all_is_zero():
    s = _stats([[0.5, 0.5]] * 2, [[], []], None)  # threshold routing that kept no expert
    assert balance_loss(s).item() == 0.0


def test_balance_term_stacks_routers_with_the_same_values_and_gradients():
    """BalanceLoss stacks decisions of equal shape, level and k: the same as balance_loss one at a time."""
    torch.manual_seed(5)
    mask = torch.tensor([True, False, True, True, True, False])
    leaves, outs = [], []
    for m, k, level, rows in [(8, 2, "token", 6), (8, 2, "token", 6), (8, 2, "token", 6), (4, 2, "token", 6),
                              (8, None, "token", 6), (8, 1, "sequence", 2), (8, 1, "sequence", 2)]:
        logits = torch.randn(rows, m, requires_grad=True)
        probs = logits.softmax(-1)
        if k is None:
            selected = probs > 0.1  # a variable number of slots per token
        else:
            selected = torch.zeros(rows, m, dtype=torch.bool).scatter(-1, probs.topk(k, -1).indices, True)
        leaves.append(logits)
        outs.append(RouterOutput(gates=probs, probs=probs, balance=[BalanceStats(probs, selected, k, level)]))
    got = BalanceLoss()(outs, mask)
    want = sum(balance_loss(o.balance[0], mask) for o in outs)
    torch.testing.assert_close(got, want)
    g_got, g_want = torch.autograd.grad(got, leaves, retain_graph=True), torch.autograd.grad(want, leaves)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b)
    assert all(g.abs().sum() > 0 for g in g_got)


def test_sum_over_groups_calls_the_term_once_per_key_with_its_members_in_order():
    from mole.losses.routing import sum_over_groups

    seen = []

    def term(key, members):
        seen.append((key, members))
        return torch.tensor(float(sum(members)))

    total = sum_over_groups([1, 2, 3, 4, 5], lambda v: v % 2, term)
    assert seen == [(1, [1, 3, 5]), (0, [2, 4])]
    assert total.item() == 15.0
    assert sum_over_groups([], lambda v: v, term) is None
