"""Router placement (per Linear, shared, per layer), instance-level routing and single-LoRA targets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mole import CONF_DIR
from mole.build import build_mole_model, parameter_report
from mole.model.inject import mole_layers
from mole.model.routing import collect_routing
from mole.utils.errors import MoleConfigError

IDS = torch.randint(0, 500, (2, 7))


def _router_weights(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "router" in n and p.requires_grad)


def test_shared_routers_one_per_input_group(tiny_cfg):
    # 4 layers x 8 experts; q/k/v share one router, gate/up share one, o and down keep their own
    per_linear, _, _ = build_mole_model(tiny_cfg("experts=uniform_8", "router=soft"))
    shared, _, rep = build_mole_model(tiny_cfg("experts=uniform_8", "router=soft", "experts.placement=shared"))
    assert rep.routers_per_layer == [4, 4, 4, 4]  # qkv, gate_up, o, down
    d, e = 64, 8
    # per Linear: 7 routers of d x E per layer (every targeted Linear reads width 64 except down: 128)
    assert _router_weights(per_linear) == 4 * (6 * d * e + 2 * d * e)
    assert _router_weights(shared) == 4 * (2 * d * e + d * e + 2 * d * e)
    layer = shared.model.layers[0]
    with collect_routing(shared) as outs:
        shared(input_ids=IDS)
    assert len(outs) == 4 * 4  # each shared router published once per forward
    q, k = layer.self_attn.q_proj, layer.self_attn.k_proj
    assert q.gate_source is k.gate_source is layer.mole_shared_routers["q_proj_k_proj_v_proj"]


def test_shared_router_gives_the_same_gates_to_its_members(tiny_cfg):
    model, _, _ = build_mole_model(tiny_cfg("experts=uniform_8", "router=topk", "experts.placement=shared"))
    seen = {}
    attn = model.model.layers[1].self_attn
    for name in ("q_proj", "k_proj", "v_proj"):
        mod = getattr(attn, name)
        orig = mod.mole_experts.forward
        mod.mole_experts.forward = lambda x, gates, _n=name, _o=orig: (seen.__setitem__(_n, gates), _o(x, gates))[1]
    model(input_ids=IDS)
    assert seen["q_proj"] is seen["k_proj"] is seen["v_proj"]
    assert seen["q_proj"].shape == (IDS.numel(), 8)


def test_layer_router_weighs_every_expert_of_the_layer(tiny_cfg):
    model, _, rep = build_mole_model(
        tiny_cfg("experts=single", "router=soft", "experts.placement=layer",
                 "experts.targets=[q_proj,k_proj,v_proj,o_proj,up_proj]")
    )
    assert rep.routers_per_layer == [1, 1, 1, 1]
    lr = model.model.layers[0].mole_layer_router
    assert lr.num_experts == 5 and lr.router.gate.weight.shape == (5, 64)
    seen = {}
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    for name, mod in (("q", attn.q_proj), ("o", attn.o_proj), ("up", mlp.up_proj)):
        orig = mod.mole_experts.forward
        mod.mole_experts.forward = lambda x, gates, _n=name, _o=orig: (seen.__setitem__(_n, gates), _o(x, gates))[1]
    with collect_routing(model) as outs:
        model(input_ids=IDS)
    assert len(outs) == 4
    full = outs[0].gates  # (N, 5), softmax over the layer's five experts
    torch.testing.assert_close(full.sum(-1), torch.ones(IDS.numel()))
    torch.testing.assert_close(seen["q"], full[:, 0:1])
    torch.testing.assert_close(seen["o"], full[:, 3:4])
    torch.testing.assert_close(seen["up"], full[:, 4:5])


@pytest.mark.parametrize("placement", ["shared", "layer"])
def test_fresh_model_with_placement_equals_base(tiny_cfg, placement):
    cfg = tiny_cfg("experts=uniform_8", "router=soft", f"experts.placement={placement}")
    base, _, _ = build_mole_model(tiny_cfg("experts=single", "router=none", "experts.targets=[q_proj]"))
    model, _, _ = build_mole_model(cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, base(input_ids=IDS).logits, rtol=0, atol=0)


def test_instance_level_routing_is_constant_within_a_sequence_and_ignores_padding(tiny_cfg):
    model, _, _ = build_mole_model(tiny_cfg("experts=uniform_8", "router=soft", "experts.level=instance"))
    ids = torch.randint(0, 500, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0  # sequence 2: 4 real tokens, 2 padding
    with collect_routing(model) as outs:
        model(input_ids=ids, attention_mask=mask)
    g = outs[0].gates.view(2, 6, 8)
    assert torch.equal(g[0], g[0, :1].expand(6, 8)) and torch.equal(g[1], g[1, :1].expand(6, 8))
    assert not torch.allclose(g[0, 0], g[1, 0])
    assert outs[0].distributions()[0].level == "sequence" and outs[0].distributions()[0].probs.shape == (2, 8)
    # changing the padded positions' tokens changes nothing in sequence 2's routing decision
    ids2 = ids.clone()
    ids2[1, 4:] = (ids2[1, 4:] + 7) % 500
    with collect_routing(model) as outs2:
        model(input_ids=ids2, attention_mask=mask)
    torch.testing.assert_close(outs2[0].gates.view(2, 6, 8)[1, 0], g[1, 0])


def test_single_targets_get_one_plain_expert(tiny_cfg):
    model, _, rep = build_mole_model(
        tiny_cfg("experts=uniform_8", "router=soft", "experts.single_targets=[o_proj,down_proj]",
                 "experts.targets=[q_proj,k_proj,v_proj,gate_proj,up_proj]")
    )
    layers = dict(mole_layers(model))
    o = layers["model.layers.0.self_attn.o_proj"]
    q = layers["model.layers.0.self_attn.q_proj"]
    assert o.num_experts == 1 and o.mole_router is None
    assert q.num_experts == 8 and q.mole_router is not None
    assert rep.routers_per_layer == [5, 5, 5, 5]
    # r=8 LoRA on o (64->64) and down (128->64) per layer, plus 8 experts on the other five
    params = parameter_report(model, rep)
    lora = lambda i, o, e: e * 8 * (i + o)  # noqa: E731
    per_layer = lora(64, 64, 1) + lora(128, 64, 1) + 3 * lora(64, 64, 8) + 2 * lora(64, 128, 8) + 0
    routers = 5 * 64 * 8
    # q/k/v outputs: q 64, k and v 32 (2 kv heads of 16) -> adjust k, v
    per_layer -= 2 * 8 * 8 * 32
    assert params["trainable"] == 4 * (per_layer + routers)


def test_overlapping_single_targets_is_a_config_error(tiny_cfg):
    with pytest.raises(MoleConfigError, match="experts.single_targets"):
        build_mole_model(tiny_cfg("experts.single_targets=[q_proj]"))


def test_unknown_placement_is_a_config_error(tiny_cfg):
    with pytest.raises(MoleConfigError, match="experts.placement"):
        build_mole_model(tiny_cfg("experts.placement=everywhere"))


_ROUTERS = sorted(p.stem for p in (Path(CONF_DIR) / "router").glob("*.yaml") if p.stem != "none")
# every router with the default layout is in test_configs.py; here, two more shapes: an odd uniform
# count and the reversed MoLA layout (2 experts in the top layers)
_LAYOUTS = ["uniform_5", "mola_8642"]


@pytest.mark.parametrize("layout", _LAYOUTS)
@pytest.mark.parametrize("router", _ROUTERS)
def test_any_router_combines_with_any_layout(tiny_cfg, router, layout):
    """`mole-train router=<r> experts=<layout>`: every pair builds, routes and gives finite outputs."""
    model, _, rep = build_mole_model(tiny_cfg(f"router={router}", f"experts={layout}"))
    assert all(r > 0 for r in rep.routers_per_layer)
    with collect_routing(model) as outs:
        logits = model(input_ids=IDS).logits
    assert torch.isfinite(logits).all() and outs
    for out in outs:
        assert out.gates.shape[0] == IDS.numel() and torch.isfinite(out.gates).all()
