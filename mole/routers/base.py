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
        index: ``(N, k)`` the chosen columns, where the router has them (top-k): ``selected`` may then be
            ``None`` and is built from ``index`` on first read, so that a step whose losses count the slots
            from ``index`` (:class:`mole.losses.BalanceLoss`) never builds the mask.
        logits: ``(N, M)`` fp32 logits with ``probs = softmax(logits)``, where the router has them: ``probs``
            may then be ``None`` and is computed on first read, so that the balance loss can compute the
            probabilities of all routers of a width in one softmax (:func:`mole.losses.indexed_slots_balance`).
    """

    probs: Tensor | None
    selected: Tensor | None
    k: int | None
    level: str = "token"
    index: Tensor | None = None
    logits: Tensor | None = None

    def has_probs(self) -> bool:
        """Whether ``probs`` exists already (given, or computed from ``logits`` by an earlier read)."""
        return self.__dict__.get("_probs") is not None


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
        index: ``(N, k)`` the chosen experts (top-k routers); ``selected`` is then built from it on first
            read (see :class:`BalanceStats`).
        logits: ``(N, E)`` fp32 logits with ``probs = softmax(logits)``; ``probs`` is then computed on first
            read, by the balance decision on the same logits where there is one (the same tensor).
    """

    gates: Tensor
    probs: Tensor | None
    selected: Tensor | None = None
    balance: list[BalanceStats] = field(default_factory=list)
    dists: list[GateDist] = field(default_factory=list)
    index: Tensor | None = None
    logits: Tensor | None = None

    def distributions(self) -> list[GateDist]:
        """The router distributions behind these gates (one token router unless stated otherwise)."""
        return self.dists or [GateDist(self.probs)]


def chosen_mask(index: Tensor, like: Tensor) -> Tensor:
    """The bool mask of ``like``'s shape ``(N, M)`` that is True at the columns ``index`` ``(N, k)`` names."""
    return torch.zeros(like.shape, dtype=torch.bool, device=like.device).scatter_(-1, index, True)


def _built_on_read(cls: type, name: str, source: str, build: Callable, doc: str) -> None:
    """Make the dataclass field ``cls.<name>`` a property that, when it was given as ``None`` and the field
    ``source`` is set, is ``build(self)`` on first read (then kept). Set after the dataclass is made, so that
    the generated ``__init__`` keeps the field's default and assigns through the setter."""
    slot = f"_{name}"

    def get(self) -> Tensor | None:
        value = self.__dict__.get(slot)
        if value is None and getattr(self, source) is not None:
            value = self.__dict__[slot] = build(self)
        return value

    def put(self, value: Tensor | None) -> None:
        self.__dict__[slot] = value

    setattr(cls, name, property(get, put, doc=doc))


def _probs_of(out: BalanceStats | RouterOutput) -> Tensor:
    """``softmax(logits)``; a :class:`RouterOutput` takes it from its balance decision on the same logits, so
    that both hold one tensor."""
    same = [st for st in getattr(out, "balance", ()) if st.logits is out.logits]
    return same[0].probs if same else torch.softmax(out.logits, dim=-1)


for _cls in (BalanceStats, RouterOutput):
    _built_on_read(_cls, "selected", "index", lambda out: chosen_mask(out.index, out.probs),
                   "``(N, M)`` bool, the chosen set (built from ``index`` when not given).")
    _built_on_read(_cls, "probs", "logits", _probs_of,
                   "``(N, M)`` probabilities (``softmax(logits)`` computed on first read when not given).")


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
    if autocast_enabled(kind):
        with torch.autocast(device_type=kind, enabled=False):
            out = router(x)
    else:  # no autocast to leave: skip the context manager (one per routed Linear per forward)
        out = router(x)
    if sink is not None:
        sink.append(out)
    return out


def autocast_enabled(kind: str) -> bool:
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
        weights = torch.zeros_like(probs).scatter(-1, top_idx, _renormalised(top_vals, renorm == "softmax"))  # (N, M)
        selected = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, top_idx, True)  # (N, M)
        return weights, selected
    # eager: the same weights, with a backward of its own in fewer dispatched operations (compiled code fuses)
    return _TopKGates.apply(probs, k, renorm == "softmax")


def _renormalised(top_vals: Tensor, softmax_renorm: bool) -> Tensor:
    """The kept ``(N, k)`` probabilities renormalised: a softmax over them (HMoRA eq. 15) or divided by their sum."""
    return torch.softmax(top_vals, dim=-1) if softmax_renorm else top_vals / top_vals.sum(dim=-1, keepdim=True)


class _TopKGates(torch.autograd.Function):
    """:func:`keep_top_k`'s ``(weights, selected)`` of ``(N, M)`` probabilities, with a dense backward.

    Both renormalisations have the Jacobian of a softmax restricted to the kept set: for ``g = p 1[kept] / S``
    (``S`` the kept sum), ``dL/dp = 1[kept] / S * (dL/dg - <g, dL/dg>)``; for ``g = softmax`` over the kept
    ``p``, ``dL/dp = g * (dL/dg - <g, dL/dg>)``, which is softmax's own backward (one operation, zero outside
    the kept set since ``g`` is). So the backward is one to three operations on ``(N, M)`` instead of
    autograd's gather, division and scatter chain.
    """

    @staticmethod
    def forward(ctx, probs: Tensor, k: int, softmax_renorm: bool):
        top_vals, top_idx = probs.topk(k, dim=-1)  # (N, k), (N, k)
        selected = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, top_idx, True)  # (N, M)
        if softmax_renorm:
            weights = torch.zeros_like(probs).scatter_(-1, top_idx, torch.softmax(top_vals, dim=-1))  # (N, M)
            factor = None
        else:
            factor = selected / top_vals.sum(dim=-1, keepdim=True)  # (N, M) 1[kept] / S
            weights = probs * factor
        ctx.mark_non_differentiable(selected)
        ctx.set_materialize_grads(False)  # no zero tensor for the mask's (absent) gradient
        ctx.save_for_backward(weights, factor)
        return weights, selected

    @staticmethod
    def backward(ctx, grad: Tensor | None, _grad_selected: Tensor | None):
        if grad is None:
            return None, None, None
        weights, factor = ctx.saved_tensors
        if factor is None:  # g = softmax over the kept p: dL/dp = g * (dL/dg - <g, dL/dg>)
            return torch._softmax_backward_data(grad, weights, -1, weights.dtype), None, None
        n, m = weights.shape
        dot = torch.bmm(weights.view(n, 1, m), grad.reshape(n, m, 1)).view(n, 1)  # (N, 1) <g, dL/dg>
        return (grad - dot) * factor, None, None


def softmax_top_k(logits: Tensor, k: int, renorm: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(probs, weights, index)``: ``probs = softmax(logits)``, :func:`keep_top_k`'s weights of it and the
    ``(N, k)`` kept columns (the kept mask is ``chosen_mask(index, probs)``); in eager mode one autograd
    function with a short backward of its own (:class:`_SoftmaxTopK`)."""
    if torch.compiler.is_compiling() or logits.dim() != 2:
        probs = torch.softmax(logits, dim=-1)
        top_idx, top_w = _kept(logits, probs, k, renorm == "softmax")
        return probs, torch.zeros_like(probs).scatter(-1, top_idx, top_w), top_idx
    return _SoftmaxTopK.apply(logits, k, renorm == "softmax")


def _kept(logits: Tensor, probs: Tensor, k: int, softmax_renorm: bool) -> tuple[Tensor, Tensor]:
    """``(index, weights)`` ``(N, k)`` of the top-k of ``probs = softmax(logits)``, renormalised.

    The sum renormalisation ``p_i / sum_kept p_j = exp(z_i) / sum_kept exp(z_j)`` is the softmax of the kept
    logits, and softmax keeps the logits' order, so the kept set and weights come from the logits in two
    operations (the same set as ``probs.topk``, up to how ties between probabilities that round to the same
    value are broken). The softmax renormalisation (HMoRA eq. 15) is a softmax of the kept probabilities.
    """
    if softmax_renorm:
        top_vals, top_idx = probs.topk(k, dim=-1)  # (N, k), (N, k)
        return top_idx, torch.softmax(top_vals, dim=-1)
    top_z, top_idx = logits.topk(k, dim=-1)
    return top_idx, torch.softmax(top_z, dim=-1)


class _SoftmaxTopK(torch.autograd.Function):
    """``probs = softmax(logits)`` and the top-k weights of ``probs``, with one backward for both.

    Forward: the softmax, ``topk``, the renormalisation (:func:`_kept`) and the scatter into zeros (5
    operations; the kept mask is left to whoever reads it). Backward, each a softmax's own backward (``g * (dL/dg - <g, dL/dg>)``,
    one operation):

    * ``renorm="sum"``: ``g = p 1[kept] / S`` is the softmax of the *logits* restricted to the kept set
      (``exp(z_i) / sum_kept exp(z_j)``), so ``dL/dz`` from the weights is softmax's backward at ``g``;
    * ``renorm="softmax"``: ``g`` is a softmax of the kept ``p``: softmax's backward at ``g`` gives ``dL/dp``
      (zero outside the kept set), which joins the gradient an auxiliary loss sends to ``p``, and then
      softmax's backward at ``p``.

    One operation (sum) or two (softmax) without an auxiliary loss on ``probs``, three with one; autograd's
    gather, division and scatter chain took more than twice as many.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, k: int, softmax_renorm: bool):
        probs = torch.softmax(logits, dim=-1)  # (N, M)
        top_idx, top_w = _kept(logits, probs, k, softmax_renorm)  # (N, k), (N, k)
        weights = torch.zeros_like(probs).scatter_(-1, top_idx, top_w)  # (N, M)
        ctx.softmax_renorm = softmax_renorm
        ctx.mark_non_differentiable(top_idx)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(probs, weights)
        return probs, weights, top_idx

    @staticmethod
    def backward(ctx, grad_probs: Tensor | None, grad: Tensor | None, _grad_index: Tensor | None):
        probs, weights = ctx.saved_tensors
        grad_z = None  # dL/dlogits through the weights (sum renormalisation)
        if grad is not None:
            from_weights = torch._softmax_backward_data(grad, weights, -1, weights.dtype)
            if not ctx.softmax_renorm:
                grad_z = from_weights
            else:  # dL/dp through the weights, joined with the auxiliary loss's
                grad_probs = from_weights if grad_probs is None else grad_probs + from_weights
        if grad_probs is not None:
            from_probs = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
            grad_z = from_probs if grad_z is None else grad_z + from_probs
        return grad_z, None, None


def kept_softmax(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``(weights, index)``: the top-k of ``softmax(logits)`` renormalised by their sum (MoR eq. 2) as dense
    ``(N, M)`` weights, and the ``(N, k)`` kept columns, without ``softmax(logits)`` itself (a router that
    leaves its probabilities to be computed where read, :class:`RouterOutput` ``logits``). In eager mode one
    autograd function (:class:`_KeptSoftmax`); the weights are those of :func:`softmax_top_k`."""
    if torch.compiler.is_compiling() or logits.dim() != 2:
        top_z, top_idx = logits.topk(k, dim=-1)
        return torch.zeros_like(logits).scatter(-1, top_idx, torch.softmax(top_z, dim=-1)), top_idx
    return _KeptSoftmax.apply(logits, k)


class _KeptSoftmax(torch.autograd.Function):
    """The kept top-k's weights ``g = exp(z_i) / sum_kept exp(z_j)`` (zero elsewhere), the softmax of the logits
    restricted to the kept set (see :func:`_kept`). Forward: ``topk``, the softmax of the kept logits and the
    scatter into zeros; backward: softmax's own backward at ``g``, one operation (zero outside the kept set)."""

    @staticmethod
    def forward(ctx, logits: Tensor, k: int):
        top_z, top_idx = logits.topk(k, dim=-1)  # (N, k), (N, k)
        weights = torch.zeros_like(logits).scatter_(-1, top_idx, torch.softmax(top_z, dim=-1))  # (N, M)
        ctx.mark_non_differentiable(top_idx)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(weights)
        return weights, top_idx

    @staticmethod
    def backward(ctx, grad: Tensor | None, _grad_index: Tensor | None):
        if grad is None:
            return None, None
        (weights,) = ctx.saved_tensors
        return torch._softmax_backward_data(grad, weights, -1, weights.dtype), None
