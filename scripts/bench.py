#!/usr/bin/env python
"""Training-step speed of every MoLE method against a ``peft`` LoRA r=8 step on the same model.

    make bench ARGS=--quick                # CPU, small Llama, < 5 min on 2 cores
    python scripts/bench.py --threads 1    # single-threaded (steadier on a shared machine)
    python scripts/bench.py --device cuda  # GPU: 1B-class Llama shape, bf16 autocast, torch.compile, CUDA events

What it does (docs/speed.md):

* builds ONE random base model (CPU: a small Llama from ``conf/model/tiny_llama.yaml`` widened; GPU: the
  shape of ``conf/model/llama3_2_1b.yaml``, random weights, bf16), and makes each variant from a copy of
  it (the module tree copied, the frozen weights shared) through mole's own config composition and :func:`mole.pipeline.inject_from_config` — the
  presets of ``conf/method/`` exactly as ``mole-train method=...`` builds them, aux losses included;
* times full training steps (forward, LM loss + auxiliary routing losses, backward, AdamW step; every
  variant, the peft baseline included, with the AdamW that mole's trainer builds: fused where possible)
  round-robin — every round runs one step of every variant, in a shuffled order — after warm-up, and
  reports the median over rounds of the per-round ratio ``t(variant) / t(peft LoRA r=8)``, so slow drifts
  of a shared machine cancel out;
* the per-expert Python-loop references (``loop_soft``: every expert over every token;
  ``loop_topk``: each expert over the tokens routed to it, gathered, as published MoLE code does) are the
  soft / top-2 MoLE models with their experts' forward swapped for the loop; both draw one dropout mask
  per layer, as mole does. ``loop_soft_loramoe`` is ``loop_soft`` in the form of LoRAMoE's released code,
  where every expert draws its own mask with torch's dropout (CPU default; on a GPU only when named in
  ``--variants``: eight saved dropped-out inputs per Linear instead of one add tens of GB to ``loop_soft``'s
  61 GB at the GPU batch);
* peak memory per variant: on CUDA ``torch.cuda.max_memory_allocated`` over one step; on the CPU an
  account of one step: parameters and buffers + gradients and two AdamW moments of the trainable
  parameters + every tensor autograd saves for backward (unique storages, parameters excluded);
* ``mole-eval`` log-likelihood throughput (:func:`mole.eval.harness.evaluate_model`, what ``mole-eval``
  and ``mole-train`` call) against plain lm-eval (``HFLM`` + ``simple_evaluate``) on the bare base model,
  same shipped fixture tasks, alternating runs.

Writes ``<out>/latest.json`` and ``<out>/latest.md`` (default ``outputs/bench/``).
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mole.adapters.lora import (  # noqa: E402
    LoRAExperts,
    gather_reference_forward,
    per_expert_dropout_loop_forward,
    reference_forward,
)
from mole.config import compose_config  # noqa: E402
from mole.memory import SavedTensorAccount, padded_batch, tensor_bytes  # noqa: E402

BASELINE = "peft_lora_r8"
E8 = ["experts=uniform_8"]
# name -> command-line overrides (on top of the model overrides); None marks the peft baseline
VARIANTS: dict[str, list[str] | None] = {
    BASELINE: None,
    "lora_r8": ["method=lora"],
    "lora_r64": ["method=lora", "adapter.rank=64", "adapter.alpha=128"],
    "soft_e8": ["method=lora", *E8, "router=soft", "loss=none"],
    "topk_e8": ["method=lora", *E8, "router=topk", "loss=[balance]"],
    "mola": ["method=mola"],
    "mola_mor": ["method=mola_mor"],
    "hmora": ["method=hmora"],
    "hmora_lw": ["method=hmora_lw"],
    "dynmole": ["method=dynmole"],
    "moa_soft": ["method=moa_soft"],
    "moa_sparse": ["method=moa_sparse"],
    "hydralora": ["method=hydralora"],
    "mixlora": ["method=mixlora"],
    "loop_soft": ["method=lora", *E8, "router=soft", "loss=none"],
    "loop_topk": ["method=lora", *E8, "router=topk", "loss=[balance]"],
    "loop_soft_loramoe": ["method=lora", *E8, "router=soft", "loss=none"],
}
# which per-expert loop replaces the stacked forward
LOOPS = {"loop_soft": reference_forward, "loop_topk": gather_reference_forward,
         "loop_soft_loramoe": per_expert_dropout_loop_forward}
GPU_OPT_IN = {"loop_soft_loramoe"}  # run on a GPU only when named in --variants
RATIO_KEYS = [k for k in VARIANTS if k != BASELINE]

# the speed targets (measured here, never asserted in tests)
TARGETS = {
    "soft_e8": 1.10,
    "topk_e8": 1.10,
    **{k: 1.15 for k in ("mola", "mola_mor", "hmora", "hmora_lw", "dynmole", "moa_soft", "moa_sparse", "hydralora")},
}


@dataclass
class Setup:
    device: torch.device
    model_overrides: list[str]
    batch: int
    seq: int
    rounds: int
    warmup: int
    amp: torch.dtype | None  # autocast dtype (GPU: bf16)
    compile: bool
    eval_limit: int | None  # documents per task (None: every fixture document)
    eval_repeats: int
    clock: str = "wall"  # CPU: "cpu" (process CPU time, single-threaded) or "wall"
    compile_scope: str = "layer"  # "layer": each decoder layer compiled (regional); "model": the whole forward
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager: a quick check of the compiled path)


@dataclass
class Variant:
    name: str
    model: nn.Module
    step: Callable[[dict], torch.Tensor]  # one full training step; returns the loss (not synced)
    forward_loss: Callable[[dict], torch.Tensor]
    optimizer: torch.optim.Optimizer
    trainable: int = 0
    times: list[float] = field(default_factory=list)
    peak_mb: float = 0.0
    warmup_s: float = 0.0
    faults: list[int] = field(default_factory=list)  # minor page faults per timed step


# ---------------------------------------------------------------------------------------------------
# setup


def make_setup(args: argparse.Namespace) -> Setup:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda":
        # the shape of Llama-3.2-1B, random weights (no download), bf16 base + fp32 adapters under bf16 autocast
        model = ["model=llama3_2_1b", "model.source=config", "model.dtype=bfloat16"]
        # 4 x 1024 tokens: at 8 x 1024 the soft per-expert loop reference ran out of an H100's 80 GB
        batch, seq = (2, 512) if args.quick else (4, 1024)
        amp, comp = torch.bfloat16, not args.no_compile
    else:
        # a small Llama: the width of SmolLM2-135M (mole's default model: hidden 576, FFN 1536, 9 heads, 3 KV
        # heads), 4 of its 30 layers, tiny_llama's byte vocabulary, random weights
        model = ["model=tiny_llama", "model.hidden_size=576", "model.num_layers=4", "model.config.intermediate_size=1536",
                 "model.config.num_attention_heads=9", "model.config.num_key_value_heads=3"]
        batch, seq = (2, 128) if args.quick else (4, 256)
        amp, comp = None, args.compile
    rounds = args.rounds or (7 if args.quick else 30)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    clock = args.clock
    if clock == "auto":
        clock = "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"
    if clock == "cpu" and torch.get_num_threads() != 1:
        raise SystemExit("bench.py: --clock cpu needs --threads 1 (CPU time of several threads is not a step's time)")
    return Setup(device, model + list(args.model_override or []), args.batch or batch, args.seq or seq,
                 rounds, warmup, amp, comp, eval_limit=8 if args.quick else None, eval_repeats=3 if args.quick else 7,
                 clock=clock if device.type == "cpu" else "cuda-events", compile_scope=args.compile_scope,
                 compile_backend=args.compile_backend)


def keep_freed_memory() -> str | None:
    """On glibc, keep freed heap memory in the process instead of returning it to the OS (``mallopt``).

    glibc serves allocations above a (self-adjusting) threshold with ``mmap`` and gives them back on
    ``free``; a tensor allocated at that size later starts on fresh pages, each paid as a page fault.
    Interleaving 17 models' steps in one process (round-robin) keeps reshuffling which sizes recur, so a
    variant's step then pays page faults that it does not pay when it runs step after step, as in
    training: measured with ``--keep-freed-memory off`` at batch 2 x 128, HMoRA took 8,849 minor faults
    per step round-robin against 1,313 run alone, and 26 ms more per step. With the threshold fixed
    at 32 MiB and no trimming, every variant, the peft baseline included, reuses its own pages. Returns
    what was set, or ``None`` where this is not glibc.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if platform.system() != "Linux" or not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    if not (mallopt(m_mmap_threshold, 32 << 20) and mallopt(m_trim_threshold, 1 << 30)):
        return None
    return "glibc mallopt: M_MMAP_THRESHOLD 32 MiB, M_TRIM_THRESHOLD 1 GiB"


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` is unavailable)."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def compose(setup: Setup, overrides: list[str]):
    return compose_config([*setup.model_overrides, "eval=none", *overrides])


def make_batch(setup: Setup, vocab: int, seed: int = 0) -> dict:
    """A fixed batch: random tokens, the first third of each row prompt (label -100), a little padding."""
    return {k: v.to(setup.device) for k, v in padded_batch(setup.batch, setup.seq, vocab, seed).items()}


def swap_in_loops(model: nn.Module, fn: Callable) -> int:
    """Replace every stacked LoRA expert set's forward by the per-expert Python loop ``fn``; returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, LoRAExperts) and m.num_experts > 1:
            m.forward = types.MethodType(fn, m)
            n += 1
    return n


def build_variant(name: str, setup: Setup, base: nn.Module, tokenizer, overrides: list[str] | None = None) -> Variant:
    """One variant: the peft baseline, a built-in of :data:`VARIANTS`, or ``overrides`` (``--add-variant``)."""
    from mole.losses.lm import lm_loss
    from mole.pipeline import build_aux_losses, inject_from_config
    from mole.training.args import TrainArgs
    from mole.training.loop import loss_step
    from mole.training.optim import build_optimizer

    # a copy of the module tree that shares the frozen base weights (every variant freezes them; on a GPU,
    # 17 copies of a 1B model's weights would not fit beside each other)
    shared = {id(t): t for t in [*base.parameters(), *base.buffers()]}
    model = copy.deepcopy(base, memo=shared)
    torch.manual_seed(0)
    if name == BASELINE:  # peft LoRA r=8 on all 7 linears, as mole's `method=lora` (alpha 16, dropout 0.05)
        from peft import LoraConfig, get_peft_model

        cfg = compose(setup, ["method=lora"])
        lcfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=float(cfg.adapter.dropout), bias="none",
                          target_modules=list(cfg.experts.targets), task_type="CAUSAL_LM")
        model = get_peft_model(model, lcfg)
        model.to(setup.device)
        # the AdamW that mole's trainer builds (fused where the parameters allow it), so that the ratios
        # compare the adapters' cost and not two optimizer implementations
        from mole.training.optim import adamw

        opt = adamw([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def forward_loss(batch: dict) -> torch.Tensor:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            return lm_loss(logits, batch["labels"])
    else:
        cfg = compose(setup, VARIANTS[name] if overrides is None else overrides)
        inject_from_config(model, cfg, tokenizer)
        if name in LOOPS and not swap_in_loops(model, LOOPS[name]):
            raise RuntimeError(f"{name}: no multi-expert LoRA layer to swap")
        model.to(setup.device)
        aux = build_aux_losses(cfg)
        targs = TrainArgs.from_config(cfg.trainer)
        targs.lr = 1e-4  # tiny steps: the weights stay finite over the whole benchmark
        opt = build_optimizer(model, targs)

        def forward_loss(batch: dict) -> torch.Tensor:
            loss, _ = loss_step(model, batch, aux)
            return loss

    model.train()
    fwd = forward_loss
    if setup.compile:
        compile_model(model, setup.compile_scope, tag=name, backend=setup.compile_backend)

    def step(batch: dict) -> torch.Tensor:
        with torch.autocast(setup.device.type, dtype=setup.amp or torch.bfloat16, enabled=setup.amp is not None):
            loss = fwd(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Variant(name, model, step, forward_loss, opt, trainable)


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
    import torch._dynamo as dynamo

    cfg = dynamo.config
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
    from mole.model.inject import decoder_layers

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


# ---------------------------------------------------------------------------------------------------
# measurement


class Timer:
    """Time of one call: CUDA events (synchronised after) on a GPU; on the CPU the process's CPU time
    (``clock="cpu"``, single-threaded runs: what other processes on a shared machine take is not counted)
    or wall time (``perf_counter``)."""

    def __init__(self, device: torch.device, clock: str = "wall"):
        self.cuda = device.type == "cuda"
        self.now = time.process_time if clock == "cpu" else time.perf_counter

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        t0 = self.now()
        fn()
        return self.now() - t0


def peak_memory_mb(v: Variant, batch: dict, setup: Setup) -> float:
    """Peak memory of one training step of ``v`` (see the module docstring for the CPU account)."""
    if setup.device.type == "cuda":
        v.optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        v.step(batch)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before + _model_bytes(v)) / 2**20
    account = SavedTensorAccount.for_model(v.model)
    with account():
        with torch.autocast(setup.device.type, dtype=setup.amp or torch.bfloat16, enabled=setup.amp is not None):
            loss = v.forward_loss(batch)
    loss.backward()
    v.optimizer.zero_grad(set_to_none=True)
    trainable_bytes = sum(p.numel() * p.element_size() for p in v.model.parameters() if p.requires_grad)
    return (_model_bytes(v) + 3 * trainable_bytes + account.total) / 2**20


def _model_bytes(v: Variant) -> int:
    return tensor_bytes([*v.model.parameters(), *v.model.buffers()])


# aten ops that only make a new view or handle of existing data (or allocate without initialising): on a GPU
# they launch no kernel, so the op count leaves them out. Every other op is roughly one kernel launch.
METADATA_ONLY_OPS = frozenset({"detach", "alias", "lift_fresh", "empty", "empty_like", "empty_strided",
                               "new_empty", "new_empty_strided", "_unsafe_view", "sym_size", "sym_stride",
                               "sym_numel", "sym_storage_offset", "is_same_size"})


def is_metadata_only(func) -> bool:
    """``func`` (an ``OpOverload``) returns a view (``is_view`` from its schema) or is in :data:`METADATA_ONLY_OPS`."""
    return func.is_view or func.overloadpacket.__name__ in METADATA_ONLY_OPS


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched inside it that launch a kernel (:func:`is_metadata_only` excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not is_metadata_only(func):
            self.counts[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def count_step_ops(v: Variant, batch: dict) -> collections.Counter:
    """The kernel-launching aten ops of one full eager training step of ``v`` (forward, losses, backward,
    optimizer step) after the optimizer state exists. The backward runs in this thread on the CPU, so the
    mode sees it; on a GPU autograd's device threads would not be counted, hence the CPU in CI."""
    v.step(batch)  # lazily created optimizer state is not part of a steady step
    with OpCounter() as counter:
        v.step(batch)
    return counter.counts


def time_variants(variants: list[Variant], batch: dict, setup: Setup, log) -> None:
    timer = Timer(setup.device, setup.clock)
    for v in variants:  # warm-up (and compilation)
        t0 = time.perf_counter()
        loss = None  # --warmup 0: no warm-up step
        for _ in range(setup.warmup):
            loss = v.step(batch)
        if loss is not None and not torch.isfinite(loss):
            raise RuntimeError(f"{v.name}: non-finite loss during warm-up")
        v.warmup_s = time.perf_counter() - t0
        if setup.compile:
            log(f"  warm-up of {v.name} (compilation included): {v.warmup_s:.1f} s")
    rng = random.Random(0)
    for r in range(setup.rounds):
        order = list(variants)
        rng.shuffle(order)  # no variant always runs right after another
        for v in order:
            f0 = minor_faults()
            v.times.append(timer(lambda v=v: v.step(batch)))
            v.faults.append(minor_faults() - f0)
        base = next(v for v in variants if v.name == BASELINE).times[-1]
        log(f"  round {r + 1}/{setup.rounds}: baseline {base * 1000:.1f} ms")


def eval_throughput(setup: Setup, base: nn.Module, tokenizer, out_dir: Path, log) -> dict:
    """Seconds per run of the same log-likelihood requests: mole's harness vs plain lm-eval, alternating."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from mole.eval.harness import RENDERED_TASKS_SUBDIR, evaluate_model, render_shipped_tasks

    tasks = ["mole_mc", "mole_yesno"]
    work = Path(tempfile.mkdtemp(prefix="bench-eval-", dir=out_dir))
    rendered = render_shipped_tasks(work / "lm" / RENDERED_TASKS_SUBDIR)
    base.eval()

    def run_mole() -> dict:
        return evaluate_model(base, tokenizer, tasks, output_dir=work / "mole", batch_size=8, limit=setup.eval_limit)

    def run_lm_eval() -> dict:
        lm = HFLM(pretrained=base, tokenizer=tokenizer, batch_size=8)
        manager = TaskManager(include_path=[str(rendered)], include_defaults=False)
        return simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=setup.eval_limit, log_samples=False)

    import logging

    quiet = [logging.getLogger(n) for n in ("lm_eval", "mole.eval.harness", "lm-eval")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    try:
        run_mole(), run_lm_eval()  # warm-up: imports, tokenizer caches
        ratios, t_mole, t_lm = [], [], []
        for i in range(setup.eval_repeats):
            pair = [("mole", run_mole), ("lm", run_lm_eval)]
            if i % 2:
                pair.reverse()
            got = {}
            for key, fn in pair:
                t0 = time.perf_counter()
                res = fn()
                got[key] = time.perf_counter() - t0
                n = sum(v["effective"] for v in res["n-samples"].values())
            t_mole.append(got["mole"])
            t_lm.append(got["lm"])
            ratios.append(got["lm"] / got["mole"])  # throughput ratio = inverse time ratio
            log(f"  eval {i + 1}/{setup.eval_repeats}: mole {got['mole']:.2f} s, lm-eval {got['lm']:.2f} s")
    finally:
        for lg, level in zip(quiet, levels, strict=True):
            lg.setLevel(level)
    return {"ratio": statistics.median(ratios), "mole_eval_s": statistics.median(t_mole),
            "lm_eval_s": statistics.median(t_lm), "documents": n, "limit": setup.eval_limit}


# ---------------------------------------------------------------------------------------------------
# report


def markdown(result: dict) -> str:
    ratios, mem, ms = result["ratios_vs_peft_lora_r8"], result["peak_memory_mb"], result["step_ms_median"]
    lines = [
        f"Command: `{result['command']}`  ",
        f"Device: {result['device']}; model: {result['model']}; batch {result['batch']} x {result['seq']} tokens; "
        f"{result['rounds']} rounds after {result['warmup']} warm-up steps; threads {result['threads']}; "
        f"compile {result['compile']}{' (' + result['compile_scope'] + ')' if result.get('compile_scope') else ''}; "
        f"autocast {result.get('autocast')}; clock {result['clock']}; allocator {result.get('allocator', 'default')}; "
        f"load average before the run {result['loadavg']}.",
        "",
        "| variant | step ms (median) | ratio vs peft LoRA r=8 (median of paired rounds) | target | trainable params "
        "| peak memory MB | page faults / step |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    faults = result.get("minor_page_faults_per_step_median", {})
    lines.append(f"| peft LoRA r=8 | {ms[BASELINE]:.1f} | 1.000 | | {result['trainable'][BASELINE]:,} | {mem[BASELINE]:.0f} "
                 f"| {faults.get(BASELINE, '')} |")
    for k in ratios:
        tgt = TARGETS.get(k)
        mark = "" if tgt is None else (f"<= {tgt:.2f} " + ("met" if ratios[k] <= tgt else "**missed**"))
        lines.append(f"| {k} | {ms[k]:.1f} | {ratios[k]:.3f} | {mark} | {result['trainable'][k]:,} | {mem[k]:.0f} "
                     f"| {faults.get(k, '')} |")
    d = result.get("derived", {})
    if d:
        lines += ["", "| derived | value | target |", "|---|---:|---:|"]
        for key, (val, tgt, sense) in d.items():
            ok = val >= tgt if sense == ">=" else val <= tgt
            lines.append(f"| {key} | {val:.3f} | {sense} {tgt} {'met' if ok else '**missed**'} |")
    ev = result.get("eval_throughput_vs_lm_eval")
    if ev is not None:
        e = result["eval"]
        lines += ["", f"mole-eval log-likelihood throughput vs lm-eval on the bare base model: **{ev:.3f}x** "
                  f"(target >= 0.9; median of {result['eval_repeats']} alternating runs, {e['documents']} documents, "
                  f"mole {e['mole_eval_s']:.2f} s, lm-eval {e['lm_eval_s']:.2f} s)."]
    if "ops_per_step" in result:
        n, r = result["ops_per_step"], result["ops_ratio_vs_peft_lora_r8"]
        lines += ["", "| variant | kernel-launching aten ops per eager step | ratio vs peft LoRA r=8 (target <= 1.25) |",
                  "|---|---:|---:|", f"| peft LoRA r=8 | {n[BASELINE]:,} | 1.000 |"]
        lines += [f"| {k} | {n[k]:,} | {r[k]:.3f} |" for k in r]
        lines += ["", f"Not counted (no kernel launch): {result['ops_excluded']}."]
    lines += ["", f"Peak memory: {result['memory_method']}"]
    return "\n".join(lines) + "\n"


def derived(times: dict[str, list[float]]) -> dict:
    """Ratios between two variants, each the median over rounds of the paired per-round ratio."""
    pairs = {
        "mola_mor / mola": ("mola_mor", "mola", 1.02, "<="),
        "loop_soft / soft_e8 (speed-up over the loop)": ("loop_soft", "soft_e8", 2.0, ">="),
        "loop_topk / topk_e8 (speed-up over the loop)": ("loop_topk", "topk_e8", 1.25, ">="),
        "loop_soft_loramoe / soft_e8 (speed-up over LoRAMoE's loop form)": ("loop_soft_loramoe", "soft_e8", 2.0, ">="),
    }
    out = {}
    for key, (a, b, target, sense) in pairs.items():
        if a in times and b in times:
            out[key] = (statistics.median(x / y for x, y in zip(times[a], times[b], strict=True)), target, sense)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds, smaller batch (CI: < 5 min on 2 cores)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1: single-threaded; the default with --quick on the CPU)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--clock", default="auto", choices=["auto", "cpu", "wall"],
                   help="CPU timing: process CPU time (auto with --threads 1: robust on a shared machine) or wall time")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 8 quick, 30 full)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per variant")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--variants", default=None, help="comma-separated subset (the peft baseline is always run)")
    p.add_argument("--compile", action="store_true", help="torch.compile the models on the CPU too")
    p.add_argument("--no-compile", action="store_true", help="no torch.compile on a GPU")
    p.add_argument("--compile-scope", default="layer", choices=["layer", "model"],
                   help="compile each decoder layer (default: fast to compile) or the whole forward")
    p.add_argument("--compile-backend", default="inductor", choices=["inductor", "aot_eager", "eager"],
                   help="torch.compile backend (aot_eager: the compiled path without a compiler's wait)")
    p.add_argument("--no-eval", action="store_true", help="skip the mole-eval vs lm-eval throughput")
    p.add_argument("--keep-freed-memory", default="auto", choices=["auto", "on", "off"],
                   help="CPU: keep freed heap memory in the process (glibc mallopt; auto = on for the CPU), so that "
                        "round-robin timing does not add page faults a training run does not have")
    p.add_argument("--model-override", action="append", help="extra model.* override, e.g. model.num_layers=8")
    p.add_argument("--add-variant", action="append", default=[], metavar="NAME=OVERRIDES",
                   help="time one more variant, built from mole-train overrides (space-separated), e.g. "
                        "'hmora_no_router_dropout=method=hmora router.dropout=0'; repeatable")
    p.add_argument("--count-ops", action="store_true",
                   help="also count the kernel-launching aten ops of one eager training step per variant, and their "
                        "ratio to the peft baseline (views and allocations excluded: see METADATA_ONLY_OPS)")
    p.add_argument("--out", default="outputs/bench", help="output directory")
    args = p.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.warmup is not None and args.warmup < 0:
        p.error(f"--warmup must be 0 or more, got {args.warmup}")
    if args.count_ops and args.compile:
        p.error("--count-ops counts eager steps; run it without --compile")
    if args.threads is None and args.quick and args.device != "cuda":
        args.threads = 1  # --quick on the CPU: single-threaded, timed by CPU time (steady on a shared CI runner)
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = make_setup(args)
    malloc = None
    if args.keep_freed_memory == "on" or (args.keep_freed_memory == "auto" and setup.device.type == "cpu"):
        malloc = keep_freed_memory()
        if malloc is None and args.keep_freed_memory == "on":
            p.error("--keep-freed-memory on needs glibc (mallopt)")
    if setup.compile:
        configure_dynamo()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    if args.variants:
        names = [BASELINE, *[n for n in args.variants.split(",") if n and n != BASELINE]]
    else:
        names = [n for n in VARIANTS if setup.device.type != "cuda" or n not in GPU_OPT_IN]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    added: dict[str, list[str]] = {}
    for spec in args.add_variant:
        name, sep, overrides = spec.partition("=")
        if not sep or not name.isidentifier() or not overrides.split():
            p.error(f"--add-variant {spec!r}: expected NAME=OVERRIDES with NAME an identifier, e.g. "
                    "'hmora_no_router_dropout=method=hmora router.dropout=0'")
        if name in VARIANTS or name in added:
            p.error(f"--add-variant {spec!r}: the name {name!r} is already taken; choose another")
        added[name] = overrides.split()
    names += list(added)
    loadavg = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    from mole.model.base import build_model

    cfg = compose(setup, ["method=lora"])
    torch.manual_seed(0)
    base, tokenizer = build_model(cfg.model, seed=0)
    base.to(setup.device)
    vocab = base.config.vocab_size
    batch = make_batch(setup, vocab)
    log(f"base model {sum(p.numel() for p in base.parameters()) / 1e6:.1f} M parameters on {setup.device}")

    variants = []
    for n in names:
        variants.append(build_variant(n, setup, base, tokenizer, added.get(n)))
        log(f"built {n}: {variants[-1].trainable:,} trainable")
    time_variants(variants, batch, setup, log)
    for v in variants:
        v.peak_mb = peak_memory_mb(v, batch, setup)
    ops = {v.name: count_step_ops(v, batch) for v in variants} if args.count_ops else {}
    by = {v.name: v for v in variants}
    base_t = by[BASELINE].times
    ratios = {k: statistics.median(t / b for t, b in zip(by[k].times, base_t, strict=True))
              for k in [*RATIO_KEYS, *added] if k in by}
    result = {
        "command": "python scripts/bench.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "device": str(setup.device) + ("" if setup.device.type != "cuda" else f" ({torch.cuda.get_device_name()})"),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "model": " ".join(setup.model_overrides),
        "batch": setup.batch,
        "seq": setup.seq,
        "rounds": setup.rounds,
        "warmup": setup.warmup,
        "compile": setup.compile,
        "clock": setup.clock,
        "autocast": None if setup.amp is None else str(setup.amp),
        "loadavg": loadavg,
        "allocator": malloc or "default",
        "ratios_vs_peft_lora_r8": {k: round(v, 4) for k, v in ratios.items()},
        "step_ms_median": {v.name: round(statistics.median(v.times) * 1000, 2) for v in variants},
        "trainable": {v.name: v.trainable for v in variants},
        "peak_memory_mb": {v.name: round(v.peak_mb, 1) for v in variants},
        "warmup_s": {v.name: round(v.warmup_s, 1) for v in variants},
        "minor_page_faults_per_step_median": {v.name: statistics.median(v.faults) for v in variants},
        "compile_scope": setup.compile_scope if setup.compile else None,
        "memory_method": ("torch.cuda.max_memory_allocated over one step (plus the model)" if setup.device.type == "cuda" else
                          "CPU account of one step: parameters + buffers, gradients and two AdamW moments of the "
                          "trainable parameters, and the unique storages autograd saves for backward"),
        "targets": TARGETS,
        "derived": {k: [round(a, 4), b, c] for k, (a, b, c) in derived({v.name: v.times for v in variants}).items()},
        "step_s_per_round": {v.name: [round(t, 5) for t in v.times] for v in variants},
    }
    if ops:
        result["ops_per_step"] = {k: sum(c.values()) for k, c in ops.items()}
        result["ops_ratio_vs_peft_lora_r8"] = {k: round(n / result["ops_per_step"][BASELINE], 4)
                                               for k, n in result["ops_per_step"].items() if k != BASELINE}
        result["ops_by_name"] = {k: dict(c.most_common()) for k, c in ops.items()}
        result["ops_excluded"] = "views (schema is_view) and " + ", ".join(sorted(METADATA_ONLY_OPS))
    result["eval_throughput_vs_lm_eval"] = None

    def write() -> str:
        result["wall_s"] = round(time.perf_counter() - t_start, 1)
        (out / "latest.json").write_text(json.dumps(result, indent=2) + "\n")
        md = markdown({**result, "derived": {k: tuple(v) for k, v in result["derived"].items()}})
        (out / "latest.md").write_text(md)
        return md

    write()  # the step timings are kept even if the evaluation below fails
    if not args.no_eval:
        for v in variants:  # the variants' copies share the base weights; free their adapters and optimizer states
            v.optimizer.state.clear()
        del variants, by
        ev = eval_throughput(setup, base, tokenizer, out, log)
        result["eval_throughput_vs_lm_eval"] = round(ev["ratio"], 4)
        result["eval"] = ev
        result["eval_repeats"] = setup.eval_repeats
    md = write()
    print(md)
    log(f"wrote {out / 'latest.json'} and {out / 'latest.md'}")
    return result


if __name__ == "__main__":
    main()
