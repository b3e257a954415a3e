"""``TrainArgs``: the ``trainer`` config node, validated where it is used."""

from __future__ import annotations

from dataclasses import dataclass, fields

from omegaconf import DictConfig, OmegaConf

from mole.utils.errors import MoleConfigError

SCHEDULERS = ("constant", "linear", "cosine")


@dataclass
class TrainArgs:
    """Optimisation settings (``trainer.*``)."""

    max_steps: int | None = None  # optimizer steps; None: epochs decide; 0: untrained checkpoint
    epochs: float = 1  # passes over the training data when max_steps is None
    lr: float = 3e-4  # AdamW learning rate
    batch_size: int = 4  # micro-batch size
    grad_accum: int = 1  # micro-batches per optimizer step
    eval_every: int = 0  # validation loss every N steps; 0: at the start and the end only
    warmup_steps: int = 0  # linear warm-up
    scheduler: str = "linear"  # decay after warm-up: constant | linear | cosine
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    log_every: int = 1  # steps between progress-bar / log updates
    eval_batch_size: int = 8  # micro-batch for validation loss
    init_from: str | None = None  # a previous run directory: start from its adapter (MoR Table 2, stage 2)
    lora_plus_ratio: float = 1.0  # LoRA+ (Hayou et al. 2024): lr of *lora_B* parameters x this (eta_B); 1 = off

    def __post_init__(self) -> None:
        def bad(key: str, expected: str) -> MoleConfigError:
            return MoleConfigError(f"trainer.{key} must be {expected}, got {getattr(self, key)!r}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if self.max_steps is not None and not (is_int(self.max_steps) and self.max_steps >= 0):
            raise bad("max_steps", "null or a non-negative integer")
        if not (isinstance(self.epochs, (int, float)) and self.epochs > 0):
            raise bad("epochs", "a positive number")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise bad("lr", "a positive number")
        for key in ("batch_size", "grad_accum", "eval_batch_size", "log_every"):
            if not (is_int(getattr(self, key)) and getattr(self, key) >= 1):
                raise bad(key, "a positive integer")
        for key in ("eval_every", "warmup_steps"):
            if not (is_int(getattr(self, key)) and getattr(self, key) >= 0):
                raise bad(key, "a non-negative integer")
        if self.scheduler not in SCHEDULERS:
            raise bad("scheduler", f"one of {list(SCHEDULERS)}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise bad("weight_decay", "a non-negative number")
        if not (isinstance(self.max_grad_norm, (int, float)) and self.max_grad_norm >= 0):
            raise bad("max_grad_norm", "a non-negative number")
        if self.init_from is not None and not (isinstance(self.init_from, str) and self.init_from):
            raise bad("init_from", "null or the path of a previous run directory")
        if not (isinstance(self.lora_plus_ratio, (int, float)) and not isinstance(self.lora_plus_ratio, bool)
                and self.lora_plus_ratio > 0):
            raise bad("lora_plus_ratio", "a positive number (1.0 turns LoRA+ off)")

    @classmethod
    def from_config(cls, node: DictConfig) -> TrainArgs:
        values = OmegaConf.to_container(node, resolve=True)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise MoleConfigError(f"trainer: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**values)
