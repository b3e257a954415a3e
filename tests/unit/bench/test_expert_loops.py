"""The per-expert loops of :mod:`mole.bench.loops` equal the stacked experts they stand for.

The loops are the references the adapters' tests compare against and the loop variants the benchmark
times; here: the gather loop with experts no token uses, the loop in LoRAMoE's form (eval mode equal, one
dropout mask per expert in training), and the soft loop compiled as one graph.
"""

from __future__ import annotations

import torch
from torch import nn

from mole.adapters import LoRAExperts
from mole.bench.loops import lora_gather_loop, lora_loramoe_loop, lora_reference, swap_in_loops
from mole.build import build_mole_model
from tests.conftest import compose_tiny


def test_gather_loop_equals_the_stacked_experts_with_unused_experts():
    torch.manual_seed(5)
    ex = LoRAExperts(6, 5, num_experts=4, rank=2, alpha=4.0)
    with torch.no_grad():
        ex.lora_B.normal_()
    x = torch.randn(7, 6, requires_grad=True)
    # hand-made top-2 gates; expert 3 is never chosen
    gates = torch.zeros(7, 4)
    for t in range(7):
        gates[t, t % 3], gates[t, (t + 1) % 3] = 0.75, 0.25
    fast, loop, dense = ex(x, gates), lora_gather_loop(ex, x, gates), lora_reference(ex, x, gates)
    torch.testing.assert_close(loop, fast)
    torch.testing.assert_close(dense, fast)
    ga = torch.autograd.grad(fast.sum(), [x, ex.lora_A, ex.lora_B])
    gb = torch.autograd.grad(loop.sum(), [x, ex.lora_A, ex.lora_B])
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b)
    # expert 3 got no token: its B block has zero gradient in both
    assert not ga[2][:, 6:8].any() and not gb[2][:, 6:8].any()


def test_loramoe_form_loop_equals_the_stacked_experts_in_eval_mode():
    torch.manual_seed(7)
    ex = LoRAExperts(6, 5, num_experts=4, rank=2, alpha=4.0, dropout=0.3).eval()
    with torch.no_grad():
        ex.lora_B.normal_()
    x = torch.randn(7, 6, requires_grad=True)
    gates = torch.softmax(torch.randn(7, 4), dim=-1)
    fast, loop = ex(x, gates), lora_loramoe_loop(ex, x, gates)
    torch.testing.assert_close(loop, fast)
    ga = torch.autograd.grad(fast.sum(), [x, ex.lora_A, ex.lora_B])
    gb = torch.autograd.grad(loop.sum(), [x, ex.lora_A, ex.lora_B])
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b)


def test_loramoe_form_loop_draws_a_dropout_mask_per_expert_in_training():
    """LoRAMoE's released forward calls its dropout inside the loop over experts: one mask per expert, from
    torch's dropout. Two identical experts with equal gates then differ only by their masks."""
    torch.manual_seed(8)
    ex = LoRAExperts(64, 1, num_experts=2, rank=1, alpha=1.0, dropout=0.5).train()
    with torch.no_grad():
        ex.lora_A.fill_(1.0)
        ex.lora_B.fill_(1.0)
    x, gates = torch.ones(4, 64), torch.tensor([[1.0, 0.0], [0.0, 1.0]]).repeat(2, 1)
    torch.manual_seed(9)
    out = lora_loramoe_loop(ex, x, gates)  # (4, 1): row t gets expert t % 2 only
    torch.manual_seed(9)
    m0, m1 = (torch.nn.functional.dropout(x, 0.5, True) for _ in range(2))  # the two draws, in expert order
    torch.testing.assert_close(out, torch.where(gates[:, :1].bool(), m0.sum(1, keepdim=True), m1.sum(1, keepdim=True)))
    assert not torch.equal(m0, m1)


def test_the_soft_loop_reference_compiles_to_one_graph():
    """Under compile the per-expert loop computes every expert instead of testing its gates on the host
    (``bool(g.any())`` breaks the graph), so the bench's compiled ``loop_soft`` is a whole-graph loop."""
    torch.manual_seed(0)
    experts = LoRAExperts(16, 12, 4, 2)
    nn.init.normal_(experts.lora_B)
    x, gates = torch.randn(6, 16), torch.softmax(torch.randn(6, 4), -1)
    gates[:, 2] = 0.0  # an expert no token uses: skipped eagerly, computed (as zero) when compiled
    f = torch.compile(lambda x, g: lora_reference(experts, x, g), backend="eager", fullgraph=True)
    torch.testing.assert_close(f(x, gates), lora_reference(experts, x, gates))
    torch.testing.assert_close(f(x, gates), experts(x, gates))


def test_swap_in_loops_replaces_every_multi_expert_lora_forward():
    """The bench's loop variants: every LoRA expert set with more than one expert runs the loop instead,
    a single-expert LoRA keeps its stacked forward, and the model's output is unchanged (dropout off)."""
    model, _, _ = build_mole_model(compose_tiny(["method=mola", "adapter.dropout=0"]))
    ids = torch.randint(3, 100, (2, 6))
    before = model(input_ids=ids).logits
    sets = [m for m in model.modules() if isinstance(m, LoRAExperts)]
    assert sets and all(m.num_experts > 1 for m in sets)
    assert swap_in_loops(model, lora_gather_loop) == len(sets)
    assert all(m.forward.__func__ is lora_gather_loop for m in sets)
    torch.testing.assert_close(model(input_ids=ids).logits, before)
    single = LoRAExperts(4, 4, num_experts=1)
    assert swap_in_loops(single, lora_gather_loop) == 0 and "forward" not in vars(single)
