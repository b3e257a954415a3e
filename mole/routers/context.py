"""Per-forward facts that some routers need beyond a Linear's token features.

A Linear sees ``(B, T, d)`` features but not the attention mask, which tokens are the prompt, or values
computed once per forward and shared by many layers (HMoRA's task representation, a shared router's
output). :func:`install_context` attaches one :class:`RoutingContext` to a model: a forward pre-hook on
the model clears the per-forward cache, records the batch's ``input_ids`` and ``attention_mask``, and
runs the context's *producers* — values that every layer reads are computed there, before the first
decoder layer, so that they stay outside any layer's activation checkpoint.

The cache lives until the next forward (not just until this one returns): with gradient checkpointing
the decoder layers run again during backward and must read the same per-forward values. It holds only
small tensors (task representations, gates) and weak references to activations.

``prompt_mask`` (which tokens are the prompt, HMoRA eq. 6's ``T^in``) is known only to the training
loop: it sets it with :func:`routing_inputs`, together with each sequence's raw question when the data
carries it (``task_inputs``; the evaluation harness sets those too). Without a prompt mask every real
token counts as prompt — the case of lm-eval's log-likelihood requests, where context and continuation
arrive as one sequence.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

CONTEXT_ATTR = "_mole_context"


class RoutingContext:
    """What the current forward pass knows about its batch (plain object, not a module: no parameters)."""

    def __init__(self) -> None:
        self.input_ids: Tensor | None = None  # (B, T)
        self.attention_mask: Tensor | None = None  # (B, T), 1 for real tokens
        self.prompt_mask: Tensor | None = None  # (B, T) bool, set by routing_inputs()
        # (B, Q) token ids and (B, Q) bool mask of each sequence's raw question (the task encoder's input
        # under router.task_encoder.input=raw), set by routing_inputs()
        self.task_inputs: tuple[Tensor, Tensor] | None = None
        self.cache: dict[Any, Any] = {}  # per-forward values (cleared when the next forward starts)
        self.producers: list[Callable[[RoutingContext], None]] = []  # run at the start of every forward
        self.incremental = False  # a generation step that extends a cached prefix (past_key_values)

    @property
    def batch_shape(self) -> tuple[int, int] | None:
        return None if self.attention_mask is None else tuple(self.attention_mask.shape)  # type: ignore[return-value]

    def token_mask(self) -> Tensor | None:
        """``(B, T)`` bool, the real tokens of the batch."""
        return None if self.attention_mask is None else self.attention_mask.bool()

    def prompt_tokens(self) -> Tensor | None:
        """``(B, T)`` bool: the prompt's real tokens (every real token when no prompt mask is set)."""
        mask = self.token_mask()
        if mask is None:
            return None
        if self.prompt_mask is not None and self.prompt_mask.shape == mask.shape:
            return mask & self.prompt_mask.to(mask.device).bool()
        return mask


def _first_tensor(args: tuple, kwargs: dict, name: str, position: int) -> Tensor | None:
    value = kwargs.get(name)
    if value is None and len(args) > position:
        value = args[position]
    return value if isinstance(value, Tensor) else None


def install_context(model: nn.Module) -> RoutingContext:
    """Attach (once) a :class:`RoutingContext` to ``model`` and return it."""
    ctx = getattr(model, CONTEXT_ATTR, None)
    if ctx is not None:
        return ctx
    ctx = RoutingContext()

    def before(module: nn.Module, args: tuple, kwargs: dict):
        ctx.cache.clear()
        input_ids = _first_tensor(args, kwargs, "input_ids", 0)
        embeds = kwargs.get("inputs_embeds")
        mask = kwargs.get("attention_mask")
        ctx.incremental = is_incremental(kwargs)
        ctx.input_ids = input_ids
        if isinstance(mask, Tensor) and mask.dim() == 2:
            # with a cache, the mask covers past + new tokens; the routers see the new ones only
            new_len = (input_ids if input_ids is not None else embeds).shape[1] if (input_ids is not None or embeds is not None) else mask.shape[1]
            ctx.attention_mask = mask[:, -new_len:]
        else:
            ref = input_ids if input_ids is not None else embeds
            ctx.attention_mask = None if ref is None else torch.ones(ref.shape[:2], dtype=torch.long, device=ref.device)
        for produce in ctx.producers:
            produce(ctx)
        return None

    model.register_forward_pre_hook(before, with_kwargs=True)
    object.__setattr__(model, CONTEXT_ATTR, ctx)
    return ctx


def is_incremental(kwargs: dict) -> bool:
    """Whether a forward's keyword arguments extend a cached prefix (a generation step after the first).

    The KV cache arrives as ``cache`` (transformers >= 5.x) or ``past_key_values`` (the older name).
    """
    past = kwargs.get("cache")
    if past is None:
        past = kwargs.get("past_key_values")
    return past is not None and _cache_length(past) > 0


def _cache_length(past: Any) -> int:
    get = getattr(past, "get_seq_length", None)
    if callable(get):
        try:
            return int(get())
        except Exception:  # noqa: BLE001 - an empty or exotic cache counts as no prefix
            return 0
    return 1 if past else 0


def get_context(model: nn.Module) -> RoutingContext | None:
    """The model's context, looking through a DDP-style wrapper (``.module``)."""
    ctx = getattr(model, CONTEXT_ATTR, None)
    if ctx is None and isinstance(getattr(model, "module", None), nn.Module):
        ctx = getattr(model.module, CONTEXT_ATTR, None)
    return ctx


@contextmanager
def routing_inputs(model: nn.Module, prompt_mask: Tensor | None,
                   task_inputs: tuple[Tensor, Tensor] | None = None) -> Iterator[None]:
    """Inside the block, forwards of ``model`` know which tokens are the prompt (``(B, T)`` bool) and, when
    given, each sequence's raw question (``task_inputs``: ``(B, Q)`` token ids and ``(B, Q)`` bool mask)."""
    ctx = get_context(model)
    if ctx is None:
        yield
        return
    previous = ctx.prompt_mask, ctx.task_inputs
    ctx.prompt_mask, ctx.task_inputs = prompt_mask, task_inputs
    try:
        yield
    finally:
        ctx.prompt_mask, ctx.task_inputs = previous
