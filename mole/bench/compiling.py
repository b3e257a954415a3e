"""``torch.compile`` for the benchmark: many variants' layers compiled side by side in one process."""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
import torch._dynamo
from torch import nn

from mole.model.inject import decoder_layers


def configure_dynamo() -> None:
    """Dynamo settings for compiling many variants' layers in one process.

    * Each distinct layer is a graph of its own: MoLA's layers differ in expert count, HMoRA's in a_l, MoA's
      in the layer router its input-norm hook calls, and the first layer's input needs no gradient. That
      is far more than Dynamo's default of 8 graphs per code object.
    * Past the limit Dynamo would run the rest eagerly without a word; it fails instead, so that no ratio
      compares a compiled step with an eager one.
    * Dynamo does not guard module hooks by default, so a graph traced with one layer's hooks could run
      for another layer (or another variant) whose hooks differ. MoA's layer routers are hooks
      (:class:`mole.routers.placement.LayerRouter`): hooks are guarded.
    """
    cfg = torch._dynamo.config
    for name, least in (("recompile_limit", 1024), ("cache_size_limit", 1024),
                        ("accumulated_recompile_limit", 8192), ("accumulated_cache_size_limit", 8192)):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), least))
    for name in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):
        if hasattr(cfg, name):
            setattr(cfg, name, True)
    cfg.skip_nnmodule_hook_guards = False


def compile_model(model: nn.Module, scope: str, tag: str, backend: str = "inductor") -> None:
    """``torch.compile`` the forward (the loss, backward and optimizer step stay eager, the same for every
    variant). ``scope="layer"`` compiles each decoder layer in place (regional compilation: the layers share
    one compiled graph per distinct structure, so compile time grows with the distinct layers, not with
    depth; what runs outside the layers, such as HMoRA's task encoder or the embeddings, stays eager);
    ``"model"`` compiles the whole forward as one graph.

    ``tag`` (the variant's name) gives the compiled function a code object of the variant's own
    (:func:`private_code`), so that variants compiled side by side in one process do not share Dynamo's
    cache of graphs.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if scope == "model":
        inner.forward = torch.compile(types.MethodType(private_code(type(inner).forward, tag), inner),
                                      dynamic=False, backend=backend)
        return
    for layer in decoder_layers(inner):
        layer.forward = types.MethodType(private_code(type(layer).forward, tag), layer)
        layer.compile(dynamic=False, backend=backend)


def private_code(fn: Callable, tag: str) -> Callable:
    """``fn`` with a code object of its own (renamed ``<name>__<tag>``), the same function otherwise.

    Dynamo keeps compiled graphs per code object, and every variant's layers run the same
    ``LlamaDecoderLayer.forward``. Shared, (1) every layer call walks the cache entries of every variant
    compiled so far, and (2) a variant whose layer breaks the graph (the gather loop reference syncs with
    the host per expert) leaves a partial graph, traced up to the break, whose few guards also pass for
    another variant's layer: that layer then ran split into many small graphs (measured on the CPU: with
    the gather loop compiled, mole's LoRA r=8 ran 18 Dynamo frames per layer instead of one, at twice its
    step time). A training run compiles one model, so this is the bench's own isolation, not a change to
    the models.
    """
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}__{tag}")
    copy_ = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    copy_.__kwdefaults__ = fn.__kwdefaults__
    copy_.__dict__.update(fn.__dict__)
    return copy_

