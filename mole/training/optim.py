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
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if args.lora_plus_ratio == 1.0:
        return torch.optim.AdamW([p for _, p in named], lr=args.lr, weight_decay=args.weight_decay)
    b = [p for n, p in named if "lora_B" in n]
    rest = [p for n, p in named if "lora_B" not in n]
    groups = [{"params": rest, "lr": args.lr}, {"params": b, "lr": args.lr * args.lora_plus_ratio}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=args.lr, weight_decay=args.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, args: TrainArgs, total_steps: int):
    """Linear warm-up over ``warmup_steps``, then constant, linear or cosine decay to 0 at ``total_steps``."""

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
