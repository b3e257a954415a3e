"""MoR's fused eager mixture (eq. 5-6, ``_MixedRouters``) against autograd on the plain products, in float64."""

import pytest
import torch

from mole.routers.mor import MoRRouter, _MixedRouters


def reference(logits: torch.Tensor, R: int, E: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = logits.shape[0]
    sub = torch.softmax(logits[:, : R * E].reshape(n, R, E), dim=-1)
    main = torch.softmax(logits[:, R * E:], dim=-1)
    return (main.unsqueeze(-1) * sub).sum(dim=1), main


@pytest.mark.parametrize("R,E", [(2, 8), (3, 4), (1, 2)])
@pytest.mark.parametrize("main_loss", [True, False])
def test_mixed_routers_matches_autograd(R, E, main_loss):
    torch.manual_seed(R * 10 + E)
    n = 7
    logits = torch.randn(n, R * E + R, dtype=torch.float64, requires_grad=True)
    w_scores, w_main = torch.randn(n, E, dtype=torch.float64), torch.randn(n, R, dtype=torch.float64)

    def loss(scores, main):
        return (scores * w_scores).sum() + ((main * w_main).sum() if main_loss else 0)

    scores, main = _MixedRouters.apply(logits, R, E)
    ref_scores, ref_main = reference(logits, R, E)
    torch.testing.assert_close(scores, ref_scores)
    torch.testing.assert_close(main, ref_main)
    (grad,) = torch.autograd.grad(loss(scores, main), logits)
    (ref_grad,) = torch.autograd.grad(loss(ref_scores, ref_main), logits)
    torch.testing.assert_close(grad, ref_grad)


def test_mixed_routers_gradcheck():
    torch.manual_seed(0)
    logits = torch.randn(5, 2 * 4 + 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: _MixedRouters.apply(z, 2, 4), (logits,))
    # only the main router's probabilities reach the loss
    assert torch.autograd.gradcheck(lambda z: _MixedRouters.apply(z, 2, 4)[1], (logits,))


def test_mor_router_eager_equals_reference_path(monkeypatch):
    """The router with the fused function equals the router on the plain products (the path compiled code
    takes), outputs and gradients, the balance loss's gradient through the main router included."""
    torch.manual_seed(1)
    router = MoRRouter(16, 6, n_routers=3).double()
    x = torch.randn(9, 16, dtype=torch.float64)
    w = torch.randn(9, 6, dtype=torch.float64)

    def run():
        router.zero_grad()
        out = router(x)
        main = out.balance[0].probs
        ((out.gates * w).sum() + (main * main.detach().mean(0)).sum()).backward()
        return out, [p.grad.clone() for p in router.parameters()]

    out, grads = run()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    ref, ref_grads = run()
    torch.testing.assert_close(out.gates, ref.gates)
    torch.testing.assert_close(out.probs, ref.probs)
    torch.testing.assert_close(out.balance[0].probs, ref.balance[0].probs)
    assert torch.equal(out.balance[0].index, ref.balance[0].index)
    assert all(torch.allclose(g, r) for g, r in zip(grads, ref_grads, strict=True))
    assert any(g.abs().sum() > 0 for g in grads)
