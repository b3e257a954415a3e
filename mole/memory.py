"""Peak memory of one training step, estimated without weights (``mole-params estimate_memory=true``).

The estimate is the sum of what one process holds at the end of a training step's forward, when every
tensor autograd saved for backward is still alive, and after the first optimizer step, when AdamW's
states exist (``docs/memory.md``)::

    peak = W + G + O + A
    W = frozen base weights (model.dtype, or their quantized size) + adapters and routers (model.adapter_dtype)
        + buffers
    G = one gradient per trainable parameter                          (bytes of the trainable parameters)
    O = AdamW's exp_avg and exp_avg_sq (torch keeps them in the parameter's dtype)  = 2 G
    A = every tensor autograd saves for backward in one forward + loss, unique storages, parameters excluded

``peak`` is that account (the benchmark's). ``peak_allocated = W + O + max(A + X, G)`` follows the step in
time: gradients are cleared between steps and grow while backward frees ``A``, and backward starts with
``X = 2 B T V x 4`` bytes (fp32 gradients of the log-probabilities and of the logits); it is checked
against the allocator's peak (:func:`allocator_peak`).

``A`` is not a closed formula per method: it is counted by running the forward and the loss once on
*fake* tensors (``torch._subclasses.FakeTensorMode``: shapes, dtypes and devices, no memory, no data)
built from the model skeleton on the meta device, with the same saved-tensor hook that measures a real
step (:class:`SavedTensorAccount`, also used by :mod:`mole.bench`). So every adapter kind, router and
auxiliary loss is counted as mole runs it, for any model shape, in a few seconds. Module hooks say
where each saved tensor was first saved: ``by_layer`` (``embed``, decoder layer index, ``head``: final
norm + LM head, ``loss``: the LM and auxiliary losses) and ``by_kind`` (the innermost mole module that
saved it, e.g. ``LoRAExperts``, ``MoRRouter``, ``MoLELinear``; ``base`` for the frozen model's own ops).

Per process (``distributed``): DDP adds its gradient buckets (one more copy of G: torch's DDP default,
``gradient_as_bucket_view=False``); ZeRO stage 2 divides G and O over the N processes and ZeRO stage 3
also W (the model-state partitioning of Rajbhandari et al. 2020, "ZeRO", Sec. 5.1-5.3; DeepSpeed's own
communication buckets and prefetch buffers are not counted). With ``trainer.mixed_precision`` the
forward runs under autocast (bf16) and saves what autocast saves; ZeRO with mixed precision keeps a
fp32 master copy of the trainable parameters (4 bytes each, divided over N).

``trainer.gradient_checkpointing``: each decoder layer keeps only its input (B x T x d in the base dtype)
and one layer's activations are recomputed at a time, so the decoder layers' share of ``A`` becomes
``sum over layers of the input + the largest layer``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from mole.build import build_aux_losses, build_mole_model
from mole.model.base import quantization
from mole.model.inject import decoder_layers, is_trainable_name
from mole.training.args import TrainArgs
from mole.training.distributed import DistributedArgs
from mole.training.loop import loss_step
from mole.training.optim import build_optimizer
from mole.utils.errors import MoleConfigError

GIB = 2**30

# bytes per element of a quantized Linear weight (bitsandbytes): NF4 packs two 4-bit codes per byte plus
# one fp32 absmax per block of 64 (QLoRA, Dettmers et al. 2023, Sec. 3, without double quantization);
# LLM.int8 stores one byte per weight plus one fp32 scale per output row (counted per row below).
QUANT_BYTES = {"nf4": 0.5 + 4 / 64, "int8": 1.0}


def _storage_key(t: torch.Tensor) -> int | None:
    """The identity of a tensor's storage (views share it); ``None`` where there is no storage."""
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):  # sparse tensors and the like: nothing to count
        return None


@dataclass
class SavedTensorAccount:
    """Bytes of every tensor autograd saves for backward while active, unique storages, parameters excluded.

    Used as a context manager around a forward (and loss). ``where`` (optional) names the place a tensor
    is saved; :attr:`by_place` sums the bytes of each storage under the place where it was first saved.
    """

    exclude: set[int] = field(default_factory=set)
    where: Callable[[], Any] | None = None
    sizes: dict[int, int] = field(default_factory=dict)
    places: dict[int, Any] = field(default_factory=dict)

    @classmethod
    def for_model(cls, model: nn.Module, where: Callable[[], Any] | None = None) -> SavedTensorAccount:
        return cls(exclude={k for p in model.parameters() if (k := _storage_key(p)) is not None}, where=where)

    @torch.compiler.disable  # measurement, not model code: traced, it would recompile for every tensor it sees
    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key is not None and key not in self.exclude:
            self.sizes[key] = max(self.sizes.get(key, 0), t.untyped_storage().nbytes())
            if key not in self.places and self.where is not None:
                self.places[key] = self.where()
        return t

    @contextlib.contextmanager
    def __call__(self) -> Iterator[SavedTensorAccount]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self

    @property
    def total(self) -> int:
        return sum(self.sizes.values())

    def by_place(self) -> dict[Any, int]:
        out: dict[Any, int] = {}
        for key, size in self.sizes.items():
            place = self.places.get(key)
            out[place] = out.get(place, 0) + size
        return out


def tensor_bytes(tensors) -> int:
    """Bytes of the unique storages among ``tensors`` (tied weights and views counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        key = _storage_key(t)
        if key is not None:
            seen[key] = t.untyped_storage().nbytes()
    return sum(seen.values())


# ---------------------------------------------------------------------------------------------------
# where a saved tensor comes from


class _ModuleStack:
    """Forward hooks that track which modules are running, to place each saved tensor."""

    def __init__(self, model: nn.Module, layers: nn.ModuleList):
        self.stack: list[nn.Module] = []
        self.layer_of = {id(m): i for i, m in enumerate(layers)}
        self.seen_layer = False
        self.handles = []
        for m in model.modules():
            self.handles.append(m.register_forward_pre_hook(self._enter))
            self.handles.append(m.register_forward_hook(self._leave, always_call=True))

    def _enter(self, module, args):
        self.stack.append(module)
        if id(module) in self.layer_of:
            self.seen_layer = True

    def _leave(self, module, args, output):
        if self.stack and self.stack[-1] is module:
            self.stack.pop()

    def close(self) -> None:
        for h in self.handles:
            h.remove()

    def place(self) -> tuple[Any, str]:
        """``(layer, kind)`` of the code running now."""
        if not self.stack:
            return "loss", "loss"
        layer: Any = "head" if self.seen_layer else "embed"
        for m in self.stack:
            if id(m) in self.layer_of:
                layer = self.layer_of[id(m)]
        kind = "base"
        for m in reversed(self.stack):  # the innermost module of mole's adapters, routers or layers
            if type(m).__module__.startswith(("mole.adapters", "mole.routers", "mole.model")):
                kind = type(m).__name__
                break
        return layer, kind


# ---------------------------------------------------------------------------------------------------
# the estimate


def _fake_model(model: nn.Module, mode) -> None:
    """Replace the meta-device parameters and buffers by fake CPU tensors, in place (ties kept)."""
    from torch._subclasses.fake_tensor import FakeTensor

    cpu, memo = torch.device("cpu"), {}
    for m in model.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                if id(p) not in memo:
                    memo[id(p)] = nn.Parameter(FakeTensor(mode, p.data, cpu), requires_grad=p.requires_grad)
                m._parameters[name] = memo[id(p)]
        for name, b in list(m._buffers.items()):
            if b is not None:
                if id(b) not in memo:
                    memo[id(b)] = FakeTensor(mode, b.to("meta"), cpu)
                m._buffers[name] = memo[id(b)]


@contextlib.contextmanager
def _padded_mask():
    """transformers skips the causal mask when no token is padding, a test a fake tensor cannot answer
    (data-dependent); assume padding, as in real batches: the mask is built and saved."""
    import transformers.masking_utils as mu

    if not hasattr(mu, "_ignore_causal_mask_sdpa"):
        yield
        return
    orig = mu._ignore_causal_mask_sdpa
    mu._ignore_causal_mask_sdpa = lambda *a, **k: False
    try:
        yield
    finally:
        mu._ignore_causal_mask_sdpa = orig


def _positive(value: Any, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise MoleConfigError(f"{key} must be a positive integer, got {value!r}")
    return value


def quantized_weight_bytes(model: nn.Module, quantization: str) -> tuple[int, int]:
    """``(quantized, unquantized)``: bytes of the base Linear weights inside the decoder layers as
    ``quantization`` stores them, and as ``model.dtype`` does (bitsandbytes quantizes those; the
    embeddings, norms and LM head stay in ``model.dtype``)."""
    quantized = plain = 0
    for layer in decoder_layers(model):
        for name, m in layer.named_modules():
            if isinstance(m, nn.Linear) and not is_trainable_name(name):
                n = m.weight.numel()
                plain += n * m.weight.element_size()
                quantized += int(n * QUANT_BYTES[quantization]) + (4 * m.out_features if quantization == "int8" else 0)
    return quantized, plain


def activation_bytes(model: nn.Module, cfg: DictConfig, batch_size: int, seq_len: int,
                     mixed_precision: str = "no") -> SavedTensorAccount:
    """Trace one forward + loss of ``model`` (built on the meta device, converted to fake tensors in
    place) on a ``batch_size x seq_len`` batch; the account places each saved tensor as ``(layer, kind)``."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    _fake_model(model, mode)
    layers = decoder_layers(model)
    vocab = int(model.get_input_embeddings().weight.shape[0])
    stack = _ModuleStack(model, layers)
    aux = build_aux_losses(cfg)
    try:
        with mode, _padded_mask():
            ids = torch.randint(0, vocab, (batch_size, seq_len))
            labels = ids.clone()
            labels[:, : seq_len // 3] = -100  # a prompt, as in real examples (routers may read the prompt)
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
            model.train()
            account = SavedTensorAccount.for_model(model, where=stack.place)
            amp = mixed_precision in ("bf16", "fp16")
            with account(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss_step(model, batch, aux)
    finally:
        stack.close()
    return account


def estimate_memory(cfg: DictConfig, batch_size: int | None = None, seq_len: int | None = None) -> dict[str, Any]:
    """The estimated peak memory of one training step per process, in bytes (see the module docstring).

    ``batch_size`` and ``seq_len`` default to ``trainer.batch_size`` and ``data.cutoff_len``.
    """
    b = _positive(batch_size if batch_size is not None else cfg.trainer.get("batch_size"), "trainer.batch_size")
    t = _positive(seq_len if seq_len is not None else cfg.data.get("cutoff_len", 256), "data.cutoff_len")
    targs = TrainArgs.from_config(cfg.trainer)
    dist = DistributedArgs.from_config(cfg.get("distributed"))
    quant = quantization(cfg.model)

    model, _, _ = build_mole_model(cfg, meta=True)
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    weights = tensor_bytes([*params, *model.buffers()])
    quant_note = None
    if quant != "none":
        quant_note, plain = quantized_weight_bytes(model, quant)
        weights += quant_note - plain
    grads = tensor_bytes(trainable)
    optimizer = 2 * grads

    account = activation_bytes(model, cfg, b, t, targs.mixed_precision)
    places = account.by_place()
    by_layer: dict[str, int] = {}
    by_kind: dict[str, int] = {}
    for (layer, kind), size in places.items():
        by_layer[str(layer)] = by_layer.get(str(layer), 0) + size
        by_kind[kind] = by_kind.get(kind, 0) + size
    activations = account.total
    logits = by_layer.get("head", 0) + by_layer.get("loss", 0)
    if targs.gradient_checkpointing:
        layer_sizes = [v for k, v in by_layer.items() if k.isdigit()]
        hidden = int(model.config.hidden_size)
        base_bytes = model.get_input_embeddings().weight.element_size()
        inputs = len(layer_sizes) * b * t * hidden * base_bytes
        activations = activations - sum(layer_sizes) + inputs + max(layer_sizes, default=0)

    n = dist.num_processes
    stage = (dist.deepspeed or {}).get("zero_stage", 0) if dist.deepspeed else None
    master = 4 * sum(p.numel() for p in trainable) if targs.mixed_precision != "no" and stage else 0
    if stage is None:
        setting = "ddp" if n > 1 else "single"
        per = {"weights": weights, "gradients": grads, "optimizer": optimizer,
               "ddp_buckets": grads if n > 1 else 0}
    else:
        setting = f"deepspeed_zero{stage}"
        shard_w = stage >= 3
        per = {"weights": weights // n if shard_w else weights,
               "gradients": grads // n if stage >= 2 else grads,
               "optimizer": (optimizer + master) // n if stage >= 1 else optimizer + master}
    per["activations"] = activations
    peak = sum(per.values())
    # the allocator's view: with gradients cleared between steps (set_to_none), G grows while A is freed
    # in backward, and backward starts with two fp32 tensors of the logits' size (the gradients of the
    # log-probabilities and of the logits)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    transient = 2 * b * t * vocab * 4
    held = per["weights"] + per["optimizer"] + per.get("ddp_buckets", 0)
    peak_allocated = held + max(activations + transient, per["gradients"])
    return {
        "batch_size": b,
        "seq_len": t,
        "setting": setting,
        "num_processes": n,
        "mixed_precision": targs.mixed_precision,
        "gradient_checkpointing": targs.gradient_checkpointing,
        "quantization": quant,
        **({"quantized_weights": quant_note} if quant_note is not None else {}),
        "per_process": per,
        "activations_by_layer": by_layer,
        "activations_by_kind": by_kind,
        "logits_and_loss": logits,
        "peak": peak,
        "peak_gib": round(peak / GIB, 3),
        "backward_transient": transient,
        "peak_allocated": peak_allocated,
        "peak_allocated_gib": round(peak_allocated / GIB, 3),
    }


def measure_step(model: nn.Module, forward_loss: Callable[[], torch.Tensor],
                 optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """The memory account of one real training step, in bytes: parameters and buffers, the gradients and
    AdamW states that exist after the step, and the tensors saved for backward (counted during the forward).

    Runs ``forward_loss()`` (the forward and loss), backward and one optimizer step; gradients are left
    as the step made them.
    """
    account = SavedTensorAccount.for_model(model)
    with account():
        loss = forward_loss()
    loss.backward()
    grads = tensor_bytes([p.grad for p in model.parameters() if p.grad is not None])
    optimizer.step()
    states = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    out = {"weights": tensor_bytes([*model.parameters(), *model.buffers()]), "gradients": grads,
           "optimizer": tensor_bytes(states), "activations": account.total}
    out["peak"] = sum(out.values())
    return out


def padded_batch(batch_size: int, seq_len: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A training batch of random tokens: the first third of each row is prompt (label -100), row ``i``
    ends in ``i * seq_len / 16`` padding tokens (also the batch :mod:`mole.bench` times)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, min(vocab, 250), (batch_size, seq_len), generator=g)
    mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    for i in range(batch_size):
        pad = i * seq_len // 16
        if pad:
            mask[i, seq_len - pad:] = 0
    labels = ids.clone()
    labels[:, : seq_len // 3] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def allocator_peak(fn: Callable[[], object]) -> int:
    """The most tensor bytes ``fn()`` holds at once beyond what was allocated before it, from the CPU
    allocator's events in torch's profiler (``profile_memory``): every allocation and free, short-lived
    tensors included, in time order (on the CPU what ``torch.cuda.max_memory_allocated`` gives on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def measure_config(cfg: DictConfig, batch_size: int, seq_len: int, profile: bool = False) -> dict[str, int]:
    """Build ``cfg``'s model with weights on the CPU and take the memory account of one real training step
    (:func:`measure_step`) with mole's optimizer, auxiliary losses and ``trainer.mixed_precision`` autocast.

    ``profile``: then run a second step (gradients cleared, AdamW states kept) under the profiler and add
    ``allocator_peak``: the parameters, buffers and AdamW states plus :func:`allocator_peak` of that step.
    """
    targs = TrainArgs.from_config(cfg.trainer)
    model, _, _ = build_mole_model(cfg)
    model.train()
    vocab = int(model.get_input_embeddings().weight.shape[0])
    batch = padded_batch(batch_size, seq_len, vocab)
    aux = build_aux_losses(cfg)
    amp = targs.mixed_precision in ("bf16", "fp16")

    def forward_loss() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            return loss_step(model, batch, aux)[0]

    optimizer = build_optimizer(model, targs)
    out = measure_step(model, forward_loss, optimizer)
    if profile:
        optimizer.zero_grad(set_to_none=True)

        def step() -> None:
            forward_loss().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        out["allocator_peak"] = out["weights"] + out["optimizer"] + allocator_peak(step)
    return out
