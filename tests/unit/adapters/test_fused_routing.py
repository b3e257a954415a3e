"""The eager autograd functions of the stacked experts and the top-k gates against their references.

* ``_StackedLoRA`` (:class:`LoRAExperts`), ``_HydraLoRA`` (:class:`HydraLoRAExperts`) and ``_TopKGates``
  (:func:`keep_top_k`) pass ``torch.autograd.gradcheck`` in float64 (their backward is the derivative of
  their forward);
* the experts equal the per-expert loops (outputs and gradients of every input: features, A, B, gates),
  for soft, sparse and absent gates, in training mode with dropout too (the dropout's scale is folded into
  the LoRA scale: the same random mask, the same values);
* the top-k gates equal the plain gather/scatter formulation, values, chosen set and gradients, also with
  the softmax inside (``_SoftmaxTopK``), whose probabilities also receive a gradient of their own (an
  auxiliary loss's);
* under bf16 autocast the experts compute in bf16, as the products they replace would;
* they dispatch fewer operations than the plain products.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mole.adapters.hydra import HydraLoRAExperts, _HydraLoRA
from mole.adapters.lora import LoRAExperts, _StackedLoRA
from mole.bench.loops import hydra_reference, lora_reference
from mole.routers.base import _SoftmaxTopK, _TopKGates, chosen_mask, keep_top_k, softmax_top_k
from tests.conftest import assert_same_outputs_and_grads

N, D_IN, D_OUT, E, R = 5, 4, 6, 3, 2


def _inputs(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D_IN, dtype=dtype, generator=g, requires_grad=True)
    gates = torch.rand(N, E, dtype=dtype, generator=g)
    gates[1, 0] = 0.0  # an unused expert
    return x, gates.requires_grad_()


def _experts(kind: str, dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(1)
    cls = LoRAExperts if kind == "lora" else HydraLoRAExperts
    m = cls(D_IN, D_OUT, num_experts=E, rank=R, alpha=3.0, dropout=dropout).double()
    with torch.no_grad():
        m.lora_B.normal_()  # B starts at zero: give the test a non-trivial product
    return m


@pytest.mark.parametrize("gated", [True, False])
def test_stacked_lora_function_passes_gradcheck(gated):
    x, gates = _inputs()
    a = torch.randn(E * R, D_IN, dtype=torch.float64, requires_grad=True)
    b = torch.randn(D_OUT, E * R, dtype=torch.float64, requires_grad=True)
    if gated:
        assert torch.autograd.gradcheck(lambda x, a, b, g: _StackedLoRA.apply(x, a, b, g, 1.5, R), (x, a, b, gates))
    else:  # one expert
        a1, b1 = a[:R].detach().requires_grad_(), b[:, :R].detach().requires_grad_()
        assert torch.autograd.gradcheck(lambda x, a, b: _StackedLoRA.apply(x, a, b, None, 1.5, R), (x, a1, b1))


@pytest.mark.parametrize("gated", [True, False])
def test_hydra_function_passes_gradcheck(gated):
    x, gates = _inputs()
    a = torch.randn(R, D_IN, dtype=torch.float64, requires_grad=True)
    b = torch.randn(D_OUT, E * R, dtype=torch.float64, requires_grad=True)
    g = gates if gated else None
    assert torch.autograd.gradcheck(lambda x, a, b, *g: _HydraLoRA.apply(x, a, b, *(g or [None]), 1.5, E),
                                    (x, a, b, *([g] if gated else [])))


@pytest.mark.parametrize("kind", ["lora", "hydra"])
@pytest.mark.parametrize("gates_kind", ["soft", "sparse", "none"])
@pytest.mark.parametrize("train", [False, True])
def test_experts_equal_the_per_expert_loop(kind, gates_kind, train):
    """Outputs and gradients (features, A, B, gates) against the loop; in training with dropout both draw the
    same mask from the same seed."""
    m = _experts(kind, dropout=0.25 if train else 0.0).train(train)
    x, gates = _inputs()
    if gates_kind == "sparse":
        with torch.no_grad():
            gates[:, 1] = 0.0
    g = None if gates_kind == "none" else gates
    if kind == "lora" and g is None:
        m = LoRAExperts(D_IN, D_OUT, num_experts=1, rank=R, alpha=3.0, dropout=m.dropout.p if train else 0.0)
        m = m.double().train(train)
        with torch.no_grad():
            m.lora_B.normal_()
    ref_fn = lora_reference if kind == "lora" else hydra_reference
    torch.manual_seed(7)
    out = m(x, g)
    torch.manual_seed(7)
    ref = ref_fn(m, x, g)
    # the loop skips an expert whose gates are all 0, so its gates' gradient is left at 0 there, not the
    # derivative: compare the gates' gradient where no expert is skipped
    with_gates = g is not None and not (kind == "lora" and gates_kind == "sparse")
    params = [x, m.lora_A, m.lora_B, *([g] if with_gates else [])]
    assert_same_outputs_and_grads(out, ref, params)
    if train:  # dropout really acted: some input column of some row was dropped
        assert not torch.allclose(out, ref_fn(m.eval(), x, g))


@pytest.mark.parametrize("renorm", ["sum", "softmax"])
def test_top_k_gates_pass_gradcheck_and_equal_the_gather_scatter_form(renorm):
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(7, 5, dtype=torch.float64, generator=g), dim=-1).requires_grad_()
    assert torch.autograd.gradcheck(lambda p: _TopKGates.apply(p, 2, renorm == "softmax")[0], (probs,))

    weights, selected = keep_top_k(probs, 2, renorm)
    vals, idx = probs.topk(2, dim=-1)
    ref_w = vals / vals.sum(-1, keepdim=True) if renorm == "sum" else torch.softmax(vals, dim=-1)
    ref = torch.zeros_like(probs).scatter(-1, idx, ref_w)
    assert selected.dtype == torch.bool and torch.equal(selected, ref != 0)
    assert_same_outputs_and_grads(weights, ref, [probs])


@pytest.mark.parametrize("renorm", ["sum", "softmax"])
def test_softmax_top_k_passes_gradcheck_and_equals_softmax_then_top_k(renorm):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w_p, w_g = torch.randn(2, 7, 5, dtype=torch.float64, generator=g)

    def both(z):  # a loss on the probabilities (as the balance loss) and one on the gates
        probs, gates, _ = _SoftmaxTopK.apply(z, 2, renorm == "softmax")
        return (probs * w_p).sum() + (gates * w_g).sum()

    assert torch.autograd.gradcheck(both, (logits,))
    assert torch.autograd.gradcheck(lambda z: _SoftmaxTopK.apply(z, 2, renorm == "softmax")[1], (logits,))
    assert torch.autograd.gradcheck(lambda z: _SoftmaxTopK.apply(z, 2, renorm == "softmax")[0], (logits,))

    probs, gates, index = softmax_top_k(logits, 2, renorm)
    ref_probs = torch.softmax(logits, dim=-1)
    ref_gates, ref_selected = keep_top_k(ref_probs, 2, renorm)
    assert torch.equal(chosen_mask(index, probs), ref_selected)
    out, ref = torch.cat([probs * w_p, gates * w_g]), torch.cat([ref_probs * w_p, ref_gates * w_g])
    assert_same_outputs_and_grads(out, ref, [logits])


@pytest.mark.parametrize("kind", ["lora", "hydra"])
def test_experts_compute_in_bf16_under_autocast_as_the_products_would(kind):
    m = _experts(kind).float()
    x, gates = _inputs(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, gates)
    assert out.dtype == torch.bfloat16
    ref_fn = lora_reference if kind == "lora" else hydra_reference
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = ref_fn(m, x, gates)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    out.float().square().sum().backward()
    assert m.lora_A.grad.dtype == torch.float32 and m.lora_B.grad.dtype == torch.float32
    assert x.grad is not None and gates.grad is not None


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.n += 1
        return func(*args, **(kwargs or {}))


def _plain_lora(m: LoRAExperts, x, gates):
    """:meth:`LoRAExperts.forward`'s products through autograd (its compiled path)."""
    h = torch.nn.functional.linear(x, m.lora_A).view(x.shape[0], m.num_experts, m.rank)
    h = (h * (gates * m.scaling).unsqueeze(-1)).view(x.shape[0], -1)
    return torch.nn.functional.linear(h, m.lora_B)


def test_stacked_experts_dispatch_fewer_operations_than_the_plain_products():
    m = _experts("lora")
    counts = []
    for fn in (m, lambda x, g: _plain_lora(m, x, g)):
        x, gates = _inputs()
        with _Count() as c:
            fn(x, gates).square().sum().backward()
        counts.append(c.n)
    assert counts[0] < counts[1], counts


@pytest.mark.parametrize("kind", ["lora", "hydra"])
def test_experts_take_gates_broadcast_from_one_row_per_sequence(kind):
    """Sequence-level routers hand the layer an expanded (stride-0) view of their gates."""
    m = _experts(kind)
    x, _ = _inputs()
    row = torch.rand(1, E, dtype=torch.float64, requires_grad=True)
    gates = row.expand(N, E)
    ref_fn = lora_reference if kind == "lora" else hydra_reference
    assert_same_outputs_and_grads(m(x, gates), ref_fn(m, x, gates), [x, m.lora_A, m.lora_B, row])


def test_stacked_lora_adds_a_base_output_in_its_last_product():
    x, gates = _inputs()
    a = torch.randn(E * R, D_IN, dtype=torch.float64, requires_grad=True)
    b = torch.randn(D_OUT, E * R, dtype=torch.float64, requires_grad=True)
    base = torch.randn(N, D_OUT, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: _StackedLoRA.apply(*t[:4], 1.5, R, t[4]), (x, a, b, gates, base))
    torch.testing.assert_close(_StackedLoRA.apply(x, a, b, gates, 1.5, R, base),
                               base + _StackedLoRA.apply(x, a, b, gates, 1.5, R))


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_a_routed_layer_equals_its_frozen_output_plus_the_update(base_dtype):
    """The layer hands its frozen output to the experts, which add their update in their last product where
    the dtypes agree; with a bf16 base and fp32 experts the update is added in the base's dtype as before."""
    from torch import nn

    from mole.model.layer import MoLELinear
    from mole.routers.soft import SoftRouter

    torch.manual_seed(0)
    layer = MoLELinear(nn.Linear(D_IN, D_OUT).to(base_dtype).requires_grad_(False),
                       LoRAExperts(D_IN, D_OUT, E, R), SoftRouter(D_IN, E))
    nn.init.normal_(layer.mole_experts.lora_B)
    x = torch.randn(2, 3, D_IN, dtype=base_dtype, requires_grad=True)
    out = layer(x)
    flat = x.reshape(-1, D_IN).float()
    delta = lora_reference(layer.mole_experts, flat, layer.mole_router(flat).gates).view(2, 3, D_OUT)
    ref = layer.base_layer(x) + delta.to(base_dtype)
    assert out.dtype == base_dtype
    params = [x, layer.mole_experts.lora_A, layer.mole_experts.lora_B, layer.mole_router.gate.weight]
    if base_dtype == torch.float32:
        assert_same_outputs_and_grads(out, ref, params)
    else:  # the same operations in the same order: bitwise equal
        assert torch.equal(out, ref)
