"""DynMoLE's Tsallis entropy loss (eq. 19) against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY

from mole.build import build_aux_losses
from mole.config import compose_config
from mole.losses import TsallisLoss
from mole.routers import DynamicRouter, RouterOutput
from mole.utils.errors import MoleConfigError


def _out(probs):
    p = torch.tensor(probs)
    return RouterOutput(gates=p, probs=p)


def test_tsallis_loss_by_hand_padding_excluded_and_summed_over_routers():
    # q = 2: S = 1 - sum p^2. Router 1: [.5, .5] -> 0.5, [1, 0] -> 0, [.25, .75] -> 1 - (.0625 + .5625) = 0.375
    # (padding). Router 2: [.5, .25, .25] -> 0.625 on every token.
    r1 = _out([[0.5, 0.5], [1.0, 0.0], [0.25, 0.75]])
    r2 = _out([[0.5, 0.25, 0.25]] * 3)
    loss = TsallisLoss(weight=0.01, q=2.0)
    mask = torch.tensor([True, True, False])
    assert loss([r1, r2], mask).item() == pytest.approx((0.5 + 0.0) / 2 + 0.625)
    assert loss([r1], None).item() == pytest.approx((0.5 + 0.0 + 0.375) / 3)
    assert loss.weight == 0.01 and loss.name == "tsallis"


def test_tsallis_loss_at_q1_is_the_shannon_entropy():
    assert TsallisLoss(q=1.0)([_out([[0.5, 0.5, 0.0]])]).item() == pytest.approx(math.log(2))


def test_tsallis_loss_without_routers_or_real_tokens_is_zero():
    assert TsallisLoss()([]).item() == 0.0
    assert TsallisLoss()([_out([[0.5, 0.5]])], torch.tensor([False])).item() == 0.0


def test_tsallis_loss_gradient_reaches_the_router_and_lowers_the_entropy():
    torch.manual_seed(0)
    router = DynamicRouter(8, 4)
    x = torch.randn(16, 8)
    loss = TsallisLoss(q=1.1)
    before = loss([router(x)]).item()
    opt = torch.optim.SGD(router.parameters(), lr=1.0)
    for _ in range(5):
        opt.zero_grad()
        loss([router(x)]).backward()
        assert router.gate.weight.grad.abs().sum() > 0
        opt.step()
    assert loss([router(x)]).item() < before  # minimising it makes the router more certain


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"weight": -1.0}, "loss.tsallis.weight must be a non-negative number"),
        ({"q": 0}, "loss.tsallis.q .* must be a positive number"),
        ({"q": -0.5}, "loss.tsallis.q .* must be a positive number"),
    ],
)
def test_tsallis_loss_bad_values_name_the_key(kw, message):
    with pytest.raises(MoleConfigError, match=message):
        TsallisLoss(**kw)


def test_tsallis_config_follows_the_router_q():
    losses = build_aux_losses(compose_config([*TINY, "router=dynamic", "router.q=1.3", "loss=[balance,tsallis]"]))
    assert set(losses) == {"balance", "tsallis"}
    assert losses["tsallis"].q == 1.3 and losses["tsallis"].weight == 0.01  # beta; alpha is balance's weight
    assert build_aux_losses(compose_config([*TINY, "router=topk", "loss=[tsallis]"]))["tsallis"].q == 1.1
