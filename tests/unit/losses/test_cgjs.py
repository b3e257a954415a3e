"""HMoRA's CGJS auxiliary loss (eq. 10-13) against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from mole.losses import CGJSLoss, cgjs_loss
from mole.routers.base import GateDist, RouterOutput
from mole.utils.errors import MoleConfigError

E = 8
LOG_E = math.log(E)


def _one_hot(idx: list[int], e: int = E) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(idx), e).float()


def test_uniform_gates_give_balance_and_certainty_log_e():
    # balance = log E, certainty = log E: CGJS = min(logE, 1 logE) - max(logE, 0.4 logE) = 0
    # L = (1 - 0.4) logE / logE = 0.6
    probs = torch.full((5, E), 1.0 / E)
    assert cgjs_loss(probs).item() == pytest.approx(0.6, abs=1e-6)


def test_one_hot_gates_spread_evenly_give_zero():
    # balance = log E, certainty = 0 -> floored at 0.4 log E: CGJS = 0.6 log E, L = 0
    probs = _one_hot(list(range(E)) * 2)
    assert cgjs_loss(probs).item() == pytest.approx(0.0, abs=1e-6)


def test_every_token_on_the_same_expert_gives_one():
    # balance = 0, certainty floored at 0.4 log E: CGJS = -0.4 log E, L = (0.6 + 0.4) log E / log E = 1
    probs = _one_hot([3] * 6)
    assert cgjs_loss(probs).item() == pytest.approx(1.0, abs=1e-6)


def test_gamma_c_zero_and_collapsed_routing():
    # gamma_c = 0: certainty of one-hot gates counts as 0; all on one expert: CGJS = 0, L = 1 logE / logE
    assert cgjs_loss(_one_hot([1] * 4), gamma_c=0.0).item() == pytest.approx(1.0, abs=1e-6)
    # gamma_b = 0.5: balance capped at 0.5 log E; uniform one-hot spread: CGJS = 0.5 - 0.4, L = max(0.1 - 0.1, 0)
    assert cgjs_loss(_one_hot(list(range(E))), gamma_b=0.5).item() == pytest.approx(0.0, abs=1e-6)


def test_two_experts_by_hand():
    # rows [1, 0] and [.5, .5]: mean [.75, .25]
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    balance = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))  # 0.5623
    certainty = (0.0 + math.log(2)) / 2  # 0.3466 > 0.4 log 2 = 0.2773
    cgjs = min(balance, math.log(2)) - max(certainty, 0.4 * math.log(2))
    expected = max(0.6 * math.log(2) - cgjs, 0) / math.log(2)  # 0.2887
    assert cgjs_loss(probs).item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.28872, abs=1e-4)


def test_padding_rows_are_excluded_from_token_routers_only():
    real = _one_hot(list(range(E)))  # evenly spread: loss 0
    padded = torch.cat([real, _one_hot([0] * 8)])  # padding rows all on expert 0 would unbalance it
    mask = torch.tensor([True] * 8 + [False] * 8)
    out = RouterOutput(gates=padded, probs=padded)
    loss = CGJSLoss()
    assert loss([out], mask).item() == pytest.approx(0.0, abs=1e-6)
    assert loss([out], None).item() > 0.1  # the same rows counted: the test can fail
    # a task router's rows are sequences: the token mask does not apply to them
    task = RouterOutput(gates=padded, probs=padded, dists=[GateDist(_one_hot([2, 2]), "task", "sequence")])
    assert loss([task], mask).item() == pytest.approx(1.0, abs=1e-6)


def test_term_sums_over_token_and_task_routers_and_can_skip_task_routers():
    uniform = torch.full((4, E), 1.0 / E)
    collapsed = _one_hot([5, 5])
    hybrid = RouterOutput(
        gates=uniform, probs=uniform,
        dists=[GateDist(uniform, "token", "token"), GateDist(collapsed, "task", "sequence")],
    )
    token_only = RouterOutput(gates=uniform, probs=uniform)
    assert CGJSLoss()([hybrid, token_only]).item() == pytest.approx(0.6 + 1.0 + 0.6, abs=1e-6)
    assert CGJSLoss(task_routers=False)([hybrid, token_only]).item() == pytest.approx(0.6 + 0.6, abs=1e-6)
    assert CGJSLoss().weight == 0.003 and CGJSLoss.name == "cgjs"
    assert CGJSLoss()([]).item() == 0.0


def test_loss_pushes_towards_certain_and_balanced_routing():
    logits = torch.zeros(6, E, requires_grad=True)
    cgjs_loss(torch.softmax(logits + 0.01 * torch.randn(6, E), -1)).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs, key", [({"gamma_c": 1.5}, "gamma_c"), ({"weight": -1}, "weight"),
                                         ({"task_routers": "no"}, "task_routers")])
def test_bad_settings_name_the_key(kwargs, key):
    with pytest.raises(MoleConfigError, match=f"loss.cgjs.{key}"):
        CGJSLoss(**kwargs)


def test_stacked_routers_match_one_router_at_a_time_with_padding_and_gradients():
    """CGJSLoss stacks routers of equal shape (and weights padding out): the same value and gradients as
    cgjs_loss on each router's real rows."""
    from mole.losses.cgjs import cgjs_losses

    torch.manual_seed(3)
    logits = [torch.randn(6, e, requires_grad=True) for e in (8, 8, 4, 8)]  # token routers, two expert counts
    task_logits = [torch.randn(2, 8, requires_grad=True) for _ in range(2)]  # task routers: one row per sequence
    mask = torch.tensor([True, True, False, True, False, True])
    outs = [RouterOutput(gates=lg.softmax(-1), probs=lg.softmax(-1)) for lg in logits]
    outs += [RouterOutput(gates=lg.softmax(-1), probs=lg.softmax(-1), dists=[GateDist(lg.softmax(-1), "task", "sequence")])
             for lg in task_logits]
    got = CGJSLoss(weight=1.0, gamma_c=0.1)(outs, mask)
    want = sum(cgjs_loss(lg.softmax(-1)[mask], 1.0, 0.1) for lg in logits)
    want = want + sum(cgjs_loss(lg.softmax(-1), 1.0, 0.1) for lg in task_logits)
    torch.testing.assert_close(got, want)
    leaves = [*logits, *task_logits]
    g_got, g_want = torch.autograd.grad(got, leaves), torch.autograd.grad(want, leaves)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b)
    assert all(g.abs().sum() > 0 for g in g_got)  # every router gets a gradient
    # no real row at all: 0, as cgjs_loss of an empty set
    none = cgjs_losses(torch.stack([lg.softmax(-1) for lg in logits[:2]]), torch.zeros(6, dtype=torch.bool))
    assert torch.equal(none, torch.zeros(2))
