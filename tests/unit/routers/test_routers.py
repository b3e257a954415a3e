"""Routers against small hand-computed examples (not against the code itself)."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from mole.routers import CRWRouter, MoRRouter, SoftRouter, TopKRouter, keep_top_k
from mole.routers.select import Soft, TopK
from mole.utils.errors import MoleConfigError

# Two sub-routers over three experts and a main router, fixed through their weights so that for the
# input x = [1, 0] each softmax gives a chosen distribution:
#   sub-router 1: [0.5, 0.25, 0.25]    sub-router 2: [0.1, 0.2, 0.7]    main: [0.75, 0.25]
SUB1, SUB2, MAIN = [0.5, 0.25, 0.25], [0.1, 0.2, 0.7], [0.75, 0.25]
X = torch.tensor([[1.0, 0.0]])


def _set_mor(router: MoRRouter) -> MoRRouter:
    with torch.no_grad():
        router.sub_routers.weight.zero_()
        router.sub_routers.weight[:, 0] = torch.log(torch.tensor(SUB1 + SUB2))
        if router.main_router is not None:
            router.main_router.weight.zero_()
            router.main_router.weight[:, 0] = torch.log(torch.tensor(MAIN))
    return router


def test_keep_top_k_sum_renorm_by_hand():
    probs = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
    w, sel = keep_top_k(probs, 2, "sum")
    # keep 0.4 and 0.3, divide by 0.7
    torch.testing.assert_close(w, torch.tensor([[0.0, 4 / 7, 0.0, 3 / 7]]))
    assert sel.tolist() == [[False, True, False, True]]


def test_keep_top_k_softmax_renorm_by_hand():
    probs = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
    w, _ = keep_top_k(probs, 2, "softmax")
    e4, e3 = math.exp(0.4), math.exp(0.3)  # HMoRA eq. 15: softmax over the kept probabilities
    torch.testing.assert_close(w, torch.tensor([[0.0, e4 / (e4 + e3), 0.0, e3 / (e4 + e3)]]))


def test_soft_router_is_softmax_of_logits():
    r = SoftRouter(2, 3)
    with torch.no_grad():
        r.gate.weight.copy_(torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]))
    out = r(X)
    z = math.exp(1) + math.exp(2) + math.exp(3)
    torch.testing.assert_close(out.gates, torch.tensor([[math.exp(1) / z, math.exp(2) / z, math.exp(3) / z]]))
    assert out.selected is None and out.balance == []


@pytest.mark.parametrize("k", [1, 2, 3])
def test_topk_router_chooses_k_and_weights_sum_to_one(k):
    r = TopKRouter(16, 5, top_k=k)
    out = r(torch.randn(64, 16))
    assert (out.selected.sum(-1) == k).all()
    assert ((out.gates > 0) == out.selected).all()
    torch.testing.assert_close(out.gates.sum(-1), torch.ones(64))
    # the chosen experts are the k most probable
    assert (out.probs.topk(k, -1).indices.sort(-1).values == out.selected.nonzero()[:, 1].view(64, k)).all()


def test_mor_matches_eq6_by_hand():
    r = _set_mor(MoRRouter(2, 3, n_routers=2, selection=partial(TopK, top_k=2)))
    out = r(X)
    # F' = 0.75 * [0.5, 0.25, 0.25] + 0.25 * [0.1, 0.2, 0.7] = [0.4, 0.2375, 0.3625]
    torch.testing.assert_close(out.probs, torch.tensor([[0.4, 0.2375, 0.3625]]))
    # top-2 = experts 0 and 2, renormalised by 0.7625
    torch.testing.assert_close(out.gates, torch.tensor([[0.4 / 0.7625, 0.0, 0.3625 / 0.7625]]))
    # the balance loss sees the main router's distribution and its top-1 sub-router
    (stats,) = out.balance
    torch.testing.assert_close(stats.probs, torch.tensor([MAIN]))
    assert stats.selected.tolist() == [[True, False]] and stats.k == 1


def test_mor_soft_inner_routing_keeps_all_experts():
    out = _set_mor(MoRRouter(2, 3, n_routers=2, selection=Soft))(X)
    torch.testing.assert_close(out.gates, torch.tensor([[0.4, 0.2375, 0.3625]]))
    assert out.selected is None


def test_mor_main_top_k_keeps_only_the_best_sub_router():
    r = _set_mor(MoRRouter(2, 3, n_routers=2, selection=Soft, main_top_k=1))
    out = r(X)
    # the main router keeps sub-router 1 alone (weight 0.75 / 0.75 = 1)
    torch.testing.assert_close(out.gates, torch.tensor([SUB1]))
    assert out.balance[0].k == 1


def test_crw_weighs_sub_routers_equally_by_hand():
    r = _set_mor(CRWRouter(2, 3, n_routers=2, selection=partial(TopK, top_k=2)))
    assert r.main_router is None
    out = r(X)
    # eq. 7: 0.5 * [0.5, 0.25, 0.25] + 0.5 * [0.1, 0.2, 0.7] = [0.3, 0.225, 0.475]
    torch.testing.assert_close(out.probs, torch.tensor([[0.3, 0.225, 0.475]]))
    torch.testing.assert_close(out.gates, torch.tensor([[0.3 / 0.775, 0.0, 0.475 / 0.775]]))


def test_crw_is_mean_of_independent_sub_routers():
    r = CRWRouter(8, 4, n_routers=3, selection=Soft)
    x = torch.randn(10, 8)
    w = r.sub_routers.weight.view(3, 4, 8)
    expected = sum(torch.softmax(x @ w[j].T, -1) for j in range(3)) / 3
    torch.testing.assert_close(r(x).gates, expected)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: TopKRouter(4, 2, top_k=3), "router.top_k=3 exceeds"),
        (lambda: TopKRouter(4, 2, top_k=0), "router.top_k must be a positive integer"),
        (lambda: TopKRouter(4, 2, top_k=None), "router.top_k must be set"),
        (lambda: TopKRouter(4, 4, renorm="max"), "router.renorm must be one of"),
        (lambda: MoRRouter(4, 4, n_routers=0), "router.n_routers must be a positive integer"),
        (lambda: MoRRouter(4, 4, n_routers=2, main_top_k=3), "router.main_top_k=3 exceeds"),
    ],
)
def test_router_config_errors_name_the_key(make, message):
    with pytest.raises(MoleConfigError, match=message):
        make()
