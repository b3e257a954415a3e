"""Collect the routers' outputs of one forward pass, for the auxiliary losses and analyses."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from mole.routers.base import RouterOutput

_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


class RoutingOutputs(Sequence):
    """The router outputs of one forward, in module order, read from each routing module's own list.

    Each module appends to a list of its own rather than to one shared list: ``torch.compile`` guards on
    the length of a list the traced code appends to, so a shared list (7 outputs longer at every decoder
    layer) would give every layer a graph of its own.
    """

    def __init__(self, sinks: list[list[RouterOutput]], names: Sequence[str] | None = None):
        self._sinks = sinks
        self._names = list(names) if names is not None else None

    def layer_indices(self) -> list[int | None]:
        """The decoder layer of each output, in iteration order: the first numeric component of its routing
        module's name (``model.layers.3.self_attn.q_proj`` -> 3; the decoder stack is a ``ModuleList``), or
        ``None`` where the name has none or the outputs were collected without names."""
        out: list[int | None] = []
        for i, sink in enumerate(self._sinks):
            match = None if self._names is None else _LAYER.search(self._names[i])
            out += [int(match.group(1)) if match else None] * len(sink)
        return out

    def __len__(self) -> int:
        return sum(len(sink) for sink in self._sinks)

    def __getitem__(self, i):
        return list(self)[i]

    def __iter__(self) -> Iterator[RouterOutput]:
        return (out for sink in self._sinks for out in sink)


@contextmanager
def module_sinks(model: nn.Module) -> Iterator[list[tuple[int, str, nn.Module, list[RouterOutput]]]]:
    """Inside the block, each routing module (MoLE layers with their own router, shared routers, per-layer
    routers: anything with a ``routing_sink``) appends its outputs to a list of its own.

    Yields ``(position in model.named_modules(), module name, module, list)`` in module order; the modules are
    detached from their lists on exit, so nothing is retained between forwards.
    """
    attached = [(order, name, m, []) for order, (name, m) in enumerate(model.named_modules())
                if hasattr(m, "routing_sink")]
    for *_, m, sink in attached:
        m.routing_sink = sink
    try:
        yield attached
    finally:
        for *_, m, _ in attached:
            m.routing_sink = None


@contextmanager
def collect_routing(model: nn.Module) -> Iterator[RoutingOutputs]:
    """Inside the block, every routed MoLE layer publishes its :class:`RouterOutput`; the yielded
    sequence holds them all (in module order), during the block and after it.

    The outputs keep their autograd graph (losses backpropagate through them).
    """
    with module_sinks(model) as sinks:
        yield RoutingOutputs([sink for *_, sink in sinks], [name for _, name, *_ in sinks])
