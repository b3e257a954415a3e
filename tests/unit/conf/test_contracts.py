"""Every ``conf/router``, ``conf/adapter`` and ``conf/loss`` file builds objects that keep their written contract.

The contracts: :class:`mole.routers.base.Router` (and :class:`~mole.routers.base.RouterOutput`), the adapter
kinds of :mod:`mole.adapters.kinds`, and :class:`mole.losses.AuxLoss`. Each file is composed and built on
tiny_llama as ``mole-train`` would build it; the objects are checked against the protocol
(``isinstance`` against the runtime-checkable protocol) and for what the protocol promises in a forward pass.
A new config file is picked up here without any edit.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from conftest import compose_tiny, partners
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mole import CONF_DIR
from mole.adapters.kinds import (
    KINDS,
    PROTOCOLS,
    BlockAdapter,
    LinearAdapter,
    ModelAdapter,
    adapter_class,
    check_quantized_adapter,
)
from mole.build import build_aux_losses, build_mole_model
from mole.losses import AuxLoss
from mole.model.base import build_model
from mole.model.blocks import BlockExperts, block_of
from mole.model.inject import decoder_layers, is_trainable_name, mole_layers
from mole.model.routing import collect_routing
from mole.model.state import saves_everything
from mole.routers.base import Router, RouterNeeds, param_dtype, router_needs, run_router
from mole.utils.errors import MoleConfigError
from mole.utils.targets import target_of

B, T = 2, 7  # the batch every forward below runs: two sequences of 7 tokens, the second with 2 padding tokens


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def _build(group: str, option: str, *extra: str):
    cfg = compose_tiny([f"{group}={option}", *partners(group, option), *extra])
    model, _, _ = build_mole_model(cfg)
    return cfg, model


def _batch(model) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, model.config.vocab_size, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, -2:] = 0
    return ids, mask


def _forward(model):
    """The router outputs of one forward, and the ``(B*T,)`` real-token mask."""
    ids, mask = _batch(model)
    with collect_routing(model) as routing:
        model(input_ids=ids, attention_mask=mask)
    return list(routing), mask.reshape(-1).bool()


# ---- routers ----


def check_router_output(out, num_experts: int, rows: int) -> None:
    """What :class:`~mole.routers.base.RouterOutput` promises for ``rows`` tokens and ``num_experts`` experts."""
    for name in ("gates", "probs"):
        t = getattr(out, name)
        assert t.shape == (rows, num_experts) and t.dtype == torch.float32, f"{name}: {tuple(t.shape)} {t.dtype}"
        assert torch.isfinite(t).all(), f"{name} not finite"
    assert (out.gates >= 0).all(), "negative gates"
    if out.selected is not None:
        assert out.selected.dtype == torch.bool and out.selected.shape == (rows, num_experts)
        assert (out.gates[~out.selected] == 0).all(), "an expert that was not selected has a non-zero gate"
    for stats in out.balance:
        assert stats.probs.dim() == 2 and stats.selected.shape == stats.probs.shape
        assert stats.selected.dtype == torch.bool and stats.level in ("token", "sequence")
        assert stats.probs.shape[0] == (rows if stats.level == "token" else B)
        if stats.k is not None:
            assert (stats.selected.sum(-1) == stats.k).all(), f"rows of selected do not hold k={stats.k} choices"
    for dist in out.distributions():
        assert dist.probs.dim() == 2 and dist.kind in ("token", "task") and dist.level in ("token", "sequence")


@pytest.mark.parametrize("option", _options("router"))
def test_router_configs_keep_the_router_contract(option):
    cfg, model = _build("router", option)
    target = target_of(cfg.router, "router", "router")
    needs = router_needs(target)
    assert isinstance(needs, RouterNeeds)
    declared = [*needs.layer_inputs, *(m.key for m in needs.model_modules)]
    assert set(declared) <= set(inspect.signature(target).parameters), "the constructor takes what it declares"
    layers = [layer for _, layer in mole_layers(model)]
    routed = [layer for layer in layers if layer.mole_router is not None]
    if not routed:  # a router config that builds none is only valid for one expert per layer
        assert layers and all(layer.num_experts == 1 for layer in layers)
        return
    for layer in routed:
        router = layer.mole_router
        assert isinstance(router, Router), f"{type(router).__name__} does not follow mole.routers.base.Router"
        assert router.num_experts == layer.num_experts
        assert {p.dtype for p in router.parameters()} == {param_dtype(router)}, "a router's parameters share one dtype"
    outputs, _ = _forward(model)
    assert len(outputs) == len(routed)  # one output per router and forward, in module order
    for layer, out in zip(routed, outputs, strict=True):
        check_router_output(out, layer.num_experts, B * T)
    # the router runs in its own dtype whatever its input's, and its gates stay fp32
    layer = routed[-1]
    router = layer.mole_router.to(torch.float64)
    assert param_dtype(router) == torch.float64
    out = run_router(router, torch.randn(B * T, layer.in_features))
    check_router_output(out, layer.num_experts, B * T)


# ---- adapters ----


def _declared_flags(protocol: type) -> list[str]:
    return [name for name, kind in protocol.__annotations__.items() if kind in ("bool", bool)]


@pytest.mark.parametrize("option", _options("adapter"))
def test_adapter_configs_keep_their_kinds_contract(option):
    cfg, model = _build("adapter", option)
    cls = adapter_class(cfg.adapter, "adapter")
    kind = cls.adapter_kind
    assert kind in KINDS
    for flag in _declared_flags(PROTOCOLS[kind]):
        assert isinstance(getattr(cls, flag), bool), f"{cls.__name__}.{flag} must be declared true or false"
    # a class that reads the frozen weights is refused on a quantized base, one that does not is accepted
    quantized = OmegaConf.merge(cfg, {"model": {"quantization": "nf4"}})
    if cls.reads_base_weights:
        with pytest.raises(MoleConfigError, match="cannot be used with"):
            check_quantized_adapter(quantized)
    if kind == "model":
        _check_model_adapter(cls, cfg, model)
        return
    if kind == "linear":
        _check_linear_adapters(cls, model)
    else:
        _check_block_adapters(cls, model)
    # a fresh adapter of either kind leaves the model's output as the base model's
    base, _ = build_model(cfg.model, seed=cfg.seed)
    ids, mask = _batch(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                                   base(input_ids=ids, attention_mask=mask).logits)


def _check_linear_adapters(cls, model) -> None:
    layers = [layer for _, layer in mole_layers(model)]
    assert layers
    for layer in layers:
        experts = layer.mole_experts
        assert isinstance(experts, LinearAdapter) and type(experts) is cls and experts.adapter_kind == "linear"
        assert (experts.in_features, experts.out_features) == (layer.in_features, layer.out_features)
        # the declarations are what the constructor and forward take
        assert ("base_layer" in inspect.signature(cls).parameters) == cls.reads_base_weights
        assert ("base_out" in inspect.signature(experts.forward).parameters) == cls.reads_base_output
        assert ("add_to" in inspect.signature(experts.forward).parameters) == cls.adds_to_output
    layer = layers[0]
    experts, n, e = layer.mole_experts, 5, layer.mole_experts.num_experts
    x = torch.randn(n, layer.in_features)
    gates = None if e == 1 else torch.softmax(torch.randn(n, e), dim=-1)
    extra = {"base_out": layer.base_layer(x)} if experts.reads_base_output else {}
    out = experts(x, gates, **extra)
    assert out.shape == (n, layer.out_features) and out.dtype == param_dtype(experts)


def _check_block_adapters(cls, model) -> None:
    blocks = [(i, m) for i, layer in enumerate(decoder_layers(model)) for m in layer.modules() if isinstance(m, BlockExperts)]
    assert any(type(m) is cls for _, m in blocks)
    for i, experts in blocks:
        assert isinstance(experts, BlockAdapter) and experts.adapter_kind == "block"
        assert experts.position in ("ffn", "attn")
        # attached where it says: on its block of its own layer, under its attribute
        assert getattr(block_of(decoder_layers(model)[i], experts.position), experts.attr_name) is experts


def _check_model_adapter(cls, cfg, model) -> None:
    base, _ = build_model(cfg.model, seed=cfg.seed)
    assert isinstance(instantiate(cfg.adapter)(model=base), ModelAdapter)
    assert saves_everything(model) == cls.saves_everything
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if cls.saves_everything:
        assert trainable == {n for n, _ in model.named_parameters()}
    else:
        assert trainable and all(is_trainable_name(n) for n in trainable)


# ---- auxiliary losses ----


@pytest.mark.parametrize("option", _options("loss"))
def test_loss_configs_keep_the_aux_loss_contract(option):
    cfg, model = _build("loss", option, "router=topk")
    terms = build_aux_losses(cfg)
    assert set(terms) == set(cfg.loss or {})  # one term per entry of the file (loss=none: none)
    if not terms:
        return
    outputs, token_mask = _forward(model)
    ids, mask = _batch(model)
    for name, term in terms.items():
        assert isinstance(term, AuxLoss), f"loss.{name} does not follow mole.losses.AuxLoss"
        assert isinstance(term.weight, float) and term.weight >= 0 and isinstance(term.per_step, bool)
        value = term(outputs, token_mask)
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and value.is_floating_point()
        assert torch.isfinite(value) and value.requires_grad, f"loss.{name} is not a differentiable scalar"
        empty = term([], token_mask)  # a model without routers: nothing to act on
        assert empty.dim() == 0 and float(empty) == 0.0
        step = term.step_loss(model, [(ids, mask.bool(), None)])
        if term.per_step:
            assert step is not None and step.dim() == 0
        else:
            assert step is None
