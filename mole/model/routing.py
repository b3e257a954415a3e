"""Collect the routers' outputs of one forward pass, for the auxiliary losses and analyses."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from mole.routers.base import RouterOutput


@contextmanager
def collect_routing(model: nn.Module) -> Iterator[list[RouterOutput]]:
    """Inside the block, every routed MoLE layer appends its :class:`RouterOutput` to the yielded list.

    The outputs keep their autograd graph (losses backpropagate through them); the list is detached
    from the layers on exit, so nothing is retained between steps.
    """
    sink: list[RouterOutput] = []
    # MoLE layers with their own router, shared routers and per-layer routers all publish here
    layers = [m for m in model.modules() if hasattr(m, "routing_sink")]
    for m in layers:
        m.routing_sink = sink
    try:
        yield sink
    finally:
        for m in layers:
            m.routing_sink = None
