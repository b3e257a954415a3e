"""Top-p, Tsallis/dynamic, sigmoid and threshold routing, and MoR's inner selections, against hand values.

Every expected number below was worked out by hand from the paper's formula (comments show the steps).
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from torch import nn

from mole.adapters import LoRAExperts
from mole.model.layer import MoLELinear
from mole.routers import (
    CRWRouter,
    DynamicRouter,
    MoRRouter,
    SigmoidRouter,
    ThresholdRouter,
    TopPRouter,
    dynamic_select,
    keep_top_p,
    max_tsallis_entropy,
    threshold_select,
    tsallis_entropy,
)
from mole.routers.select import Dynamic, Soft, TopK, TopP
from mole.utils.errors import MoleConfigError

T = torch.tensor


def close(actual, expected, **kw):
    torch.testing.assert_close(actual, T(expected, dtype=actual.dtype), **kw)


# ---------------------------------------------------------------- top-p


@pytest.mark.parametrize(
    "p, expected",
    [
        # sorted [0.5, 0.3, 0.15, 0.05]; sums before each rank: 0, 0.5, 0.8, 0.95
        (0.75, [0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]),  # 0.5 < 0.75 keeps rank 1, 0.8 >= 0.75 stops: 2 experts
        (0.8, [0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]),  # 0.5 + 0.3 reaches 0.8 exactly: still 2
        (0.81, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0]),  # 0.8 < 0.81: the third crosses p and is kept
        (0.4, [1.0, 0.0, 0.0, 0.0]),  # the first alone reaches 0.4
        (1.0, [0.5, 0.3, 0.15, 0.05]),  # p = 1 keeps every expert
    ],
)
def test_top_p_keeps_the_smallest_prefix_reaching_p(p, expected):
    w, sel = keep_top_p(T([[0.5, 0.3, 0.15, 0.05]]), p)
    close(w, [expected])
    assert sel.tolist() == [[e > 0 for e in expected]]


def test_top_p_works_on_unsorted_rows_row_by_row():
    probs = T([[0.05, 0.3, 0.5, 0.15], [0.25, 0.25, 0.25, 0.25]])
    w, sel = keep_top_p(probs, 0.75)
    # row 2: uniform, sums before 0, .25, .5, .75 -> 3 experts, the lower indices first (stable order)
    close(w, [[0.0, 0.375, 0.625, 0.0], [1 / 3, 1 / 3, 1 / 3, 0.0]])
    assert sel.sum(-1).tolist() == [2, 3]


def test_top_p_ties_go_to_the_lower_index():
    # sorted 0.4, 0.3 (expert 1), 0.3 (expert 2); sums before: 0, 0.4, 0.7 -> keep 2 with p = 0.6
    w, _ = keep_top_p(T([[0.4, 0.3, 0.3]]), 0.6)
    close(w, [[0.4 / 0.7, 0.3 / 0.7, 0.0]])


def test_top_p_ties_among_many_experts_keep_the_lowest_indices():
    # 64 equal experts, p = 1/4: the first 16 in index order (an unstable sort would scatter them)
    _, sel = keep_top_p(torch.full((1, 64), 1 / 64), 0.25)
    assert sel[0].nonzero().flatten().tolist() == list(range(16))


def test_top_p_prefix_reaching_p_up_to_fp32_rounding_counts():
    # in fp32, 0.45 + 0.35 = 0.79999995 < 0.8: still "reaches" p = 0.8, so 2 experts, not 3
    w, _ = keep_top_p(T([[0.45, 0.35, 0.2]]), 0.8)
    close(w, [[0.45 / 0.8, 0.35 / 0.8, 0.0]])


def test_top_p_rounding_of_a_softmax_row_does_not_add_an_expert():
    # softmax(log [0.5, 0.3, 0.2]) is [0.5, 0.3, 0.2] up to fp32 rounding; 0.5 + 0.3 reaches p = 0.8
    probs = torch.softmax(torch.log(T([[0.5, 0.3, 0.2]])), -1)
    _, sel = keep_top_p(probs, 0.8)
    assert sel.tolist() == [[True, True, False]]


def test_top_p_min_k_floor():
    w, _ = keep_top_p(T([[0.5, 0.3, 0.15, 0.05]]), 0.4, min_k=3)  # top-p keeps 1, the floor 3
    close(w, [[0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0]])


# ---------------------------------------------------------------- Tsallis entropy


def test_tsallis_is_shannon_at_q1_with_zero_log_zero():
    # H([.5, .25, .25]) = .5 ln 2 + 2 * .25 ln 4 = 1.5 ln 2; H([.5, .5, 0]) = ln 2
    close(tsallis_entropy(T([[0.5, 0.25, 0.25], [0.5, 0.5, 0.0]]), 1.0), [1.5 * math.log(2), math.log(2)])


def test_tsallis_at_q2_is_one_minus_sum_of_squares():
    # 1 - (.25 + .0625 + .0625) = 0.625; 1 - (.25 + .25) = 0.5; a one-hot row has entropy 0
    close(tsallis_entropy(T([[0.5, 0.25, 0.25], [0.5, 0.5, 0.0], [0.0, 1.0, 0.0]]), 2.0), [0.625, 0.5, 0.0])


def test_tsallis_tends_to_shannon_as_q_goes_to_1():
    assert tsallis_entropy(T([[0.5, 0.25, 0.25]]), 1.0001).item() == pytest.approx(1.5 * math.log(2), abs=1e-3)


def test_max_tsallis_entropy_by_hand_and_at_the_uniform_row():
    assert max_tsallis_entropy(2, 2.0) == pytest.approx(0.5)  # (1 - 2^-1) / 1
    assert max_tsallis_entropy(4, 1.0) == pytest.approx(math.log(4))
    assert max_tsallis_entropy(6, 1.1) == pytest.approx(1.6404, abs=1e-4)  # (1 - 6^-0.1) / 0.1
    assert tsallis_entropy(torch.full((1, 6), 1 / 6), 1.1).item() == pytest.approx(1.6404, abs=1e-4)


# ---------------------------------------------------------------- dynamic (DynMoLE eq. 17-18)


def test_dynamic_uniform_row_goes_soft_peaked_row_goes_top_p():
    probs = T([[0.25, 0.25, 0.25, 0.25], [0.7, 0.15, 0.1, 0.05]])
    # row 1: S_2 = 1 - 4 / 16 = 0.75 > 0.5 -> soft. row 2: S_2 = 1 - (.49 + .0225 + .01 + .0025) = 0.475
    # -> top-p 0.75: sums before 0, 0.7, 0.85 -> 2 experts, renormalised by 0.85
    gates, sel = dynamic_select(probs, q=2.0, threshold=0.5, top_p=0.75, keep_top_k=1)
    close(gates, [[0.25, 0.25, 0.25, 0.25], [0.7 / 0.85, 0.15 / 0.85, 0.0, 0.0]])
    assert sel.tolist() == [[True] * 4, [True, True, False, False]]


@pytest.mark.parametrize(
    "keep, expected",
    [
        (1, [1.0, 0.0, 0.0, 0.0]),  # top-p 0.75 alone keeps 0.9
        (2, [0.9 / 0.95, 0.05 / 0.95, 0.0, 0.0]),
        (3, [0.9 / 0.98, 0.05 / 0.98, 0.03 / 0.98, 0.0]),
    ],
)
def test_dynamic_keep_top_k_floor(keep, expected):
    # S_2 = 1 - (.81 + .0025 + .0009 + .0004) = 0.1862 <= 0.9 -> the top-p branch
    gates, _ = dynamic_select(T([[0.9, 0.05, 0.03, 0.02]]), q=2.0, threshold=0.9, top_p=0.75, keep_top_k=keep)
    close(gates, [expected])


def test_dynamic_raw_versus_normalised_threshold():
    probs = T([[0.4, 0.3, 0.2, 0.1]])
    # S_2 = 1 - (.16 + .09 + .04 + .01) = 0.7; max S_2 over 4 experts = 1 - 1/4 = 0.75; 0.7 / 0.75 = 0.933
    raw, _ = dynamic_select(probs, q=2.0, threshold=0.9, top_p=0.75, keep_top_k=2)
    normed, _ = dynamic_select(probs, q=2.0, threshold=0.9, top_p=0.75, keep_top_k=2, normalized=True)
    close(raw, [[0.4 / 0.9, 0.3 / 0.9, 0.2 / 0.9, 0.0]])  # 0.7 <= 0.9: top-p (sums before 0, .4, .7, .9)
    close(normed, [[0.4, 0.3, 0.2, 0.1]])  # 0.933 > 0.9: soft


def _gate_rows(router_gate: nn.Linear, rows: list[list[float]], fn=torch.log) -> None:
    """Make ``router_gate(e_j)`` give ``fn(rows[j])`` for the unit input e_j (softmax(log p) = p)."""
    with torch.no_grad():
        router_gate.weight.zero_()
        for j, row in enumerate(rows):
            router_gate.weight[:, j] = fn(T(row))


def test_dynamic_router_with_paper_defaults():
    r = DynamicRouter(2, 4)  # q 1.1, threshold 0.9 (normalised entropy), top_p 0.75, keep_top_k 2
    _gate_rows(r.gate, [[0.25] * 4, [0.9, 0.05, 0.03, 0.02]])
    out = r(torch.eye(2))
    # token 1 uniform: S = (1 - 4^-0.1) / 0.1 = 1.29, the maximum: 1.0 > 0.9 -> soft.
    # token 2: S = (1 - (.9^1.1 + .05^1.1 + .03^1.1 + .02^1.1)) / 0.1 = (1 - 0.9623) / 0.1 = 0.38, 0.29 of the
    # maximum -> top-p
    # keeps 0.9 alone, keep_top_k 2 adds 0.05
    close(out.gates, [[0.25] * 4, [0.9 / 0.95, 0.05 / 0.95, 0.0, 0.0]])
    assert out.selected.sum(-1).tolist() == [4, 2]
    (stats,) = out.balance
    assert stats.k is None and stats.selected.tolist() == out.selected.tolist()


# ---------------------------------------------------------------- sigmoid (Soft MoA eq. 2-3)


def test_sigmoid_router_values():
    r = SigmoidRouter(2, 3)
    _gate_rows(r.gate, [[0.0, math.log(3), -math.log(3)]], fn=lambda t: t)
    out = r(T([[1.0, 0.0]]))
    # sigmoid(0) = 1/2, sigmoid(ln 3) = 3/4, sigmoid(-ln 3) = 1/4: no normalisation (they sum to 1.5)
    close(out.gates, [[0.5, 0.75, 0.25]])
    assert out.selected is None and out.balance == []


# ---------------------------------------------------------------- threshold (Sparse MoA eq. 4-5, AdaMoLE)

SIG = [math.log(4), 0.0, -math.log(9)]  # logits whose sigmoids are 0.8, 0.5, 0.1


def _threshold(gate="sigmoid", rows=None, fn=lambda t: t, **kw) -> ThresholdRouter:
    r = ThresholdRouter(2, 3, gate=gate, **kw)
    _gate_rows(r.gate, rows or [SIG, SIG], fn=fn)
    return r


@pytest.mark.parametrize(
    "tau, expected",
    [(0.6, [0.8, 0.0, 0.0]), (0.5, [0.8, 0.5, 0.0]), (0.05, [0.8, 0.5, 0.1])],  # g_i >= tau keeps g_i
)
def test_fixed_threshold_sigmoid_keeps_the_weight(tau, expected):
    out = _threshold(tau_max=tau, learnable=False)(T([[1.0, 0.0]]))
    close(out.gates, [expected])
    assert out.selected.tolist() == [[e > 0 for e in expected]] and out.balance == []


def test_learnable_threshold_per_token():
    r = _threshold(tau_max=0.8, learnable=True)
    with torch.no_grad():  # tau(x) = 0.8 * sigmoid(w x + b), w = [0, ln 3], b = 0
        r.threshold.weight.copy_(T([[0.0, math.log(3)]]))
        r.threshold.bias.zero_()
    out = r(torch.eye(2))
    # token 1: tau = 0.8 * 1/2 = 0.4 -> keeps 0.8, 0.5; token 2: tau = 0.8 * 3/4 = 0.6 -> keeps 0.8
    close(out.gates, [[0.8, 0.5, 0.0], [0.8, 0.0, 0.0]])


def test_softmax_threshold_renormalises_the_kept_gates():
    p = [[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]]
    out = _threshold("softmax", p, fn=torch.log, tau_max=0.25, learnable=False)(T([[1.0, 0.0]]))
    close(out.gates, [[0.5 / 0.8, 0.3 / 0.8, 0.0]])  # 0.2 < 0.25 dropped, the rest divided by 0.8
    (stats,) = out.balance
    assert stats.k is None
    # AdaMoLE's default tau_max = 1/E = 1/3: only 0.5 passes
    out = _threshold("softmax", p, fn=torch.log, tau_max=None, learnable=False)(T([[1.0, 0.0]]))
    close(out.gates, [[1.0, 0.0, 0.0]])
    # AdaMoLE's code: kept weights g - tau = [0.25, 0.05], renormalised by 0.3
    out = _threshold("softmax", p, fn=torch.log, tau_max=0.25, learnable=False, subtract_threshold=True)(
        T([[1.0, 0.0]])
    )
    close(out.gates, [[5 / 6, 1 / 6, 0.0]])


@pytest.mark.parametrize(
    "gate, rows, fn", [("sigmoid", None, lambda t: t), ("softmax", [[0.5, 0.3, 0.2]] * 2, torch.log)]
)
def test_no_expert_above_the_threshold_gives_zero_gates_and_the_base_output(gate, rows, fn):
    r = _threshold(gate, rows, fn=fn, tau_max=1.0, learnable=False)  # no gate reaches 1
    out = r(T([[1.0, 0.0]]))
    assert out.gates.tolist() == [[0.0, 0.0, 0.0]] and not out.selected.any()
    experts = LoRAExperts(2, 5, num_experts=3, rank=2)
    with torch.no_grad():
        experts.lora_B.normal_()  # a non-zero update, were any expert used
    base = nn.Linear(2, 5)
    layer = MoLELinear(base, experts, r)
    x = torch.randn(4, 2).abs() * T([1.0, 0.0])  # inputs along e_1, where the hand gates hold
    torch.testing.assert_close(layer(x), base(x))


def test_threshold_gradients():
    r = ThresholdRouter(6, 4, gate="softmax", tau_max=None, subtract_threshold=True)
    r(torch.randn(10, 6)).gates.pow(2).sum().backward()
    assert r.gate.weight.grad.abs().sum() > 0 and r.threshold.weight.grad.abs().sum() > 0
    # MoA eq. 4 keeps g_i: the comparison passes nothing to the threshold network (see threshold.py)
    r = ThresholdRouter(6, 4, gate="sigmoid", tau_max=0.5)
    r(torch.randn(10, 6)).gates.pow(2).sum().backward()
    assert r.gate.weight.grad.abs().sum() > 0 and r.threshold.weight.grad is None


# ---------------------------------------------------------------- MoR / CRW with each inner selection

# The hand example of tests/unit/routers/test_routers.py: sub-routers [0.5, 0.25, 0.25], [0.1, 0.2, 0.7], main [0.75, 0.25]
# -> F' = [0.4, 0.2375, 0.3625]; sorted: 0.4 (e0), 0.3625 (e2), 0.2375 (e1); sums before 0, 0.4, 0.7625
SUB, MAIN, X = [0.5, 0.25, 0.25, 0.1, 0.2, 0.7], [0.75, 0.25], T([[1.0, 0.0]])
FP = [0.4, 0.2375, 0.3625]
TOP2 = [0.4 / 0.7625, 0.0, 0.3625 / 0.7625]


def _mor(**kw) -> MoRRouter:
    r = MoRRouter(2, 3, n_routers=2, **kw)
    with torch.no_grad():
        r.sub_routers.weight.zero_()
        r.sub_routers.weight[:, 0] = torch.log(T(SUB))
        r.main_router.weight.zero_()
        r.main_router.weight[:, 0] = torch.log(T(MAIN))
    return r


@pytest.mark.parametrize(
    "kw, expected",
    [
        ({"selection": partial(TopK, top_k=2)}, TOP2),
        ({"selection": Soft}, FP),
        ({"selection": partial(TopP, top_p=0.75)}, TOP2),  # 0.4 < 0.75 keeps e2, 0.7625 stops
        ({"selection": partial(TopP, top_p=0.4)}, [1.0, 0.0, 0.0]),  # 0.4 alone reaches 0.4
        ({"selection": partial(TopP, top_p=0.77)}, FP),  # 0.7625 < 0.77: all three
        # S_2(F') = 1 - (.16 + .05640625 + .13140625) = 0.6521875
        ({"selection": partial(Dynamic, q=2.0, threshold=0.9, normalized_entropy=False)}, TOP2),  # 0.652 <= 0.9: top-p, keep 2
        ({"selection": partial(Dynamic, q=2.0, threshold=0.6, normalized_entropy=False)}, FP),  # 0.652 > 0.6: soft
        # normalised: 0.6521875 / (1 - 1/3) = 0.978 > 0.9: soft
        ({"selection": partial(Dynamic, q=2.0, threshold=0.9, normalized_entropy=True)}, FP),
        ({"selection": partial(Dynamic, q=2.0, threshold=0.9, top_p=0.3, keep_top_k=3)}, FP),
        ({"selection": partial(Dynamic, q=2.0, threshold=0.9, top_p=0.3, keep_top_k=1, normalized_entropy=False)},
         [1.0, 0.0, 0.0]),
    ],
)
def test_mor_inner_selections_by_hand(kw, expected):
    out = _mor(**kw)(X)
    close(out.probs, [FP])
    close(out.gates, [expected])
    if out.selected is not None:
        assert out.selected.tolist() == [[e > 0 for e in expected]]


def test_mor_keep_top_k_defaults_per_selection():
    assert _mor(selection=TopP).selection.keep_top_k == 1 and _mor(selection=Dynamic).selection.keep_top_k == 2


def test_mor_expert_balance_counts_variable_slots():
    out = _mor(selection=partial(TopP, top_p=0.75), expert_balance=True)(X)
    main, experts = out.balance
    assert main.k == 1 and experts.k is None and experts.selected.tolist() == [[True, False, True]]


def test_crw_with_top_p_by_hand():
    r = CRWRouter(2, 3, n_routers=2, selection=partial(TopP, top_p=0.75))
    with torch.no_grad():
        r.sub_routers.weight.zero_()
        r.sub_routers.weight[:, 0] = torch.log(T(SUB))
    out = r(X)
    # F' = [0.3, 0.225, 0.475]; sorted 0.475 (e2), 0.3 (e0): sums before 0, 0.475, 0.775 -> 2 experts
    close(out.gates, [[0.3 / 0.775, 0.0, 0.475 / 0.775]])
    assert out.balance[0].k is None


# ---------------------------------------------------------------- every router: contract and gradients

ROUTERS = {
    "topp": lambda: TopPRouter(8, 5),
    "dynamic": lambda: DynamicRouter(8, 5),
    "dynamic_normalised": lambda: DynamicRouter(8, 5, normalized_entropy=True, threshold=0.95),
    "sigmoid": lambda: SigmoidRouter(8, 5),
    "threshold_sigmoid": lambda: ThresholdRouter(8, 5),
    "threshold_softmax": lambda: ThresholdRouter(8, 5, gate="softmax", tau_max=None),
    "mor_topp": lambda: MoRRouter(8, 5, selection=TopP),
    "mor_dynamic": lambda: MoRRouter(8, 5, selection=Dynamic),
    "crw_dynamic": lambda: CRWRouter(8, 5, selection=Dynamic),
}


@pytest.mark.parametrize("name", list(ROUTERS))
def test_router_contract_and_gradients(name):
    r = ROUTERS[name]()
    with torch.no_grad():
        for p in r.parameters():
            p.mul_(20.0)  # spread the logits so that sparse routers actually drop experts
    x = torch.randn(64, 8)
    out = r(x)
    assert out.gates.shape == out.probs.shape == (64, 5) and out.probs.dtype == torch.float32
    if out.selected is not None:
        assert out.selected.dtype == torch.bool
        assert (out.gates[~out.selected] == 0).all()  # exact zeros for unchosen experts
        assert (out.gates[out.selected] > 0).all()
    out.gates.pow(2).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in r.parameters())


@pytest.mark.parametrize("name", ["topp", "dynamic", "threshold_softmax", "mor_topp"])
def test_sparse_softmax_routers_sum_to_one_and_really_vary_k(name):
    r = ROUTERS[name]()
    with torch.no_grad():
        for p in r.parameters():
            p.mul_(20.0)
    out = r(torch.randn(256, 8))
    torch.testing.assert_close(out.gates.sum(-1), torch.ones(256))
    assert len(set(out.selected.sum(-1).tolist())) > 1  # a variable number of experts per token


# ---------------------------------------------------------------- bad values name the key


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: TopPRouter(4, 4, top_p=0), r"router.top_p must be in \(0, 1\], got 0"),
        (lambda: TopPRouter(4, 4, top_p=1.5), r"router.top_p must be in \(0, 1\], got 1.5"),
        (lambda: TopPRouter(4, 4, keep_top_k=0), "router.keep_top_k must be a positive integer"),
        (lambda: DynamicRouter(4, 4, top_p=1.5), r"router.top_p must be in \(0, 1\]"),
        (lambda: DynamicRouter(4, 2, keep_top_k=3), "router.keep_top_k=3 exceeds the number of experts"),
        (lambda: DynamicRouter(4, 4, q=0), "router.q .* must be a positive number"),
        (lambda: DynamicRouter(4, 4, q=-1.0), "router.q .* must be a positive number"),
        (lambda: DynamicRouter(4, 4, threshold=-0.1), "router.threshold must be a non-negative number"),
        (lambda: ThresholdRouter(4, 4, tau_max=0), r"router.tau_max must be in \(0, 1\]"),
        (lambda: ThresholdRouter(4, 4, tau_max=1.2), r"router.tau_max must be in \(0, 1\]"),
        (lambda: ThresholdRouter(4, 4, gate="relu"), "router.gate must be one of"),
        (lambda: MoRRouter(4, 4, selection="top"), "router.selection must be a selection config"),
        (lambda: MoRRouter(4, 4, selection=partial(TopP, top_p=0)), r"router.selection.top_p must be in \(0, 1\]"),
        (lambda: MoRRouter(4, 2, selection=partial(Dynamic, keep_top_k=3)), "router.selection.keep_top_k=3 exceeds"),
        (lambda: CRWRouter(4, 4, selection=partial(Dynamic, q=0)), "router.selection.q"),
        (lambda: MoRRouter(4, 4, selection=partial(TopK, top_k=None)), "router.selection.top_k .*router/selection=soft"),
    ],
)
def test_bad_values_name_the_key(make, message):
    with pytest.raises(MoleConfigError, match=message):
        make()


def test_threshold_select_direct():
    w, sel = threshold_select(T([[0.6, 0.3, 0.1]]), T([[0.3]]), renorm=True)
    close(w, [[2 / 3, 1 / 3, 0.0]])  # 0.3 >= 0.3 kept; renormalised by 0.9
    assert sel.tolist() == [[True, True, False]]
