"""Where a router sits and what it reads (SPEC §2, "Router placement options").

* ``linear`` (default): one router per adapted Linear, reading that Linear's input.
* ``shared`` (HMoRA Appendix C, "Router Sharing"): Linears that read the same input share one router —
  q/k/v share one, gate/up share one (``experts.share_groups``). :class:`SharedRouter` computes the
  gates once per forward and hands the same gates to every member.
* ``layer`` (MoA Sec. 3): one router per transformer layer weighs every expert in that layer.
  :class:`LayerRouter` reads the layer's normalised input (the output of ``input_layernorm``, what
  q/k/v read) and each adapted module takes its columns of the gates through a :class:`GateSlice`.
* ``experts.level: instance`` (MoA Table 5 baseline): one decision per sequence from the mean-pooled
  features over its prompt's real tokens (:class:`InstanceRouter`), broadcast to every token.

Routers stay plain ``(N, d_in) -> RouterOutput`` modules; these wrappers add the sharing and the
placement. They publish each RouterOutput to ``routing_sink`` once (see :mod:`mole.model.routing`).
"""

from __future__ import annotations

import weakref

from torch import Tensor, nn

from mole.routers.base import BalanceStats, GateDist, RouterOutput, run_router
from mole.routers.context import RoutingContext
from mole.utils.errors import MoleConfigError

PLACEMENTS = ("linear", "shared", "layer")
LEVELS = ("token", "instance")


class InstanceRouter(nn.Module):
    """One routing decision per sequence (MoA Table 5 "instance-level").

    The wrapped router reads the mean of the sequence's features over its prompt's real tokens (every
    real token when no prompt mask is set, as for lm-eval's log-likelihood requests); its gates are
    repeated for every token. The statistics it exposes have one row per sequence (``level="sequence"``).

    NOTE(deviation): MoA pools "the hidden states" of the sequence; mole pools the prompt's (what
    HMoRA's task router reads, eq. 6), so that the decision does not see the response it is trained to
    produce and is known before generation starts. A cached generation step (``context.incremental``)
    reuses the prompt's pooled features of the last full forward: cached and uncached decoding agree.

    Args:
        router: any token router ``(N, d_in) -> RouterOutput``.
        context: the model's :class:`RoutingContext` (batch shape and attention mask).
    """

    def __init__(self, router: nn.Module, context: RoutingContext):
        super().__init__()
        self.router = router
        self.num_experts = router.num_experts
        object.__setattr__(self, "_context", context)
        self._last: Tensor | None = None  # (B, d_in) detached, the last full forward's pooled prompt (generation)

    def forward(self, x: Tensor) -> RouterOutput:
        ctx = self._context
        shape = ctx.batch_shape
        if shape is None or shape[0] * shape[1] != x.shape[0]:
            raise RuntimeError("instance-level routing needs the batch's attention mask (model context not set)")
        b, t = shape
        if ctx.incremental:  # a cached generation step: the prompt's decision stands for the new tokens
            if self._last is None or self._last.shape[0] != b:
                raise RuntimeError("instance-level routing: a cached generation step without the prompt's features")
            pooled = self._last
        else:
            mask = ctx.prompt_tokens().to(x.dtype).unsqueeze(-1)  # (B, T, 1)
            seq = x.view(b, t, -1)
            pooled = (seq * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)  # (B, d_in)
            self._last = pooled.detach()
        out = self.router(pooled)  # per sequence: (B, E)
        expand = lambda m: None if m is None else m.repeat_interleave(t, dim=0)  # noqa: E731 - (B, E) -> (B*T, E)
        return RouterOutput(
            gates=expand(out.gates),
            probs=expand(out.probs),
            selected=expand(out.selected),
            balance=[BalanceStats(s.probs, s.selected, s.k, "sequence") for s in out.balance],
            dists=[GateDist(d.probs, d.kind, "sequence") for d in out.distributions()],
        )


class SharedRouter(nn.Module):
    """One router for several Linears that read the same input tensor (HMoRA router sharing).

    The first member to run in a forward computes the gates; the others, called with the very same
    input tensor, reuse them. The cache lives in the model's per-forward context and refers to the
    input weakly (it never keeps an activation alive); a recomputation (gradient checkpointing) sees a
    new input tensor and simply routes again.
    """

    def __init__(self, router: nn.Module, context: RoutingContext):
        super().__init__()
        self.router = router
        self.num_experts = router.num_experts
        self.routing_sink: list[RouterOutput] | None = None
        object.__setattr__(self, "_context", context)

    def route(self, flat: Tensor, x: Tensor) -> Tensor:
        cache = self._context.cache
        hit = cache.get(id(self))
        if hit is not None and hit[0]() is x:
            return hit[1]
        out = run_router(self.router, flat, self.routing_sink)
        cache[id(self)] = (weakref.ref(x), out.gates)
        return out.gates


class LayerRouter(nn.Module):
    """One router per transformer layer over all the layer's experts (MoA Sec. 3, eq. 2-5).

    Adapted modules claim consecutive columns with :meth:`claim` while the model is injected; once
    every module has claimed, :meth:`build` creates the router over the total. A forward hook on the
    layer's ``input_layernorm`` (or a pre-hook on the layer) routes the layer's normalised input once
    per forward.

    NOTE(deviation): MoA says the router reads "an intermediate token representation"; mole reads the
    output of the layer's input normalisation — what q/k/v read — so the router's input is scale-free.
    """

    def __init__(self, context: RoutingContext):
        super().__init__()
        self.num_experts = 0
        self.router: nn.Module | None = None
        self.routing_sink: list[RouterOutput] | None = None
        self._widths: list[int] = []  # the claimed column counts, in claim order
        object.__setattr__(self, "_context", context)

    def claim(self, n: int) -> GateSlice:
        piece = GateSlice(self, self.num_experts, self.num_experts + n, index=len(self._widths))
        self.num_experts += n
        self._widths.append(n)
        return piece

    def build(self, router_factory, in_features: int, **kwargs) -> None:
        if self.num_experts == 0:
            raise MoleConfigError("experts.placement=layer: the layer has no experts to route")
        self.router = router_factory(in_features=in_features, num_experts=self.num_experts, **kwargs)
        if self.router is None:
            raise MoleConfigError("experts.placement=layer needs a router (router=none builds none)")

    def attach(self, layer: nn.Module) -> None:
        norm = getattr(layer, "input_layernorm", None)
        if isinstance(norm, nn.Module):
            norm.register_forward_hook(lambda _m, _a, out: self._route(out))
        else:
            def pre(_m, args, kwargs):
                hidden = kwargs.get("hidden_states", args[0] if args else None)
                self._route(hidden)

            layer.register_forward_pre_hook(pre, with_kwargs=True)

    def _route(self, hidden: Tensor) -> None:
        out = run_router(self.router, hidden.reshape(-1, hidden.shape[-1]), self.routing_sink)  # (N, d) in
        # every claim's columns at once: their gradients then join in one concatenation, not one zero-filled
        # full-width gradient per slice summed up
        self._context.cache[id(self)] = out.gates.split(self._widths, dim=-1)

    def gates(self, index: int) -> Tensor:
        """The gates of claim ``index`` (its columns of this forward's routing)."""
        pieces = self._context.cache.get(id(self))
        if pieces is None:
            raise RuntimeError("layer router: no gates for this forward (the layer's input hook did not run)")
        return pieces[index]


class GateSlice:
    """Columns ``[start, stop)`` of a :class:`LayerRouter`'s gates: one module's experts."""

    def __init__(self, owner: LayerRouter, start: int, stop: int, index: int = 0):
        self.owner, self.start, self.stop, self.index = owner, start, stop, index

    def route(self, flat: Tensor, x: Tensor) -> Tensor:
        return self.owner.gates(self.index)


def check_placement(placement: str, level: str) -> None:
    if placement not in PLACEMENTS:
        raise MoleConfigError(f"experts.placement must be one of {list(PLACEMENTS)}, got {placement!r}")
    if level not in LEVELS:
        raise MoleConfigError(f"experts.level must be one of {list(LEVELS)}, got {level!r}")
