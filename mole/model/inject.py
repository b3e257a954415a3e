"""Replace target Linear layers of a Hugging Face causal LM with :class:`MoLELinear` (in place).

Target modules are named as in Llama, Qwen2 and Mistral (``q_proj k_proj v_proj o_proj gate_proj
up_proj down_proj``); any Linear whose attribute name is listed in ``experts.targets`` is adapted in
every decoder layer, with that layer's expert count from the layout. Afterwards only parameters under a
``mole_`` attribute train.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from mole.model.layer import MoLELinear
from mole.utils.errors import MoleConfigError

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


def inject_mole(
    model: nn.Module,
    *,
    experts_per_layer: Sequence[int],
    targets: Sequence[str],
    expert_factory: Callable[..., nn.Module],
    router_factory: Callable[..., nn.Module | None],
    adapter_dtype: torch.dtype | None = None,
) -> InjectionReport:
    """Adapt ``targets`` in every decoder layer and freeze everything else.

    Args:
        model: a Hugging Face causal LM, modified in place.
        experts_per_layer: E for each decoder layer (from :func:`mole.experts.expand_layout`).
        targets: attribute names of the Linears to adapt (``experts.targets``).
        expert_factory: ``(in_features, out_features, num_experts) -> experts`` (``adapter`` config).
        router_factory: ``(in_features, num_experts) -> router or None`` (``router`` config).
        adapter_dtype: dtype of the experts and routers (``model.adapter_dtype``); ``None``: the base
            Linear's dtype. fp32 adapters on a bf16 base train in full precision (the layer casts its input).

    Returns:
        An :class:`InjectionReport`.
    """
    layers = decoder_layers(model)
    if len(experts_per_layer) != len(layers):
        raise MoleConfigError(
            f"experts layout gives {len(experts_per_layer)} layers but the model has {len(layers)}"
        )
    targets = list(targets)
    if not targets:
        raise MoleConfigError("experts.targets is empty; list the Linear modules to adapt, e.g. [q_proj, v_proj]")
    available = sorted(
        {name.rsplit(".", 1)[-1] for name, m in layers[0].named_modules() if isinstance(m, nn.Linear)}
    )
    missing = [t for t in targets if t not in available]
    if missing:
        raise MoleConfigError(
            f"experts.targets: {missing} not found in {type(model).__name__}; its Linear modules are {available}"
        )

    report = InjectionReport(experts_per_layer=list(experts_per_layer))
    for idx, (layer, num_experts) in enumerate(zip(layers, experts_per_layer, strict=True)):
        # collect first, then replace: never mutate a module tree while iterating it
        found = [
            (name, m)
            for name, m in layer.named_modules()
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets
        ]
        routers = 0
        for name, linear in found:
            router = router_factory(in_features=linear.in_features, num_experts=num_experts)
            experts = expert_factory(
                in_features=linear.in_features, out_features=linear.out_features, num_experts=num_experts
            )
            dtype = adapter_dtype or linear.weight.dtype
            experts.to(device=linear.weight.device, dtype=dtype)
            if router is not None:
                router.to(device=linear.weight.device, dtype=dtype)
                routers += 1
            parent_name, _, child = name.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            setattr(parent, child, MoLELinear(linear, experts, router))
        report.adapted[idx] = [n for n, _ in found]
        report.routers_per_layer.append(routers)

    mark_trainable(model)
    return report


def mark_trainable(model: nn.Module) -> None:
    """Freeze every parameter except those under a ``mole_`` attribute."""
    for name, p in model.named_parameters():
        p.requires_grad_(is_trainable_name(name))


def is_trainable_name(name: str) -> bool:
    return any(part.startswith(TRAINABLE_PREFIX) for part in name.split("."))


def mole_layers(model: nn.Module) -> list[tuple[str, MoLELinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoLELinear)]
