"""The benchmark's variants: which models it times, and how each one's training step is built."""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from mole.bench.compiling import compile_model
from mole.bench.loops import lora_gather_loop, lora_loramoe_loop, lora_reference, swap_in_loops
from mole.build import build_aux_losses, inject_from_config
from mole.config import compose_config
from mole.losses.lm import lm_loss
from mole.memory import padded_batch
from mole.training.args import TrainArgs
from mole.training.loop import loss_step
from mole.training.optim import adamw, build_optimizer

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
LOOPS = {"loop_soft": lora_reference, "loop_topk": lora_gather_loop, "loop_soft_loramoe": lora_loramoe_loop}
GPU_OPT_IN = {"loop_soft_loramoe"}  # run on a GPU only when named in --variants
RATIO_KEYS = [k for k in VARIANTS if k != BASELINE]

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
        raise SystemExit("mole.bench: --clock cpu needs --threads 1 (CPU time of several threads is not a step's time)")
    return Setup(device, model + list(args.model_override or []), args.batch or batch, args.seq or seq,
                 rounds, warmup, amp, comp, eval_limit=8 if args.quick else None, eval_repeats=3 if args.quick else 7,
                 clock=clock if device.type == "cpu" else "cuda-events", compile_scope=args.compile_scope,
                 compile_backend=args.compile_backend)


def compose(setup: Setup, overrides: list[str]):
    return compose_config([*setup.model_overrides, "eval=none", *overrides])


def make_batch(setup: Setup, vocab: int, seed: int = 0) -> dict:
    """A fixed batch: random tokens, the first third of each row prompt (label -100), a little padding."""
    return {k: v.to(setup.device) for k, v in padded_batch(setup.batch, setup.seq, vocab, seed).items()}


def build_variant(name: str, setup: Setup, base: nn.Module, tokenizer, overrides: list[str] | None = None) -> Variant:
    """One variant: the peft baseline, a built-in of :data:`VARIANTS`, or ``overrides`` (``--add-variant``)."""
    # a copy of the module tree that shares the frozen base weights (every variant freezes them; on a GPU,
    # 17 copies of a 1B model's weights would not fit beside each other)
    shared = {id(t): t for t in [*base.parameters(), *base.buffers()]}
    model = copy.deepcopy(base, memo=shared)
    torch.manual_seed(0)
    if name == BASELINE:  # peft LoRA r=8 on all 7 linears, as mole's `method=lora` (alpha 16, dropout 0.05)
        cfg = compose(setup, ["method=lora"])
        lcfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=float(cfg.adapter.dropout), bias="none",
                          target_modules=list(cfg.experts.targets), task_type="CAUSAL_LM")
        model = get_peft_model(model, lcfg)
        model.to(setup.device)
        # the AdamW that mole's trainer builds (fused where the parameters allow it), so that the ratios
        # compare the adapters' cost and not two optimizer implementations
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

