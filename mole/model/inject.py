"""Replace target Linear layers of a Hugging Face causal LM with :class:`MoLELinear` (in place).

Target modules are named as in Llama, Qwen2 and Mistral (``q_proj k_proj v_proj o_proj gate_proj
up_proj down_proj``); any Linear whose attribute name is listed in ``experts.targets`` is adapted in
every decoder layer, with that layer's expert count from the layout. Afterwards only parameters under a
``mole_`` attribute train.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from mole.model.blocks import hidden_size_of, inject_blocks
from mole.model.layer import MoLELinear
from mole.routers.context import install_context
from mole.routers.placement import InstanceRouter, LayerRouter, SharedRouter, check_placement
from mole.utils.errors import MoleConfigError

if TYPE_CHECKING:
    from mole.model.blocks import BlockSpec

TRAINABLE_PREFIX = "mole_"


@dataclass
class InjectionReport:
    """What :func:`inject_mole` did, per decoder layer."""

    experts_per_layer: list[int]
    adapted: dict[int, list[str]] = field(default_factory=dict)  # layer -> adapted module names
    routers_per_layer: list[int] = field(default_factory=list)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers (``model.model.layers`` for Llama/Qwen2/Mistral)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and (n is None or len(module) == n) and len(module) > 0:
            return module
    raise MoleConfigError(
        f"model: found no list of {n} decoder layers in {type(model).__name__}; "
        "mole supports Hugging Face decoder-only models (Llama, Qwen2, Mistral)"
    )


DEFAULT_SHARE_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def inject_mole(
    model: nn.Module,
    *,
    experts_per_layer: Sequence[int],
    targets: Sequence[str],
    expert_factory: Callable[..., nn.Module] | None,
    router_factory: Callable[..., nn.Module | None],
    single_targets: Sequence[str] = (),
    placement: str = "linear",
    level: str = "token",
    share_groups: Sequence[Sequence[str]] = DEFAULT_SHARE_GROUPS,
    adapter_dtype: torch.dtype | None = None,
    blocks: Sequence[BlockSpec] = (),
) -> InjectionReport:
    """Adapt ``targets`` in every decoder layer and freeze everything else.

    Args:
        model: a Hugging Face causal LM, modified in place.
        experts_per_layer: E for each decoder layer (from :func:`mole.experts.expand_layout`).
        targets: attribute names of the Linears that get a mixture of experts (``experts.targets``).
        expert_factory: ``(in_features, out_features, num_experts, base_layer) -> experts`` (``adapter``
            config; ``base_layer`` is the frozen Linear), or ``None`` when only blocks are adapted.
        router_factory: ``(in_features, num_experts, layer_idx, num_layers, context) -> router or None``
            (``router`` config; ``context`` is the model's :class:`~mole.routers.context.RoutingContext`).
            The builder's factories pass on what the class declares it takes (:mod:`mole.adapters.kinds`,
            :class:`~mole.routers.base.RouterNeeds`).
        single_targets: Linears that get one plain expert and no router (HMoRA's "single LoRA" on
            o_proj and down_proj; MixLoRA's attention LoRA).
        placement: ``linear`` (a router per Linear), ``shared`` (Linears reading the same input share
            one, ``share_groups``) or ``layer`` (one router per transformer layer over all its experts);
            see :mod:`mole.routers.placement`.
        level: ``token`` or ``instance`` (one decision per sequence from mean-pooled features).
        share_groups: the Linears that read the same input, for ``placement="shared"``.
        adapter_dtype: dtype of the experts and routers (``model.adapter_dtype``); ``None``: the base
            Linear's dtype. fp32 adapters on a bf16 base train in full precision (the layer casts its input).
        blocks: block experts added to every (selected) layer after its Linears, claiming their gate
            columns after the Linear experts (see :mod:`mole.model.blocks`).

    Returns:
        An :class:`InjectionReport`.
    """
    check_placement(placement, level)
    layers = decoder_layers(model)
    if len(experts_per_layer) != len(layers):
        raise MoleConfigError(
            f"experts layout gives {len(experts_per_layer)} layers but the model has {len(layers)}"
        )
    targets, single_targets = list(targets), list(single_targets)
    if expert_factory is None and (targets or single_targets):
        raise MoleConfigError("experts.targets / experts.single_targets name Linear modules but no Linear adapter is configured")
    if not targets and not single_targets and not blocks:
        raise MoleConfigError("experts.targets is empty; list the Linear modules to adapt, e.g. [q_proj, v_proj]")
    overlap = sorted(set(targets) & set(single_targets))
    if overlap:
        raise MoleConfigError(f"experts.single_targets {overlap} are also in experts.targets; a module is one or the other")
    available = sorted(
        {name.rsplit(".", 1)[-1] for name, m in layers[0].named_modules() if isinstance(m, nn.Linear)}
    )
    for key, names in (("experts.targets", targets), ("experts.single_targets", single_targets)):
        missing = [t for t in names if t not in available]
        if missing:
            raise MoleConfigError(
                f"{key}: {missing} not found in {type(model).__name__}; its Linear modules are {available}"
            )

    context = install_context(model)
    num_layers = len(layers)

    def make_router(idx: int, in_features: int, num_experts: int) -> nn.Module | None:
        router = router_factory(in_features=in_features, num_experts=num_experts, layer_idx=idx,
                                num_layers=num_layers, context=context)
        if router is not None and level == "instance":
            router = InstanceRouter(router, context)
        return router

    def place(module: nn.Module, like: nn.Linear) -> nn.Module:
        return module.to(device=like.weight.device, dtype=adapter_dtype or like.weight.dtype)

    report = InjectionReport(experts_per_layer=list(experts_per_layer))
    for idx, (layer, num_experts) in enumerate(zip(layers, experts_per_layer, strict=True)):
        # collect first, then replace: never mutate a module tree while iterating it
        found = [
            (name, m)
            for name, m in layer.named_modules()
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in (*targets, *single_targets)
        ]
        routers = 0
        shared: dict[str, SharedRouter] = {}
        layer_router = LayerRouter(context) if placement == "layer" else None
        for name, linear in found:
            short = name.rsplit(".", 1)[-1]
            single = short in single_targets
            n_exp = 1 if single else num_experts
            experts = place(expert_factory(in_features=linear.in_features, out_features=linear.out_features,
                                           num_experts=n_exp, base_layer=linear), linear)
            router, source = None, None
            if single:
                pass
            elif placement == "layer":
                source = layer_router.claim(n_exp)
            elif placement == "shared" and any(short in g for g in share_groups):
                key = "_".join(next(g for g in share_groups if short in g))
                if key not in shared:
                    made = make_router(idx, linear.in_features, n_exp)
                    if made is None:
                        raise MoleConfigError("experts.placement=shared needs a router (router=none builds none)")
                    shared[key] = SharedRouter(place(made, linear), context)
                    routers += 1
                source = shared[key]
            else:
                router = make_router(idx, linear.in_features, n_exp)
                if router is not None:
                    place(router, linear)
                    routers += 1
            parent_name, _, child = name.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            setattr(parent, child, MoLELinear(linear, experts, router, gate_source=source))
        if shared:
            layer.mole_shared_routers = nn.ModuleDict(shared)
        block_names: list[str] = []
        if blocks:  # block experts claim their gate columns after the Linears, before the layer router is built
            block_names, made = inject_blocks(layer, idx, blocks, num_experts, num_layers=num_layers, placement=placement,
                                              make_router=make_router, layer_router=layer_router,
                                              adapter_dtype=adapter_dtype)
            routers += made
        if layer_router is not None and layer_router.num_experts:
            ref = next(layer.parameters())
            layer_router.build(lambda _i=idx, **kw: make_router(_i, **kw), in_features=_hidden_size(model, layer))
            layer_router.to(device=ref.device, dtype=adapter_dtype or ref.dtype)
            layer_router.attach(layer)
            layer.mole_layer_router = layer_router
            routers += 1
        report.adapted[idx] = [n for n, _ in found] + block_names
        report.routers_per_layer.append(routers)

    mark_trainable(model)
    return report


def _hidden_size(model: nn.Module, layer: nn.Module) -> int:
    size = getattr(getattr(model, "config", None), "hidden_size", None)
    if size:
        return int(size)
    return hidden_size_of(layer)


def mark_trainable(model: nn.Module) -> None:
    """Freeze every parameter except those under a ``mole_`` attribute."""
    for name, p in model.named_parameters():
        p.requires_grad_(is_trainable_name(name))


def is_trainable_name(name: str) -> bool:
    return any(part.startswith(TRAINABLE_PREFIX) for part in name.split("."))


def mole_layers(model: nn.Module) -> list[tuple[str, MoLELinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoLELinear)]
