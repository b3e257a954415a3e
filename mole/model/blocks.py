"""Block-level experts: adapters that act on a whole transformer block instead of one Linear.

Three kinds live in :mod:`mole.adapters` (SPEC §1):

* :class:`~mole.adapters.ParallelAdapterExperts` — a bottleneck MLP in parallel to the FFN or attention
  block (He et al. 2022; a MoA expert);
* :class:`~mole.adapters.PromptExperts` — zero-initialised gated prompts inside the attention block
  (LLaMA-Adapter, Zhang et al. 2023; a MoA expert and the LLaMA-Adapter baseline);
* :class:`~mole.adapters.FFNLoRAExperts` — MixLoRA (Li et al. 2024): the FFN block becomes E experts,
  each the whole FFN with LoRA on gate/up/down.

They share :class:`BlockExperts`: E experts of one decoder layer, gated like a :class:`MoLELinear` —
by their own router (reading the block's input), by a :class:`~mole.routers.placement.LayerRouter`
slice (``experts.placement=layer``, MoA), or not at all (one expert, ``router=none``).

:func:`inject_blocks` is called by :func:`mole.model.inject.inject_mole` for each decoder layer *after*
the layer's Linears are adapted and *before* a per-layer router is built, so block experts claim their
gate columns after the Linear experts (MoA: columns 0-4 the LoRA experts on q, k, v, o, up; then the
parallel adapter; then the prompt). Module paths of the base model never change: experts are added as
``mole_*`` children of the block they adapt and work through forward hooks, except MixLoRA, which
replaces the FFN module by one that keeps the same ``gate_proj``/``up_proj``/``down_proj`` children.

Which layers get a block expert: the adapter key ``layers`` (not passed to the class):
``null`` = every layer; a Python slice string over the layer list, e.g. ``"2:"`` (all but the bottom
two: LLaMA-Adapter's top 30 of 32 layers) or ``"-4:"`` (the top four); or a list of layer indices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mole.routers.base import RouterOutput, run_router
from mole.utils.errors import MoleConfigError

POSITIONS = ("ffn", "attn")
BLOCK_ATTR = {"ffn": "mlp", "attn": "self_attn"}  # where each block sits in a Llama/Qwen2/Mistral layer


class BlockExperts(nn.Module):
    """E experts acting on one transformer block; subclasses define the computation and :meth:`attach`.

    Attributes set by subclasses: ``num_experts``, ``in_features`` (width of the block's input, what a
    router reads), ``position`` (``"ffn"`` or ``"attn"``) and ``attr_name`` (the ``mole_*`` attribute
    under which the experts are registered on the block).
    """

    adapter_kind = "block"  # the contract: mole.adapters.kinds.BlockAdapter
    reads_base_weights = False  # true for experts that compute with the block's frozen weights (MixLoRA)
    attr_name = "mole_block"

    def __init__(self) -> None:
        super().__init__()
        self.router: nn.Module | None = None  # own router (trainable: lives under the mole_* attribute)
        self.routing_sink: list[RouterOutput] | None = None  # see mole.model.routing.collect_routing
        object.__setattr__(self, "gate_source", None)  # LayerRouter slice: owned by the layer

    def set_gate_source(self, source: Any) -> None:
        object.__setattr__(self, "gate_source", source)

    def route(self, flat: Tensor, x: Tensor) -> Tensor | None:
        """Gates ``(N, E)`` for the block's input ``flat`` ``(N, d)``, or ``None`` for one ungated expert."""
        if self.router is not None:
            return run_router(self.router, flat, self.routing_sink).gates
        if self.gate_source is not None:
            return self.gate_source.route(flat, x)
        if self.num_experts != 1:
            raise RuntimeError(f"{type(self).__name__}: {self.num_experts} experts but no router")
        return None

    def attach(self, layer: nn.Module) -> None:
        raise NotImplementedError


def block_of(layer: nn.Module, position: str) -> nn.Module:
    """The decoder layer's FFN (``mlp``) or attention (``self_attn``) module."""
    name = BLOCK_ATTR[position]
    block = getattr(layer, name, None)
    if not isinstance(block, nn.Module):
        raise MoleConfigError(f"adapter: block experts need `{name}` in every decoder layer; {type(layer).__name__} has none")
    return block


def hidden_size_of(layer: nn.Module) -> int:
    """Width of a decoder layer's hidden states (Llama/Qwen2/Mistral layers carry ``hidden_size``)."""
    size = getattr(layer, "hidden_size", None)
    if isinstance(size, int):
        return size
    norm = getattr(layer, "input_layernorm", None)
    weight = getattr(norm, "weight", None)
    if isinstance(weight, Tensor):
        return int(weight.shape[0])
    raise MoleConfigError(f"adapter: cannot tell the hidden size of {type(layer).__name__}")


@dataclass
class BlockSpec:
    """One configured block adapter: a factory ``(layer, num_experts) -> BlockExperts`` and its layers."""

    name: str  # the config key it came from, e.g. "adapter" or "adapter.blocks.prompt"
    factory: Callable[..., BlockExperts]
    layers: Any = None  # adapter key `layers` (see the module docstring)


def select_layers(spec: Any, num_layers: int, key: str) -> list[int]:
    """Layer indices named by a ``layers`` value: null, a ``"start:stop"`` slice string or a list."""
    every = list(range(num_layers))
    if spec is None:
        return every
    if isinstance(spec, str):
        parts = spec.split(":")
        try:
            if len(parts) != 2:
                raise ValueError
            bounds = [int(p) if p.strip() else None for p in parts]
        except ValueError:
            raise MoleConfigError(f"{key} must be null, a slice like '2:' or '-30:', or a list of layer indices; got {spec!r}") from None
        for b in bounds:
            if b is not None and not -num_layers <= b <= num_layers:
                raise MoleConfigError(f"{key}={spec!r} reaches past the model's {num_layers} layers")
        chosen = every[slice(*bounds)]
    elif isinstance(spec, Sequence) and all(isinstance(i, int) and not isinstance(i, bool) for i in spec):
        bad = [i for i in spec if not 0 <= i < num_layers]
        if bad:
            raise MoleConfigError(f"{key}: layer indices {bad} are outside 0..{num_layers - 1}")
        chosen = sorted(set(spec))
    else:
        raise MoleConfigError(f"{key} must be null, a slice like '2:' or a list of layer indices; got {spec!r}")
    if not chosen:
        raise MoleConfigError(f"{key}={spec!r} selects no layer of the model's {num_layers}")
    return chosen


def inject_blocks(
    layer: nn.Module,
    idx: int,
    specs: Sequence[BlockSpec],
    num_experts: int,
    *,
    num_layers: int,
    placement: str,
    make_router: Callable[[int, int, int], nn.Module | None],
    layer_router: Any = None,
    adapter_dtype: torch.dtype | None = None,
) -> tuple[list[str], int]:
    """Add every configured block adapter to decoder layer ``idx``.

    Args:
        layer: the decoder layer (modified in place).
        idx: its index.
        specs: the block adapters, in config order (the order of their gate columns).
        num_experts: E of this layer (from the experts layout).
        num_layers: L, for the ``layers`` selection.
        placement: ``linear``/``shared`` (each block expert has its own router) or ``layer``.
        make_router: ``(layer_idx, in_features, num_experts) -> router or None``.
        layer_router: the layer's :class:`~mole.routers.placement.LayerRouter` (placement ``layer``).
        adapter_dtype: dtype of the block experts and their routers (``model.adapter_dtype``); ``None``: the
            layer's.

    Returns:
        ``(names of the adapted blocks, number of routers created)``.
    """
    ref = next(layer.parameters())
    names: list[str] = []
    routers = 0
    for spec in specs:
        if idx not in select_layers(spec.layers, num_layers, f"{spec.name}.layers"):
            continue
        experts = spec.factory(layer=layer, num_experts=num_experts)
        if not isinstance(experts, BlockExperts):
            raise MoleConfigError(f"{spec.name}: _target_ must build a block adapter, got {type(experts).__name__}")
        experts.to(device=ref.device, dtype=adapter_dtype or ref.dtype)
        if placement == "layer":
            experts.set_gate_source(layer_router.claim(num_experts))
        else:
            router = make_router(idx, experts.in_features, num_experts)
            if router is not None:
                experts.router = router.to(device=ref.device, dtype=adapter_dtype or ref.dtype)
                routers += 1
        experts.attach(layer)
        names.append(f"{BLOCK_ATTR[experts.position]}.{experts.attr_name}")
    return names, routers
