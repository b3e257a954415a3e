"""``MoLELinear``: a frozen base Linear plus E LoRA experts mixed by a router.

``z = W x + sum_i g_i(x) B_i A_i x`` (SPEC notation; MoR eq. 4). The parts arrive ready-made
(composition, no inheritance): the frozen ``nn.Linear``, the stacked experts and the router (``None``
for a single expert). Every trainable parameter lives under an attribute starting with ``mole_``, so
"what trains" and "what is saved" are one name filter (:mod:`mole.model.state`).
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor, nn

from mole.routers.base import Router, RouterOutput, param_dtype, run_router


class GateSource(Protocol):
    """Gates computed outside the layer: a shared router or a slice of a per-layer router."""

    def route(self, flat: Tensor, x: Tensor) -> Tensor: ...


class MoLELinear(nn.Module):
    """A Linear layer with a mixture of LoRA experts.

    Args:
        base: the frozen Linear of the base model (kept as ``base_layer``).
        experts: the layer's experts: ``experts(x (N, d_in), gates (N, E) or None) -> (N, d_out)``;
            experts with ``reads_base_output = True`` (DoRA) also receive ``base_out`` = ``W x + b``
            (the contract: :class:`mole.adapters.kinds.LinearAdapter`).
        router: the layer's own gating function, or ``None`` when there is a single expert or the
            gates come from ``gate_source``.
        gate_source: gates computed elsewhere (router sharing, one router per transformer layer, see
            :mod:`mole.routers.placement`); held by reference, its parameters live with its owner.
    """

    def __init__(self, base: nn.Linear, experts: nn.Module, router: Router | None = None,
                 gate_source: GateSource | None = None):
        super().__init__()
        self.base_layer = base
        self.mole_experts = experts
        self.mole_router = router
        object.__setattr__(self, "gate_source", gate_source)  # not a submodule: owned elsewhere
        self.in_features, self.out_features = base.in_features, base.out_features
        # while a list, every forward appends its RouterOutput here (see mole.model.routing)
        self.routing_sink: list[RouterOutput] | None = None

    @property
    def num_experts(self) -> int:
        return self.mole_experts.num_experts

    @property
    def weight(self) -> Tensor:
        """The frozen base weight (some model code reads ``proj.weight`` for its dtype or device)."""
        return self.base_layer.weight

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)  # (..., d_out)
        # (N, d_in), N = tokens in the batch; in the adapters' dtype (fp32 adapters on a bf16 base)
        flat = x.reshape(-1, self.in_features).to(param_dtype(self.mole_experts))
        gates = None
        if self.mole_router is not None:
            gates = run_router(self.mole_router, flat, self.routing_sink).gates  # (N, E), fp32
        elif self.gate_source is not None:
            gates = self.gate_source.route(flat, x)  # (N, E)
        experts = self.mole_experts
        # experts that add their update to W x themselves (one product fewer); not a forward replaced on the
        # instance (the benchmark's per-expert loops, tests' wrappers), which takes (x, gates) only
        if experts.adds_to_output and "forward" not in experts.__dict__:
            return experts(flat, gates, add_to=out.reshape(-1, self.out_features)).view(out.shape)
        if self.mole_experts.reads_base_output:
            # experts that depend on W x (DoRA) get the frozen output instead of recomputing it
            delta = self.mole_experts(flat, gates, base_out=out.reshape(-1, self.out_features))
        else:
            delta = self.mole_experts(flat, gates)  # (N, d_out)
        return out + delta.view(out.shape).to(out.dtype)
