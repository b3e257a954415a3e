"""The options that reproduce the official implementations (HMoRA, DynMoLE, MoLA), on small hand examples.

Every expected number is worked out in the comments from the definitions (the paper's equation or the
released code's rule), not taken from the code under test.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from conftest import TINY

from mole.adapters import LoRAExperts
from mole.adapters.hydra import HydraLoRAExperts
from mole.config import compose_config
from mole.losses import BalanceLoss, CGJSLoss, TsallisLoss, cgjs_loss
from mole.routers import DynamicRouter, HybridRouter, TopPRouter, dynamic_select, keep_top_p
from mole.routers.base import BalanceStats, GateDist, RouterOutput
from mole.routers.context import RoutingContext
from mole.routers.hybrid import TaskEncoder, right_aligned_positions, sinusoidal_encoding
from mole.utils.errors import MoleConfigError

T = torch.tensor
LN2 = math.log(2)


def close(actual, expected, **kw):
    torch.testing.assert_close(actual, T(expected, dtype=actual.dtype) if not torch.is_tensor(expected) else expected, **kw)


def sig(z: float) -> float:
    return 1 / (1 + math.exp(-z))


# ---- top-p: keep or drop the expert that crosses p; renormalise or not ----


def test_top_p_keeps_the_crossing_expert_by_default_and_drops_it_as_the_released_code():
    probs = T([[0.5, 0.3, 0.15, 0.05]])
    # paper: the sums before each rank are 0, .5, .8, .95; below .75: ranks 0 and 1 -> renormalised by .8
    w, s = keep_top_p(probs, 0.75)
    close(w, [[0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]])
    # released code: sums up to each rank .5, .8, .95, 1; at most .75: rank 0 only
    w, s = keep_top_p(probs, 0.75, keep_crossing=False)
    close(w, [[1.0, 0.0, 0.0, 0.0]])
    assert s.tolist() == [[True, False, False, False]]
    # ... and without renormalising the kept probability stays 0.5
    w, _ = keep_top_p(probs, 0.75, keep_crossing=False, renormalize=False)
    close(w, [[0.5, 0.0, 0.0, 0.0]])
    # keep-top-k 2 adds rank 1 whatever p says
    w, _ = keep_top_p(probs, 0.75, min_k=2, keep_crossing=False, renormalize=False)
    close(w, [[0.5, 0.3, 0.0, 0.0]])


def test_top_p_drop_crossing_keeps_a_prefix_that_reaches_p_exactly():
    # .5 + .25 = .75 (exact in binary): "cumsum <= top_p" keeps both
    w, s = keep_top_p(T([[0.5, 0.25, 0.25]]), 0.75, keep_crossing=False, renormalize=False)
    close(w, [[0.5, 0.25, 0.0]])


def test_top_p_router_options():
    r = TopPRouter(2, 4, top_p=0.75, keep_top_k=1, top_p_keep_crossing=False, renormalize=False)
    with torch.no_grad():
        r.gate.weight.zero_()
        r.gate.weight[:, 0] = torch.log(T([0.5, 0.3, 0.15, 0.05]))
    out = r(T([[1.0, 0.0]]))
    close(out.gates, [[0.5, 0.0, 0.0, 0.0]])
    close(out.probs, [[0.5, 0.3, 0.15, 0.05]])


# ---- DynMoLE: normalised entropy (the new default), released-code top-p ----


def test_dynamic_select_with_the_released_codes_rules():
    probs = T([[0.25, 0.25, 0.25, 0.25], [0.6, 0.2, 0.15, 0.05]])
    # q = 2: S = 1 - sum p^2; max over 4 experts = 1 - 1/4 = 0.75
    # row 1: S = 0.75 -> 1.0 > 0.9: soft. row 2: S = 1 - (.36 + .04 + .0225 + .0025) = 0.575 -> 0.767: top-p
    gates, sel = dynamic_select(probs, q=2.0, threshold=0.9, top_p=0.75, keep_top_k=1, normalized=True,
                                keep_crossing=False, renormalize=False)
    # top-p (released): sums .6, .8, ... -> only .6 is <= .75; kept as it is
    close(gates, [[0.25] * 4, [0.6, 0.0, 0.0, 0.0]])
    assert sel.sum(-1).tolist() == [4, 1]
    gates, _ = dynamic_select(probs, q=2.0, threshold=0.9, top_p=0.75, keep_top_k=1, normalized=True)
    # paper's top-p: sums before 0, .6 < .75 -> experts 0, 1, renormalised by .8
    close(gates[1], [0.75, 0.25, 0.0, 0.0])


def test_dynamic_router_defaults_to_the_normalised_entropy():
    r = DynamicRouter(1, 6, q=2.0)  # threshold 0.9, top_p 0.75, keep_top_k 2
    assert r.normalized_entropy is True
    with torch.no_grad():
        r.gate.weight.zero_()  # every token uniform over 6 experts
    out = r(T([[1.0]]))
    # raw S_2 = 1 - 6 / 36 = 0.833 < 0.9 would never route softly; normalised it is 1.0 > 0.9: soft
    close(out.gates, [[1 / 6] * 6])
    raw = DynamicRouter(1, 6, q=2.0, normalized_entropy=False)
    with torch.no_grad():
        raw.gate.weight.zero_()
    # raw: top-p on a uniform row: sums before 0, 1/6, 2/6, 3/6, 4/6 < .75: 5 experts, renormalised
    close(raw(T([[1.0]])).gates, [[0.2] * 5 + [0.0]])


def test_plain_dynmole_preset_reads_the_normalised_entropy():
    cfg = compose_config([*TINY, "method=dynmole"])
    assert cfg.router.normalized_entropy is True
    assert cfg.router.top_p_keep_crossing is True and cfg.router.renormalize is True


# ---- HMoRA: top-k after mixing, trainable a_l, router bias, positional task encoding ----


class _FixedTask:
    """Stands in for the task encoder: a fixed H_task per sequence."""

    def __init__(self, h: torch.Tensor):
        self.h, self.width, self.users = h, h.shape[1], 0

    def representation(self) -> torch.Tensor:
        return self.h


def _hybrid(mu: float = -math.log(3), **kw):
    """a_l = sigmoid(mu) (eps = 0); token router: token 1 -> [4,2,1,1]/8, token 2 -> [1,2,1,5]/9;
    task router -> [2,1,3,1]/7. mu = -ln 3 gives a_l = 1/4."""
    ctx = RoutingContext()
    ctx.attention_mask = torch.ones(1, 2, dtype=torch.long)
    router = HybridRouter(2, 4, layer_idx=0, num_layers=2, context=ctx, task_encoder=_FixedTask(T([[1.0, 0.0]])),
                          eps=0.0, mu=mu, **kw)
    ln = math.log
    with torch.no_grad():
        if router.token_gate is not None:
            router.token_gate.weight.copy_(T([[ln(4), 0.0], [ln(2), ln(2)], [0.0, 0.0], [0.0, ln(5)]]))
        if router.task_gate is not None:
            router.task_gate.weight.copy_(T([[ln(2), 0.0], [0.0, 0.0], [ln(3), 0.0], [0.0, 0.0]]))
    return router, T([[1.0, 0.0], [0.0, 1.0]])


TOK = [[4 / 8, 2 / 8, 1 / 8, 1 / 8], [1 / 9, 2 / 9, 1 / 9, 5 / 9]]
TASK = [2 / 7, 1 / 7, 3 / 7, 1 / 7]
MIX = [[0.25 * TASK[i] + 0.75 * TOK[t][i] for i in range(4)] for t in range(2)]
# token 1: [.4464, .2232, .2009, .1295] -> top-2 = experts 0, 1
# token 2: [.1548, .2024, .1905, .4524] -> top-2 = experts 3, 1


@pytest.mark.parametrize("renorm", ["softmax", "sum"])
def test_topk_after_mix_keeps_exactly_k_experts_of_the_mixture(renorm):
    router, x = _hybrid(top_k=2, renorm=renorm, topk_after_mix=True)
    out = router(x)
    m = MIX
    if renorm == "softmax":  # second softmax over the two kept values = sigmoid of their gap
        t1 = [sig(m[0][0] - m[0][1]), sig(m[0][1] - m[0][0]), 0.0, 0.0]
        t2 = [0.0, sig(m[1][1] - m[1][3]), 0.0, sig(m[1][3] - m[1][1])]
    else:
        t1 = [m[0][0] / (m[0][0] + m[0][1]), m[0][1] / (m[0][0] + m[0][1]), 0.0, 0.0]
        t2 = [0.0, m[1][1] / (m[1][1] + m[1][3]), 0.0, m[1][3] / (m[1][1] + m[1][3])]
    close(out.gates, [t1, t2])
    assert out.selected.tolist() == [[True, True, False, False], [False, True, False, True]]
    close(out.probs, MIX)
    # the released code's balance statistic: the mixture's choices against the token router's probabilities
    (stats,) = out.balance
    close(stats.probs, TOK)
    assert stats.selected.tolist() == out.selected.tolist() and stats.k == 2
    # the entropy losses still see each router's dense distribution
    assert [d.kind for d in out.distributions()] == ["token", "task"]


def test_topk_after_mix_changes_nothing_in_single_router_layers():
    for mu in (-3.0, 3.0):  # a = 0.047 (token router only), 0.953 (task router only)
        a, x = _hybrid(mu=mu, top_k=2)
        b, _ = _hybrid(mu=mu, top_k=2, topk_after_mix=True)
        torch.testing.assert_close(b(x).gates, a(x).gates, rtol=0, atol=0)


def test_learned_a_l_starts_at_eq8_and_is_trained():
    router, x = _hybrid(top_k=None, learn_a_l=True)
    assert isinstance(router.a_logit, torch.nn.Parameter)
    assert router.a_logit.item() == pytest.approx(-math.log(3))
    out = router(x)
    close(out.gates, MIX)  # a_l = 1/4 at the start, as the fixed one
    # d gates / d theta = a (1 - a) (g_task - g_token) = 3/16 (g_task - g_token); take token 1, expert 2
    (grad,) = torch.autograd.grad(out.gates[0, 2], router.a_logit)
    assert grad.item() == pytest.approx(3 / 16 * (3 / 7 - 1 / 8), rel=1e-5)
    assert router.layer_info()["a_l"] == pytest.approx(0.25, abs=1e-4)
    # only layers with both routers have a trainable a_l
    low, _ = _hybrid(mu=-3.0, learn_a_l=True)
    assert low.a_logit is None and not any("a_logit" in n for n, _ in low.named_parameters())


def test_parameter_count_of_hmora_ref_on_the_meta_device():
    from mole.pipeline import build_mole_model, parameter_report

    cfg = compose_config([*TINY, "method=hmora_ref"])
    model, _, rep = build_mole_model(cfg, meta=True)
    report = parameter_report(model, rep)
    layers = [lay for lay in report["layers"] if lay["router_kinds"] == ["token", "task"]]
    assert layers  # eps 2, mu 0: the middle layers have both routers, each with a trainable a_l logit
    trained = [n for n, _ in model.named_parameters() if n.endswith("a_logit")]
    # one logit per router of a mixed layer: q/k/v share one router and gate/up another (2 per layer)
    assert len(trained) == 2 * len(layers)
    # a_l is reported at eq. 8's value: sigmoid(-2 + 4 l / L)
    num_layers = len(report["layers"])
    for lay in layers:
        want = 1 / (1 + math.exp(-(-2 + 4 * lay["layer"] / (num_layers - 1))))
        assert lay["a_l"] == pytest.approx(want, abs=1e-4)


def test_router_bias():
    router, x = _hybrid(mu=-3.0, top_k=None, bias=True)  # token router only
    assert router.token_gate.bias is not None
    with torch.no_grad():
        router.token_gate.weight.zero_()
        router.token_gate.bias.copy_(torch.log(T([1.0, 2.0, 3.0, 2.0])))
    close(router(x).gates, [[1 / 8, 2 / 8, 3 / 8, 2 / 8]] * 2)
    plain, _ = _hybrid()
    assert plain.token_gate.bias is None and plain.task_gate.bias is None


def test_right_aligned_positions_by_hand():
    mask = T([[True, True, True, False], [False, True, True, False]])
    # the last prompt token of each row is at 4999, the one before at 4998, ...: 4999 minus the prompt tokens
    # after it (also for non-prompt columns, which are never attended)
    assert right_aligned_positions(mask).tolist() == [[4997, 4998, 4999, 4999], [4997, 4998, 4999, 4999]]


def test_sinusoidal_encoding_by_hand():
    # d = 4: frequencies 1 and 10000^(-2/4) = 0.01
    pe = sinusoidal_encoding(T([[4999]]), 4)
    close(pe[0, 0], [math.sin(4999), math.cos(4999), math.sin(49.99), math.cos(49.99)], atol=1e-4, rtol=0)


def _encoder(positional: str):
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 8)
    enc = TaskEncoder(emb, RoutingContext(), heads=2, ffn_mult=2, dropout=0.0, positional=positional)
    return enc.eval(), emb


def test_positional_task_encoder_against_the_full_encoder_layer():
    enc, emb = _encoder("right_aligned")
    ids = T([[3, 4, 5, 0], [0, 6, 7, 0]])
    prompt = T([[True, True, True, False], [False, True, True, False]])
    with torch.no_grad():
        got = enc.encode(ids, prompt)
        # reference: PyTorch's own layer on every position, embeddings + PE at positions 4997.., e_task last
        pos = T([[4997, 4998, 4999, 4999], [4997, 4998, 4999, 4999]]).float()
        div = torch.exp(torch.arange(0, 8, 2).float() * (-math.log(10000.0) / 8))
        pe = torch.stack([(pos[..., None] * div).sin(), (pos[..., None] * div).cos()], -1).flatten(-2)
        seq = torch.cat([emb(ids) + pe, enc.e_task.expand(2, 1, 8)], dim=1)
        ignore = torch.cat([~prompt, T([[False], [False]])], dim=1)
        want = enc.layer(seq, src_key_padding_mask=ignore)[:, -1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_positional_task_encoding_depends_on_order_but_not_on_padding():
    enc, _ = _encoder("right_aligned")
    none, _ = _encoder("none")
    with torch.no_grad():
        right = enc.encode(T([[3, 4, 5, 0, 0]]), T([[True, True, True, False, False]]))
        left = enc.encode(T([[0, 0, 3, 4, 5]]), T([[False, False, True, True, True]]))
        swapped = enc.encode(T([[5, 4, 3]]), T([[True, True, True]]))
        plain = none.encode(T([[3, 4, 5]]), T([[True, True, True]]))
        plain_swapped = none.encode(T([[5, 4, 3]]), T([[True, True, True]]))
    torch.testing.assert_close(left, right)  # a sequence's positions do not depend on its padding
    assert not torch.allclose(swapped, right, atol=1e-4)  # order matters with positions
    torch.testing.assert_close(plain_swapped, plain)  # ... and not without them (a set of tokens)


# ---- LoRA scaling ----


@pytest.mark.parametrize("cls", [LoRAExperts, HydraLoRAExperts])
def test_rslora_scaling(cls):
    for scaling, expected in (("lora", 8 / 4), ("rslora", 8 / math.sqrt(4))):
        a = cls(4, 3, num_experts=1, rank=4, alpha=8, scaling=scaling)
        assert a.scaling == pytest.approx(expected)
        with torch.no_grad():
            a.lora_A.fill_(1.0)
            a.lora_B.fill_(1.0)
        # A x = [1, 1, 1, 1] for x = e_0; B (A x) = 4 in every output; times the scale
        close(a(T([[1.0, 0.0, 0.0, 0.0]])), [[4 * expected] * 3])


# ---- CGJS: per-row floor, reduction over routers ----

H_75_25 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))  # 0.5623


def _cgjs_by_hand(balance: float, certainty: float, gamma_b: float = 1.0, gamma_c: float = 0.4) -> float:
    cgjs = min(balance, gamma_b * LN2) - certainty
    return max((gamma_b - gamma_c) * LN2 - cgjs, 0.0) / LN2


def test_cgjs_per_row_floor():
    probs = T([[1.0, 0.0], [0.5, 0.5]])  # row entropies 0 and ln 2; mean [.75, .25]
    # eq. 11: max(mean H, .4 ln2) = max(.3466, .2773) = .3466
    assert cgjs_loss(probs).item() == pytest.approx(_cgjs_by_hand(H_75_25, LN2 / 2), abs=1e-6)
    # released code: mean of max(H_n, .4 ln2) = (.4 ln2 + ln2) / 2 = .7 ln2
    expected = _cgjs_by_hand(H_75_25, 0.7 * LN2)
    assert expected == pytest.approx(0.48876, abs=1e-4)
    assert cgjs_loss(probs, floor="per_row").item() == pytest.approx(expected, abs=1e-6)


def _outs(*probs_list):
    return [RouterOutput(gates=p, probs=p, dists=[GateDist(p)]) for p in probs_list]


def test_cgjs_reduce_sum_mean_pooled():
    r1 = T([[1.0, 0.0], [0.5, 0.5]])  # loss 0.28872 (eq. 11)
    r2 = T([[0.5, 0.5], [0.5, 0.5]])  # balance = certainty = ln 2: CGJS 0, loss 0.6
    l1, l2 = _cgjs_by_hand(H_75_25, LN2 / 2), 0.6
    outs = _outs(r1, r2)
    assert CGJSLoss(reduce="sum")(outs).item() == pytest.approx(l1 + l2, abs=1e-6)
    assert CGJSLoss(reduce="mean")(outs).item() == pytest.approx((l1 + l2) / 2, abs=1e-6)
    # pooled: 4 rows, mean [.625, .375]; certainty (0 + 3 ln 2) / 4
    h = -(0.625 * math.log(0.625) + 0.375 * math.log(0.375))
    assert CGJSLoss(reduce="pooled")(outs).item() == pytest.approx(_cgjs_by_hand(h, 0.75 * LN2), abs=1e-6)


# ---- balance: reduction over routers, mass load ----


def _decisions():
    r1 = RouterOutput(gates=None, probs=None, balance=[BalanceStats(T([[0.8, 0.2], [0.4, 0.6]]),
                                                                    T([[True, False], [False, True]]), 1)])
    r2 = RouterOutput(gates=None, probs=None, balance=[BalanceStats(T([[0.9, 0.1], [0.7, 0.3]]),
                                                                    T([[True, False], [True, False]]), 1)])
    return [r1, r2]


def test_balance_reduce_sum_mean_pooled():
    # r1: F = [.5, .5], P = [.6, .4] -> 2 (.3 + .2) = 1.0;  r2: F = [1, 0], P = [.8, .2] -> 2 (.8) = 1.6
    assert BalanceLoss(reduce="sum")(_decisions()).item() == pytest.approx(2.6, abs=1e-6)
    assert BalanceLoss(reduce="mean")(_decisions()).item() == pytest.approx(1.3, abs=1e-6)
    # pooled: 4 rows, F = [3/4, 1/4], P = [.7, .3] -> 2 (.525 + .075) = 1.2
    assert BalanceLoss(reduce="pooled")(_decisions()).item() == pytest.approx(1.2, abs=1e-6)
    # padding: the second token is not real. r1: F = [1, 0], P = [.8, .2] -> 1.6; r2: F = [1, 0], P = [.9, .1] -> 1.8
    mask = T([True, False])
    assert BalanceLoss(reduce="sum")(_decisions(), mask).item() == pytest.approx(3.4, abs=1e-6)
    # pooled over the two real rows: F = [1, 0], P = [.85, .15] -> 1.7
    assert BalanceLoss(reduce="pooled")(_decisions(), mask).item() == pytest.approx(1.7, abs=1e-6)


def test_balance_mass_load():
    # r1: kept probabilities [[.8, 0], [0, .6]] -> F = [.4, .3], P = [.6, .4] -> 2 (.24 + .12) = 0.72
    # r2: kept [[.9, 0], [.7, 0]] -> F = [.8, 0], P = [.8, .2] -> 2 (.64) = 1.28
    assert BalanceLoss(load="mass")(_decisions()).item() == pytest.approx(2.0, abs=1e-6)
    # pooled: F = [(.8 + .9 + .7) / 4, .6 / 4] = [.6, .15], P = [.7, .3] -> 2 (.42 + .045) = 0.93
    assert BalanceLoss(load="mass", reduce="pooled")(_decisions()).item() == pytest.approx(0.93, abs=1e-6)


# ---- Tsallis: normalised entropy, reduction over routers ----


def test_tsallis_normalised_and_reduced():
    # q = 2. r1 (E = 2): S = [.5, 0], max .5 -> [1, 0]; r2 (E = 4): S = [.75, .5], max .75 -> [1, 2/3]
    outs = _outs(T([[0.5, 0.5], [1.0, 0.0]]), T([[0.25] * 4, [0.5, 0.5, 0.0, 0.0]]))
    assert TsallisLoss(q=2.0)(outs).item() == pytest.approx(0.25 + 0.625, abs=1e-6)  # raw means, summed
    assert TsallisLoss(q=2.0, normalized=True)(outs).item() == pytest.approx(0.5 + 5 / 6, abs=1e-6)
    assert TsallisLoss(q=2.0, normalized=True, reduce="mean")(outs).item() == pytest.approx((0.5 + 5 / 6) / 2, abs=1e-6)
    assert TsallisLoss(q=2.0, normalized=True, reduce="pooled")(outs).item() == pytest.approx((1 + 0 + 1 + 2 / 3) / 4, abs=1e-6)
    # padding: only the first row of each router counts -> (1 + 1) / 2
    mask = T([True, False])
    assert TsallisLoss(q=2.0, normalized=True, reduce="pooled")(outs, mask).item() == pytest.approx(1.0, abs=1e-6)


# ---- the effective weight per router, logged once ----


def test_effective_weight_per_router_is_logged_once(caplog):
    loss = BalanceLoss(weight=0.01, reduce="sum")
    with caplog.at_level(logging.INFO, logger="mole.losses.routing"):
        loss(_decisions())
        loss(_decisions())
    lines = [r.getMessage() for r in caplog.records if "loss.balance" in r.getMessage()]
    assert len(lines) == 1
    # 2 routers, sum: 0.01 each, 0.02 in all
    assert "reduce=sum over 2 routers: effective weight 0.01 per router (0.02 in all" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mole.losses.routing"):
        BalanceLoss(weight=0.01, reduce="mean")(_decisions())
    assert "effective weight 0.005 per router (0.01 in all" in caplog.records[0].getMessage()


# ---- bad values name their key ----


@pytest.mark.parametrize(
    "build, key",
    [
        (lambda: CGJSLoss(floor="median"), "loss.cgjs.floor"),
        (lambda: CGJSLoss(reduce="max"), "loss.cgjs.reduce"),
        (lambda: BalanceLoss(reduce="avg"), "loss.balance.reduce"),
        (lambda: BalanceLoss(load="tokens"), "loss.balance.load"),
        (lambda: TsallisLoss(normalized="yes"), "loss.tsallis.normalized"),
        (lambda: TsallisLoss(reduce=1), "loss.tsallis.reduce"),
        (lambda: TopPRouter(2, 4, top_p_keep_crossing="no"), "router.top_p_keep_crossing"),
        (lambda: DynamicRouter(2, 4, renormalize=1), "router.renormalize"),
        (lambda: _hybrid(topk_after_mix="true"), "router.topk_after_mix"),
        (lambda: _hybrid(learn_a_l=None), "router.learn_a_l"),
        (lambda: LoRAExperts(4, 4, scaling="rs"), "adapter.scaling"),
        (lambda: _encoder("left"), "router.task_encoder.positional"),
    ],
)
def test_bad_option_values_name_the_key(build, key):
    with pytest.raises(MoleConfigError, match=key.replace(".", r"\.")):
        build()


# ---- the measuring script behind docs/reference-differences.md ----


def test_reference_differences_script_measures_the_invariants():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[3] / "scripts" / "reference_differences.py"
    spec = importlib.util.spec_from_file_location("reference_differences", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.measure(tokens=64, draws=3)
    by_name = {}
    for name, setting, figure in rows:
        by_name.setdefault(name, []).append((setting, figure))
    # top-k of the mixture: exactly k = 2 experts per token, whatever the draw
    assert all(fig.split("; ")[0].endswith("vs 2.00") for _, fig in by_name["HMoRA top-k placement"])
    # raw S_2 over 6 experts is at most 1 - 1/6 = 0.833 < 0.9: no token is ever soft on the raw reading
    q2 = [fig for setting, fig in by_name["DynMoLE entropy threshold"] if "q=2.0" in setting]
    assert len(q2) == 3 and all(fig.startswith("soft tokens: raw 0% vs") for fig in q2)
    # flooring each row can only raise the certainty term, so the per-row loss is never below eq. 11's
    assert all("per_row - mean: +" in fig for _, fig in by_name["HMoRA CGJS floor"])
