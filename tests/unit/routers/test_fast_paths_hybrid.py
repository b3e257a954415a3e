"""HMoRA's eager fast paths against their references, in float64: the task routers' gates computed together
(:func:`mole.routers.hybrid.batched_task_gates`, eq. 14-16), the mixing as one ``lerp`` (eq. 7) and the mixed
probabilities / kept mask computed on first read."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mole.routers import HybridRouter
from mole.routers.base import chosen_mask, keep_top_k
from mole.routers.context import RoutingContext
from mole.routers.hybrid import TaskEncoder, _DeferredOutput

D, E, B, T = 8, 4, 3, 5


def _setup(num_layers: int = 4, dropout: float = 0.0, bias: bool = False, top_k=2, seed: int = 0):
    torch.manual_seed(seed)
    ctx = RoutingContext()
    emb = nn.Embedding(20, D).double()
    encoder = TaskEncoder(emb, ctx, heads=2, dropout=0.0).double()
    # eps = 4, mu = -2 over 4 layers: layers 0-1 token only, layer 2 both, layer 3 task only
    routers = [HybridRouter(D, E, layer_idx=i, num_layers=num_layers, context=ctx, task_encoder=encoder,
                            dropout=dropout, bias=bias, top_k=top_k).double() for i in range(num_layers)]
    ctx.input_ids = torch.randint(0, 20, (B, T))
    ctx.attention_mask = torch.ones(B, T, dtype=torch.long)
    ctx.attention_mask[0, -2:] = 0
    return ctx, encoder, routers


@pytest.mark.parametrize("bias, top_k", [(False, 2), (True, 2), (False, None), (True, 1)])
def test_task_gates_together_equal_each_router_alone(bias, top_k):
    ctx, encoder, routers = _setup(bias=bias, top_k=top_k)
    task = [r for r in routers if r.task_gate is not None]
    assert len(task) == 2
    outs = encoder.task_outputs()
    assert outs is None  # the producer's call: every router's outputs are cached
    fast = [encoder.task_outputs(r) for r in task]
    h = encoder.representation()
    ref = []
    for r in task:
        p = r.task_probs(h)
        g, s = keep_top_k(p, top_k, r.renorm) if top_k is not None else (p, None)
        ref.append((p, g, s))
    for (pf, gf, sf), (pr, gr, sr) in zip(fast, ref, strict=True):
        torch.testing.assert_close(pf, pr, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(gf, gr, rtol=1e-12, atol=1e-14)
        assert (sf is None) == (sr is None) and (sf is None or torch.equal(sf, sr))
    # gradients: the same upstream gradients through both
    params = [p for r in task for p in r.parameters()] + list(encoder.parameters())
    ups = [(torch.randn(B, E, dtype=torch.float64), torch.randn(B, E, dtype=torch.float64)) for _ in task]

    def grads(outs):
        loss = sum((p * up_p).sum() + (g * up_g).sum() for (p, g, _), (up_p, up_g) in zip(outs, ups, strict=True))
        return torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)  # H_task is shared

    for a, b in zip(grads(fast), grads(ref), strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_task_gates_together_draw_a_dropout_mask_per_router():
    ctx, encoder, routers = _setup(dropout=0.5, top_k=None)
    task = [r for r in routers if r.task_gate is not None]
    with torch.no_grad():
        task[1].task_gate.weight.copy_(task[0].task_gate.weight)  # identical routers
    p0, p1 = (encoder.task_outputs(r)[0] for r in task)
    assert not torch.allclose(p0, p1)  # independent masks
    for r in routers:
        r.eval()
    ctx.cache.clear()
    p0, p1 = (encoder.task_outputs(r)[0] for r in task)
    torch.testing.assert_close(p0, p1)  # no dropout in evaluation: the same router twice


@pytest.mark.parametrize("learn_a_l", [False, True])
def test_mixed_layer_gates_probs_and_mask_equal_eq7(learn_a_l):
    ctx, encoder, _ = _setup()
    router = HybridRouter(D, E, layer_idx=2, num_layers=4, context=ctx, task_encoder=encoder,
                          learn_a_l=learn_a_l).double()
    assert router.kinds == ["token", "task"]
    x = torch.randn(B * T, D, dtype=torch.float64, requires_grad=True)
    out = router(x)
    assert isinstance(out, _DeferredOutput) and out.__dict__["_probs"] is None  # not built yet
    (p_tok, _), (p_task, _) = [(d.probs, d.kind) for d in out.dists]
    z = router.token_gate(x).float()
    g_tok, s_tok = keep_top_k(torch.softmax(z, -1), 2, "softmax")
    g_task, s_task = keep_top_k(p_task, 2, "softmax")
    a = torch.sigmoid(router.a_logit.double()) if learn_a_l else router.alpha
    rep = lambda m: m.repeat_interleave(T, dim=0)  # noqa: E731
    # gates and probabilities are fp32 (the router contract): lerp and eq. 7's two products round differently
    torch.testing.assert_close(out.gates, a * rep(g_task) + (1 - a) * g_tok, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.probs, a * rep(p_task) + (1 - a) * p_tok, rtol=1e-6, atol=1e-7)
    assert torch.equal(out.selected, s_tok | rep(s_task))
    assert torch.equal(out.selected, chosen_mask(s_tok.float().topk(2).indices, p_tok) | rep(s_task))
    # gradient of the gates against eq. 7 written out
    up = torch.randn_like(out.gates)
    ref = (a * rep(g_task) + (1 - a) * g_tok)
    params = [x, *router.parameters(), *encoder.parameters()]
    ga = torch.autograd.grad((out.gates * up).sum(), params, allow_unused=True, retain_graph=True)
    gb = torch.autograd.grad((ref * up).sum(), params, allow_unused=True)
    for u, v in zip(ga, gb, strict=True):
        assert (u is None) == (v is None)
        if u is not None:
            torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-7)


def test_task_only_layer_probs_and_mask_are_the_task_routers_per_token():
    ctx, encoder, routers = _setup()
    router = routers[3]
    assert router.kinds == ["task"]
    out = router(torch.randn(B * T, D, dtype=torch.float64))
    p_task, g_task, s_task = encoder.task_outputs(router)
    assert torch.equal(out.gates, g_task.repeat_interleave(T, 0))
    assert torch.equal(out.probs, p_task.repeat_interleave(T, 0))
    assert torch.equal(out.selected, s_task.repeat_interleave(T, 0))
    out.probs = None  # a value written replaces the deferred one
    assert out.probs is None


def test_encoder_dropout_keeps_the_distribution():
    from mole.routers.hybrid import _dropout_p

    torch.manual_seed(0)
    x = torch.rand(200, 500, dtype=torch.float64) + 0.5  # no zeros
    y = _dropout_p(x, 0.3, True)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.7)  # kept values scaled by 1 / (1 - p)
    assert abs(kept.double().mean().item() - 0.7) < 0.005  # 100,000 draws: 5 sigma is 0.0072
    assert _dropout_p(x, 0.3, False) is x
    g = torch.autograd.grad((_dropout_p(x.requires_grad_(), 0.3, True) * 2).sum(), x)[0]
    assert bool(((g == 0) | torch.isclose(g, torch.tensor(2 / 0.7, dtype=g.dtype))).all())
