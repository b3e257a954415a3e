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
    assert r.selection.normalized_entropy is True
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
    from mole.build import build_mole_model, parameter_report

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


# ---- HMoRA: the task encoder's input, the task-router loss once per optimizer step ----


class _OneHotEncoder(TaskEncoder):
    """A task encoder whose representation is the one-hot of each sequence's first read token (width 2), so
    that the task router's distribution is known by hand."""

    def __init__(self, **kw):
        super().__init__(torch.nn.Embedding(4, 2), RoutingContext(), heads=1, dropout=0.0, **kw)
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def encode(self, input_ids, prompt):
        self.seen.append((input_ids, prompt))
        first = torch.where(prompt.any(dim=1), input_ids.gather(1, prompt.long().argmax(dim=1, keepdim=True))[:, 0], 0)
        return torch.nn.functional.one_hot(first.clamp(max=1), 2).float() + self.e_task * 0.0  # e_task: in the graph


def _task_model(**encoder_kw):
    """One task-only router (a_l = sigmoid(3) = 0.95 > beta_high) on a one-hot task encoder: a sequence whose
    first question token is 0 gets [.8, .2], one whose first token is 1 gets [.2, .8]."""
    enc = _OneHotEncoder(**encoder_kw)
    router = HybridRouter(2, 2, context=enc._context, task_encoder=enc, eps=0.0, mu=3.0, top_k=None)
    with torch.no_grad():
        router.task_gate.weight.copy_(T([[math.log(4), 0.0], [0.0, math.log(4)]]))
    return torch.nn.ModuleDict({"encoder": enc, "router": router}), enc, router


H_82 = -(0.8 * math.log(0.8) + 0.2 * math.log(0.2))  # 0.50040


def test_task_router_loss_once_per_optimizer_step_over_all_sequences():
    model, enc, router = _task_model()
    ones = T([[True, True]])
    mb1 = (T([[0, 2], [0, 3]]), ones.expand(2, 2), None)  # both sequences [.8, .2]
    mb2 = (T([[1, 2], [1, 3]]), ones.expand(2, 2), None)  # both [.2, .8]
    # per micro-batch: balance H(.8, .2) = certainty H(.8, .2): CGJS 0, loss (1 - .4) ln2 / ln2 = 0.6 each;
    # their mean is 0.6
    per_micro = CGJSLoss()
    assert per_micro.step_loss(model, [mb1, mb2]) is None  # the default: nothing per step
    mean_of_micro = sum(cgjs_loss(torch.stack(router.task_probs(enc.encode(i, m)).unbind())).item()
                        for i, m, _ in (mb1, mb2)) / 2
    assert mean_of_micro == pytest.approx(0.6, abs=1e-6)
    # over the 4 sequences together: mean [.5, .5], balance ln 2; certainty H(.8, .2) = 0.50040
    # CGJS = ln2 - 0.50040 = 0.19275; loss = (0.6 ln2 - 0.19275) / ln2 = 0.32193
    expected = (0.6 * LN2 - (LN2 - H_82)) / LN2
    assert expected == pytest.approx(0.32193, abs=1e-5)
    step = CGJSLoss(task_scope="optimizer_step")
    value = step.step_loss(model, [mb1, mb2])
    assert value.item() == pytest.approx(expected, abs=1e-6)
    # one fresh pass over all 4 sequences, right-padded to one width
    (ids, mask), = enc.seen[-1:]
    assert ids.tolist() == [[0, 2], [0, 3], [1, 2], [1, 3]] and mask.all()
    # its gradient reaches the task router and the task encoder
    value.backward()
    assert router.task_gate.weight.grad.abs().sum() > 0 and enc.e_task.grad is not None


def test_task_scope_optimizer_step_leaves_task_routers_out_of_the_micro_batch_term():
    tok = T([[0.8, 0.2], [0.8, 0.2]])  # one token router: loss 0.6 (as above)
    task = T([[0.5, 0.5]])  # one task router: balance = certainty = ln 2: CGJS 0, loss 0.6
    outs = [RouterOutput(gates=tok, probs=tok, dists=[GateDist(tok, "token", "token"), GateDist(task, "task", "sequence")])]
    assert CGJSLoss()(outs).item() == pytest.approx(1.2, abs=1e-6)
    assert CGJSLoss(task_scope="optimizer_step")(outs).item() == pytest.approx(0.6, abs=1e-6)
    with pytest.raises(MoleConfigError, match=r"loss\.cgjs\.task_scope=optimizer_step needs loss\.cgjs\.reduce=sum"):
        CGJSLoss(task_scope="optimizer_step", reduce="mean")


def test_raw_input_reads_the_question_and_templated_the_prompt():
    _, enc, router = _task_model(input="raw")
    ctx = enc._context
    ctx.input_ids = T([[3, 3, 0, 2]])  # template tokens 3 3, then the question 0 2
    ctx.attention_mask = torch.ones(1, 4, dtype=torch.long)
    ctx.prompt_mask = T([[True, True, True, True]])
    ctx.task_inputs = (T([[0, 2]]), T([[True, True]]))
    close(router.task_probs(enc.representation()), [[0.8, 0.2]])  # first question token 0
    assert enc.seen[-1][0].tolist() == [[0, 2]] and enc.seen[-1][1].tolist() == [[True, True]]
    templated = _task_model()[1]
    ids, prompt = templated.select_inputs(ctx.input_ids, ctx.prompt_tokens(), ctx.task_inputs)
    assert ids.tolist() == [[3, 3, 0, 2]] and prompt.all()  # the whole prompt, template included


def test_raw_input_without_questions_falls_back_to_the_prompt_once(caplog):
    _, enc, _ = _task_model(input="raw")
    ids, mask = T([[3, 0]]), T([[True, True]])
    with caplog.at_level(logging.WARNING, logger="mole.routers.hybrid"):
        assert enc.select_inputs(ids, mask, None)[0] is ids
        enc.select_inputs(ids, mask, None)
    assert sum("input=raw" in r.getMessage() for r in caplog.records) == 1


def test_question_ids_in_the_data_and_the_batch():
    from mole.data.collate import Collator, encode_example
    from mole.data.prompts import record_question
    from mole.model.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    rec = {"instruction": "Is the sky blue?", "input": "Look up.", "output": "yes"}
    assert record_question(rec) == "Is the sky blue?\n\nLook up."
    assert record_question({"messages": [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "Hi?"}]}) == "Hi?"
    enc, _ = encode_example(rec, tok, 256, question=True)
    assert enc["question_ids"] == tok("Is the sky blue?\n\nLook up.", add_special_tokens=False)["input_ids"]
    assert "question_ids" not in encode_example(rec, tok, 256)[0]
    short, _ = encode_example({"instruction": "Why?", "output": "because"}, tok, 256, question=True)
    batch = Collator(tok.pad_token_id)([enc, short])
    n, m = len(enc["question_ids"]), len(short["question_ids"])
    assert batch["question_ids"].shape == (2, n) and batch["question_mask"].sum(dim=1).tolist() == [n, m]
    assert batch["question_ids"][1, :m].tolist() == short["question_ids"]


def test_question_rows_match_the_longest_context_that_begins_a_row():
    from mole.eval.harness import question_rows

    questions = {(5, 6): [1], (5, 6, 7): [2, 3]}
    rows = [[5, 6, 7, 8, 0], [5, 6, 9, 0, 0], [4, 5, 6, 7, 8]]
    assert question_rows(rows, questions) == [[2, 3], [1], None]


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


def test_balance_pooled_per_layer():
    from mole.model.routing import RoutingOutputs

    r1, r2 = _decisions()
    # layer 0 holds r1 and r2, layer 1 a copy of r1 (names as collect_routing gives them)
    outs = RoutingOutputs([[r1], [r2], [r1]], ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj",
                                              "model.layers.1.self_attn.q_proj"])
    assert outs.layer_indices() == [0, 0, 1]
    # layer 0 pooled: 4 rows, F = [3/4, 1/4], P = [.7, .3] -> 2 (.525 + .075) = 1.2; layer 1: r1 alone, 1.0
    assert BalanceLoss(reduce="pooled_per_layer")(outs).item() == pytest.approx(2.2, abs=1e-6)
    with pytest.raises(MoleConfigError, match="pooled_per_layer"):
        BalanceLoss(reduce="pooled_per_layer")(RoutingOutputs([[r1]], ["router"]))
    with pytest.raises(MoleConfigError, match=r"loss\.cgjs\.reduce"):
        CGJSLoss(reduce="pooled_per_layer")


def test_routing_outputs_of_a_model_know_their_layer(tiny_cfg):
    from mole.build import build_mole_model
    from mole.model.routing import collect_routing

    model, _, _ = build_mole_model(tiny_cfg("method=mola"))
    with torch.no_grad(), collect_routing(model) as outs:
        model(input_ids=torch.ones(1, 3, dtype=torch.long))
    layers = outs.layer_indices()
    per_layer = len(layers) // 4  # tiny_llama: 4 decoder layers, one router per adapted Linear
    assert per_layer > 0 and layers == [i for i in range(4) for _ in range(per_layer)]


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
        (lambda: _task_model(input="question"), "router.task_encoder.input"),
        (lambda: CGJSLoss(task_scope="step"), "loss.cgjs.task_scope"),
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


# ---- hmora_ref end to end: raw questions in training and evaluation, the task term once per step ----


@pytest.mark.slow
def test_hmora_ref_trains_evaluates_and_analyses_on_raw_questions(tiny_cfg, tmp_path, monkeypatch):
    from mole.data import read_records
    from mole.data.prompts import record_question
    from mole.eval.harness import default_fixtures_dir
    from mole.model.tokenizer import byte_tokenizer
    from mole.recipes.train import run_train

    seen = []
    encode = TaskEncoder.encode

    def spy(self, input_ids, prompt):
        seen.append([ids[m].tolist() for ids, m in zip(input_ids, prompt.bool(), strict=True)])
        return encode(self, input_ids, prompt)

    monkeypatch.setattr(TaskEncoder, "encode", spy)
    cfg = tiny_cfg("method=hmora_ref", "trainer.grad_accum=2", "trainer.max_steps=1", "trainer.batch_size=2",
                   "eval=fixtures", "eval.tasks=[mole_mc]", "eval.limit=2")
    metrics = run_train(cfg, tmp_path)
    tok = byte_tokenizer()
    fixtures = default_fixtures_dir()
    records = [r for f in fixtures.glob("*.json") if not f.name.startswith("chat") for r in read_records(str(f), "data")]
    questions = {tuple(tok(record_question(r), add_special_tokens=False)["input_ids"]) for r in records}
    rows = [tuple(row) for call in seen for row in call]
    assert rows and all(row in questions for row in rows)  # training, validation and lm-eval: questions only
    (step,) = metrics["train_loss"]
    # the micro-batches' mean LM and token-router terms, plus the task routers' term over all 4 sequences at
    # weight lambda / grad_accum
    want = step["lm_loss"] + 0.005 * step["aux/cgjs"] + 0.005 / 2 * step["aux/cgjs_step"]
    assert step["aux/cgjs_step"] > 0 and step["loss"] == pytest.approx(want, abs=1e-5)
    # the step's pass encodes the 4 sequences of both micro-batches together
    assert any(len(call) == 4 for call in seen)
    # mole-analyze routes the run's held-out records with their questions too
    from mole.analysis.run import analyze_run

    seen.clear()
    analyze_run(tmp_path, out=tmp_path / "analysis", figures=False, per_task=2)
    assert seen and all(tuple(row) in questions for call in seen for row in call)


def test_task_term_per_step_equals_the_per_micro_batch_task_term_on_one_micro_batch(tiny_cfg):
    """One micro-batch, no dropout: the step's own pass gives the task routers the same distributions as the
    forward, so the token part plus the step part is the per-micro-batch loss (shared routers counted once)."""
    from mole.build import build_aux_losses, build_mole_model
    from mole.data.collate import Collator, encode_example
    from mole.model.tokenizer import byte_tokenizer
    from mole.training.loop import loss_step, prompt_mask, question_inputs, step_losses

    cfg = tiny_cfg("method=hmora_ref")
    model, tok, _ = build_mole_model(cfg)
    model.eval()
    tok = tok or byte_tokenizer()
    recs = [{"instruction": "Pick one: red or blue?", "output": "red"}, {"instruction": "Is it cold?", "output": "no"}]
    batch = Collator(tok.pad_token_id)([encode_example(r, tok, 64, question=True)[0] for r in recs])
    per_step = build_aux_losses(cfg)
    assert per_step["cgjs"].task_scope == "optimizer_step"
    per_micro = build_aux_losses(tiny_cfg("method=hmora_ref", "loss.cgjs.task_scope=micro_batch"))
    with torch.no_grad():
        _, token_only = loss_step(model, batch, per_step)
        _, both = loss_step(model, batch, per_micro)
        step = step_losses(model, per_step, [(batch["input_ids"], prompt_mask(batch), question_inputs(batch))])
    assert step["cgjs"].item() > 0
    torch.testing.assert_close(token_only["aux/cgjs"] + step["cgjs"], both["aux/cgjs"], rtol=1e-5, atol=1e-6)
