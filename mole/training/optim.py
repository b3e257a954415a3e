"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from mole.training.args import TrainArgs


def build_optimizer(model: nn.Module, args: TrainArgs) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters.

    LoRA+ (Hayou et al. 2024; HMoRA Appendix C "Hydra LoRA+"): parameters named ``*lora_B*`` train at
    ``lr * trainer.lora_plus_ratio`` (eta_B), every other trainable parameter at ``lr``. The scheduler
    scales both groups alike.

    ``trainer.fused_optimizer`` (default true) uses torch's fused AdamW, the same update in one kernel over
    every parameter instead of a Python loop of small kernels per parameter (on the CPU about 4x faster for
    the ~100 adapter and router tensors of a MoLE model; :mod:`mole.bench` gives its baseline the same).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if args.lora_plus_ratio == 1.0:
        groups = [{"params": [p for _, p in named]}]
    else:
        b = [p for n, p in named if "lora_B" in n]
        rest = [p for n, p in named if "lora_B" not in n]
        groups = [{"params": rest, "lr": args.lr}, {"params": b, "lr": args.lr * args.lora_plus_ratio}]
    return adamw([g for g in groups if g["params"]], lr=args.lr, weight_decay=args.weight_decay,
                 fused=args.fused_optimizer)


def adamw(params, *, lr: float, weight_decay: float = 0.0, fused: bool = True) -> torch.optim.AdamW:
    """``torch.optim.AdamW``, fused where every parameter allows it (floating point, on the CPU or a CUDA
    device); otherwise, or with ``fused=False``, torch's default implementation."""
    params = list(params)
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    if fused and tensors and all(t.is_floating_point() and t.device.type in ("cpu", "cuda") for t in tensors):
        try:
            return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
        except (RuntimeError, ValueError):  # a dtype or device this torch's fused kernel does not take
            pass
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, args: TrainArgs, total_steps: int):
    """Linear warm-up over ``warmup_steps``, then constant, linear or cosine decay to 0 at ``total_steps``.

    Not ``transformers.get_scheduler``: its warm-up factor is ``step / warmup_steps``, so the first optimizer
    step runs at lr 0 and full lr is reached one step later; here it is ``(step + 1) / warmup_steps``. After
    the warm-up the two agree (linear, and cosine with half a cycle); ``total_steps <= warmup_steps`` stays
    at full lr here, while ``get_scheduler`` would divide by a non-positive span.
    """

    def factor(step: int) -> float:
        if args.warmup_steps and step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        if args.scheduler == "constant" or total_steps <= args.warmup_steps:
            return 1.0
        progress = (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps)
        if args.scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
