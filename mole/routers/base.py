"""The router contract: what every gating function returns and declares, and the selection helpers they share.

A router maps token features ``x`` of shape ``(N, d_in)`` to gates ``g`` of shape ``(N, E)``. Gates are
*dense*: an expert that was not chosen has a gate of exactly 0, so the stacked expert computation
``sum_i g_i B_i A_i x`` (see :mod:`mole.adapters.lora`) is exact for soft and sparse routers alike.
:class:`Router` writes the contract down; ``tests/unit/conf/test_contracts.py`` checks every
``conf/router/*.yaml`` against it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from mole.utils.dropout import ExpertDropout
from mole.utils.errors import MoleConfigError


@dataclass
class BalanceStats:
    """One routing decision the balance loss acts on (HMoRA eq. 17-19).

    Attributes:
        probs: ``(N, M)`` router probabilities over the M choices (experts, or MoR sub-routers).
        selected: ``(N, M)`` bool, the choices that took a routing slot for each token.
        k: routing slots per token (the number of ``True`` per row of ``selected``), or ``None`` when the
            number varies per token (top-p, dynamic, threshold routing): the slots are then counted from
            ``selected``.
        level: ``"token"`` when rows are the batch's tokens (padding rows are masked out by the
            losses), ``"sequence"`` when rows are sequences (instance-level and task routers).
    """

    probs: Tensor
    selected: Tensor
    k: int | None
    level: str = "token"


@dataclass
class GateDist:
    """One router's gate distribution, for the entropy-based losses and the routing analyses.

    Attributes:
        probs: ``(rows, E)`` probabilities (fp32).
        kind: ``"token"`` (a token router) or ``"task"`` (a task router, HMoRA eq. 6-7).
        level: ``"token"`` (rows are the batch's tokens) or ``"sequence"`` (one row per sequence).
    """

    probs: Tensor
    kind: str = "token"
    level: str = "token"


@dataclass
class RouterOutput:
    """What a router returns for ``N`` tokens and ``E`` experts.

    Attributes:
        gates: ``(N, E)`` mixing weights; exactly 0 for experts that were not chosen.
        probs: ``(N, E)`` the router's distribution over experts before selection (fp32).
        selected: ``(N, E)`` bool mask of chosen experts, or ``None`` when every expert is active.
        balance: the decisions a load-balancing loss should balance (empty for soft routing).
        dists: the distributions the entropy losses act on (CGJS, Tsallis); empty means
            ``[GateDist(probs)]``, a single token router (see :meth:`distributions`).
    """

    gates: Tensor
    probs: Tensor
    selected: Tensor | None = None
    balance: list[BalanceStats] = field(default_factory=list)
    dists: list[GateDist] = field(default_factory=list)

    def distributions(self) -> list[GateDist]:
        """The router distributions behind these gates (one token router unless stated otherwise)."""
        return self.dists or [GateDist(self.probs)]


def real_rows(t: Tensor, level: str, token_mask: Tensor | None) -> Tensor:
    """Rows of a routing statistic that count: token rows without padding; every sequence row."""
    if level == "token" and token_mask is not None:
        return t[token_mask]
    return t


def run_router(router: nn.Module, x: Tensor, sink: list[RouterOutput] | None = None) -> RouterOutput:
    """Route ``x`` ``(N, d_in)`` with ``router`` and publish the output to ``sink`` (when collecting).

    Selective precision (Fedus et al. 2022, Switch Transformer, Sec. 2.4): the router runs outside
    autocast, on its input cast to its own dtype (fp32 by default), so gates and probabilities are fp32
    whatever the activations' precision. Every router placement routes through here.
    """
    dtype = param_dtype(router)
    x = x if dtype is None else x.to(dtype)
    kind = x.device.type
    if _autocast_enabled(kind):
        with torch.autocast(device_type=kind, enabled=False):
            out = router(x)
    else:  # no autocast to leave: skip the context manager (one per routed Linear per forward)
        out = router(x)
    if sink is not None:
        sink.append(out)
    return out


def _autocast_enabled(kind: str) -> bool:
    """Whether autocast is on for this device type. Under ``torch.compile`` only ``is_autocast_enabled``:
    Dynamo folds it to a constant, while ``torch.amp.is_autocast_available`` (an untraceable builtin
    before torch 2.13) broke the graph at every routed Linear; a device that reaches a compiled graph has
    autocast."""
    if torch.compiler.is_compiling():
        return torch.is_autocast_enabled(kind)
    return torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)


def param_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype of ``module``'s parameters (``None`` without any), cheaply: called on every forward.

    The module's own first parameter, else its children's first (a router's Linear, whatever it is named),
    else the first of the whole tree. Every parameter of a router or expert set has one dtype (the injector
    casts them together to ``model.adapter_dtype``).
    """
    for p in module._parameters.values():
        if p is not None:
            return p.dtype
    for child in module._modules.values():
        if child is not None:
            for p in child._parameters.values():
                if p is not None:
                    return p.dtype
    p = next(module.parameters(), None)
    return None if p is None else p.dtype


LAYER_INPUTS = ("layer_idx", "num_layers", "context")  # what the injector knows about the layer a router serves


@dataclass(frozen=True)
class ModelModule:
    """A module built once per model and handed to every router of a kind (HMoRA's task encoder).

    Attributes:
        key: the ``router`` config key holding its settings (``null``: not built) and the keyword argument
            under which the router's constructor receives it.
        attr: the model attribute it is registered under (``mole_*``: it trains and is saved).
        build: ``(model, node, tokenizer=..., dtype=...) -> nn.Module``; ``tokenizer`` is ``None`` on the
            meta device, ``dtype`` is ``model.adapter_dtype``.

    The built module counts the routers that read it in ``users``; the builder removes it from the model
    when no router did (every layer's router could do without it).
    """

    key: str
    attr: str
    build: Callable[..., nn.Module]


@dataclass(frozen=True)
class RouterNeeds:
    """What a router's constructor takes besides ``in_features`` and ``num_experts`` and its config keys.

    Attributes:
        layer_inputs: facts about the layer it serves, among :data:`LAYER_INPUTS`: ``layer_idx`` (0-based),
            ``num_layers``, ``context`` (the model's :class:`~mole.routers.context.RoutingContext`).
        model_modules: modules built once per model that it reads (:class:`ModelModule`).
    """

    layer_inputs: tuple[str, ...] = ()
    model_modules: tuple[ModelModule, ...] = ()

    def __post_init__(self) -> None:
        unknown = sorted(set(self.layer_inputs) - set(LAYER_INPUTS))
        if unknown:
            raise ValueError(f"RouterNeeds.layer_inputs: unknown {unknown}; known are {list(LAYER_INPUTS)}")


NEEDS_NOTHING = RouterNeeds()


def router_needs(target: object) -> RouterNeeds:
    """What the router class (or constructor function) named by ``router._target_`` declares in its ``needs``
    class attribute; a router without one needs nothing beyond its config keys."""
    needs = getattr(target, "needs", NEEDS_NOTHING)
    if not isinstance(needs, RouterNeeds):
        raise TypeError(f"{target!r}.needs must be a mole.routers.base.RouterNeeds, got {type(needs).__name__}")
    return needs


@runtime_checkable
class Router(Protocol):
    """Anything that maps ``(N, d_in)`` token features to a :class:`RouterOutput` over its experts.

    The contract (``tests/unit/conf/test_contracts.py`` checks it for every ``conf/router/*.yaml``):

    * Built as ``target(in_features=d_in, num_experts=E, **config keys, **declared needs)``; a constructor
      may return ``None`` where a layer needs no router (``router=none``, one expert).
    * ``needs`` (class attribute, a :class:`RouterNeeds`; absent: nothing) declares the per-layer facts
      and per-model modules the constructor takes.
    * ``x`` arrives in the router's parameters' dtype (:func:`param_dtype`; all of one dtype) and outside
      autocast (:func:`run_router`); the output follows :class:`RouterOutput`: ``gates`` and ``probs`` are
      fp32 ``(N, E)``, ``gates`` exactly 0 where ``selected`` is False, ``selected`` a bool ``(N, E)`` or
      ``None`` (every expert active).
    * Configuration errors are :class:`~mole.utils.errors.MoleConfigError` naming the ``router.*`` key.
    """

    num_experts: int

    def __call__(self, x: Tensor) -> RouterOutput: ...


class LinearGate(nn.Module):
    """The start every single-Linear router shares: logits ``h(x) = W_g dropout(x)`` (SPEC §2, no bias).

    Subclasses turn :meth:`logits` (fp32, whatever the activation dtype: gates feed the losses and the
    analyses) into gates: softmax, top-k, top-p, entropy-hybrid, sigmoid or threshold routing.

    Args:
        in_features: width of the token features the router reads.
        num_experts: number of experts E.
        dropout: dropout on the router's input.
    """

    needs: ClassVar[RouterNeeds] = NEEDS_NOTHING

    def __init__(self, in_features: int, num_experts: int, dropout: float = 0.0):
        super().__init__()
        self.num_experts = num_experts
        self.dropout = ExpertDropout(dropout) if dropout > 0 else nn.Identity()
        self.gate = nn.Linear(in_features, num_experts, bias=False)

    def logits(self, x: Tensor) -> Tensor:
        """``(N, E)`` fp32 logits for ``(N, d_in)`` features."""
        return self.gate(self.dropout(x)).float()


RENORMS = ("sum", "softmax")


def check_top_k(top_k: int | None, num_experts: int, key: str = "router.top_k", of: str = "") -> None:
    """Reject a top-k that is not a positive integer or exceeds the experts of a layer (or, with ``of``,
    the config key of the count it chooses from, e.g. ``router.n_routers``)."""
    if top_k is None:
        return
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise MoleConfigError(f"{key} must be a positive integer or null, got {top_k!r}")
    if top_k > num_experts and of:
        raise MoleConfigError(f"{key}={top_k} exceeds {of}={num_experts}; choose {key} <= {of} (or null to keep all)")
    if top_k > num_experts:
        raise MoleConfigError(
            f"{key}={top_k} exceeds the number of experts ({num_experts}) in a layer; "
            f"choose an experts layout with at least {top_k} experts per layer or a smaller {key}"
        )


def check_renorm(renorm: str, key: str = "router.renorm") -> None:
    if renorm not in RENORMS:
        raise MoleConfigError(f"{key} must be one of {list(RENORMS)}, got {renorm!r}")


def keep_top_k(probs: Tensor, k: int, renorm: str) -> tuple[Tensor, Tensor]:
    """Keep the k largest probabilities per row and renormalise them; zero the rest.

    ``renorm="sum"`` divides the kept probabilities by their sum (MoR eq. 2, Mixtral); ``"softmax"``
    applies a second softmax over the kept probabilities (HMoRA eq. 15-16: KeepTopK sets the others to
    -inf before the softmax).

    Args:
        probs: ``(N, M)`` probabilities (rows sum to 1).
        k: how many to keep.
        renorm: ``"sum"`` or ``"softmax"``.

    Returns:
        ``(weights, selected)``: ``(N, M)`` renormalised weights, exactly 0 outside the kept set, and
        the ``(N, M)`` bool mask of kept entries.
    """
    if torch.compiler.is_compiling() or probs.dim() != 2:
        top_vals, top_idx = probs.topk(k, dim=-1)  # (N, k), (N, k)
        if renorm == "sum":
            top_w = top_vals / top_vals.sum(dim=-1, keepdim=True)
        else:
            top_w = torch.softmax(top_vals, dim=-1)
        weights = torch.zeros_like(probs).scatter(-1, top_idx, top_w)  # (N, M)
        selected = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, top_idx, True)  # (N, M)
        return weights, selected
    # eager: the same weights, with a backward of its own in fewer dispatched operations (compiled code fuses)
    return _TopKGates.apply(probs, k, renorm == "softmax")


class _TopKGates(torch.autograd.Function):
    """:func:`keep_top_k`'s ``(weights, selected)`` of ``(N, M)`` probabilities, with a dense backward.

    Both renormalisations have the Jacobian of a softmax restricted to the kept set: for ``g = p 1[kept] / S``
    (``S`` the kept sum), ``dL/dp = 1[kept] / S * (dL/dg - <g, dL/dg>)``; for ``g = softmax`` over the kept
    ``p``, ``dL/dp = g * (dL/dg - <g, dL/dg>)``. So the backward is three operations on ``(N, M)`` (a batched
    dot product, a subtraction, a product) instead of autograd's gather, division and scatter chain.
    """

    @staticmethod
    def forward(ctx, probs: Tensor, k: int, softmax_renorm: bool):
        weights, selected, factor = _top_k_dense(probs, k, softmax_renorm)
        ctx.mark_non_differentiable(selected)
        ctx.set_materialize_grads(False)  # no zero tensor for the mask's (absent) gradient
        ctx.save_for_backward(weights, factor)
        return weights, selected

    @staticmethod
    def backward(ctx, grad: Tensor | None, _grad_selected: Tensor | None):
        if grad is None:
            return None, None, None
        weights, factor = ctx.saved_tensors
        return _top_k_grad(weights, factor, grad), None, None


def _top_k_dense(probs: Tensor, k: int, softmax_renorm: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(weights, selected, factor)`` of :func:`keep_top_k` on ``(N, M)`` probabilities; ``factor`` is what
    the backward multiplies by (``1[kept] / S``, or the weights themselves for the softmax renormalisation)."""
    top_vals, top_idx = probs.topk(k, dim=-1)  # (N, k), (N, k)
    selected = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, top_idx, True)  # (N, M)
    if softmax_renorm:
        weights = torch.zeros_like(probs).scatter_(-1, top_idx, torch.softmax(top_vals, dim=-1))  # (N, M)
        return weights, selected, weights  # dL/dp = g * (dL/dg - <g, dL/dg>)
    factor = selected / top_vals.sum(dim=-1, keepdim=True)  # (N, M) 1[kept] / S
    return probs * factor, selected, factor


def _top_k_grad(weights: Tensor, factor: Tensor, grad: Tensor, grad_probs: Tensor | None = None) -> Tensor:
    """``dL/dp = factor * (dL/dg - <g, dL/dg>)`` (plus ``grad_probs``, a gradient reaching ``p`` directly)."""
    n, m = weights.shape
    dot = torch.bmm(weights.view(n, 1, m), grad.reshape(n, m, 1)).view(n, 1)  # (N, 1) <g, dL/dg>
    if grad_probs is None:
        return (grad - dot) * factor
    return torch.addcmul(grad_probs, grad - dot, factor)


def softmax_top_k(logits: Tensor, k: int, renorm: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(probs, weights, selected)``: ``probs = softmax(logits)`` and :func:`keep_top_k` of it, in one
    autograd function in eager mode (the gradient reaching ``probs`` from an auxiliary loss and the one from
    the weights join in one ``addcmul`` before the softmax's backward)."""
    if torch.compiler.is_compiling() or logits.dim() != 2:
        probs = torch.softmax(logits, dim=-1)
        return probs, *keep_top_k(probs, k, renorm)
    return _SoftmaxTopK.apply(logits, k, renorm == "softmax")


class _SoftmaxTopK(torch.autograd.Function):
    """``softmax`` then :class:`_TopKGates`, with one backward for both."""

    @staticmethod
    def forward(ctx, logits: Tensor, k: int, softmax_renorm: bool):
        probs = torch.softmax(logits, dim=-1)  # (N, M)
        weights, selected, factor = _top_k_dense(probs, k, softmax_renorm)
        ctx.mark_non_differentiable(selected)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(probs, weights, factor)
        return probs, weights, selected

    @staticmethod
    def backward(ctx, grad_probs: Tensor | None, grad: Tensor | None, _grad_selected: Tensor | None):
        probs, weights, factor = ctx.saved_tensors
        if grad is None:
            grad_p = grad_probs
        else:
            grad_p = _top_k_grad(weights, factor, grad, grad_probs)
        if grad_p is None:
            return None, None, None
        return torch._softmax_backward_data(grad_p, probs, -1, probs.dtype), None, None
