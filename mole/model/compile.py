"""Regional compilation: ``torch.compile`` on each decoder layer (``trainer.compile``).

Each decoder layer is compiled in place (``nn.Module.compile``), with ``fullgraph=True``: a graph break
inside a layer is an error, not a silent split into small graphs. Layers of the same structure share one
compiled graph, so compile time grows with the number of distinct layers (MoLA's expert counts, the first
layer, whose input needs no gradient), not with depth. The embeddings, the LM head, the loss, HMoRA's task
encoder, the backward's bookkeeping and the optimizer stay eager. Parameter names do not change (the
layer module is kept, only its call is compiled), so checkpoints and adapters load either way.

Shapes: ``dynamic=None`` (Dynamo's automatic dynamic shapes) compiles the first sequence length
statically and, at the first different length, once more with a symbolic length; padding to a multiple
(``data.pad_to_multiple_of``) makes fewer lengths still.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from mole.model.inject import decoder_layers
from mole.utils.errors import MoleConfigError

log = logging.getLogger(__name__)

BACKENDS = ("inductor", "aot_eager", "eager")


def valid_setting(setting) -> bool:
    """``trainer.compile`` holds ``auto``, ``true`` or ``false``."""
    return setting == "auto" or isinstance(setting, bool)


def compile_wanted(setting, device: torch.device | str) -> bool:
    """``trainer.compile`` on ``device``: ``auto`` compiles on CUDA only (compiled CPU steps measured slower
    than eager ones, docs/speed.md), ``true``/``false`` as said."""
    if not valid_setting(setting):
        raise MoleConfigError(f"trainer.compile must be one of auto, true, false; got {setting!r}")
    if setting == "auto":
        return torch.device(device).type == "cuda"
    return bool(setting)


def configure_dynamo(num_layers: int) -> None:
    """Dynamo settings for compiled decoder layers.

    * All layers run one code object (``nn.Module._call_impl``), so each distinct layer is a cache entry of
      the same code: up to a static and a dynamic-length graph per distinct layer, in training and under
      ``no_grad`` (validation, evaluation). Dynamo's default limit of 8 would send the rest of a deep model
      back to eager; the limit is raised to cover every layer four times.
    * Module hooks are guarded: MoA's layer routers are hooks on a layer's input norm
      (:class:`mole.routers.placement.LayerRouter`), and a graph traced with one layer's hook must not run
      for another layer.
    * Under gradient checkpointing (inside the layer's forward in transformers 5) each router appends its
      outputs to its module's list (:mod:`mole.model.routing`): a side effect that Dynamo refuses inside a
      checkpointed region unless told not to replay it when backward recomputes the forward. Not replaying
      it is what the auxiliary losses want: they read the outputs of the forward, once.
    """
    import torch._dynamo as dynamo

    cfg = dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 4 * num_layers + 8))
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 64 * num_layers))
    cfg.skip_nnmodule_hook_guards = False
    if hasattr(cfg, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        cfg.skip_fwd_side_effects_in_bwd_under_checkpoint = True


def compile_decoder_layers(model: nn.Module, *, backend: str = "inductor", fullgraph: bool = True,
                           dynamic: bool | None = None) -> int:
    """Compile every decoder layer of ``model`` in place; returns how many. Compilation itself happens at a
    layer's first call (and again for each new shape or grad mode)."""
    if backend not in BACKENDS:
        raise MoleConfigError(f"trainer.compile_backend must be one of {list(BACKENDS)}, got {backend!r}")
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = decoder_layers(inner)
    configure_dynamo(len(layers))
    for layer in layers:
        layer.compile(backend=backend, fullgraph=fullgraph, dynamic=dynamic)
    return len(layers)


@dataclass
class CompileClock:
    """Seconds spent compiling (Dynamo tracing and the backend, forward and lazily compiled backward) while
    registered, from Dynamo's compilation callbacks; ``compilations`` counts them."""

    seconds: float = 0.0
    compilations: int = 0
    _depth: int = 0
    _start: float = 0.0

    def _on_start(self, *_args) -> None:
        if self._depth == 0:
            self._start = time.perf_counter()
        self._depth += 1

    def _on_end(self, *_args) -> None:
        self._depth = max(self._depth - 1, 0)
        if self._depth == 0:
            self.seconds += time.perf_counter() - self._start
            self.compilations += 1

    def __enter__(self) -> CompileClock:
        from torch._dynamo.callback import callback_handler

        callback_handler.register_start_callback(self._on_start)
        callback_handler.register_end_callback(self._on_end)
        return self

    def __exit__(self, *exc) -> None:
        from torch._dynamo.callback import callback_handler

        callback_handler.remove_start_callback(self._on_start)
        callback_handler.remove_end_callback(self._on_end)

    def summary(self) -> dict:
        return {"compile_time_s": round(self.seconds, 3), "compilations": self.compilations}

    def stop(self) -> dict:
        """Stop counting, log the total and return :meth:`summary` (what a command does when its model is done)."""
        self.__exit__(None, None, None)
        log.info("compilation: %.1f s in %d compilations", self.seconds, self.compilations)
        return self.summary()


def compile_for_run(model: nn.Module, trainer_cfg, device: torch.device | str,
                    quantized: bool = False) -> CompileClock | None:
    """Compile ``model``'s decoder layers when the run's ``trainer.compile`` asks for it on ``device``, and
    start a :class:`CompileClock` (the caller leaves it); ``None`` when the model runs eager. A run config
    without the keys (written before them) runs eager unless on CUDA. ``auto`` leaves a quantized base
    (``model.quantization``) eager: bitsandbytes' layers have not been tested compiled."""
    get = trainer_cfg.get if trainer_cfg is not None else (lambda _key, default=None: default)
    setting, backend = get("compile", "auto"), get("compile_backend", "inductor")
    if not compile_wanted(setting, device) or (setting == "auto" and quantized):
        return None
    n = compile_decoder_layers(model, backend=backend)
    log.info("trainer.compile: %d decoder layers compiled (backend %s, fullgraph); each distinct layer compiles at "
             "its first call", n, backend)
    return CompileClock().__enter__()
