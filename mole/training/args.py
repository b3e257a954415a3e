"""``TrainArgs``: the ``trainer`` config node, validated where it is used."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from omegaconf import DictConfig, OmegaConf

from mole.model.compile import BACKENDS as COMPILE_BACKENDS
from mole.model.compile import valid_setting as valid_compile_setting
from mole.utils.errors import MoleConfigError

SCHEDULERS = ("constant", "linear", "cosine")
MIXED_PRECISION = ("no", "bf16", "fp16")
TRACKERS = ("tensorboard", "wandb")


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
    fused_optimizer: bool = True  # torch's fused AdamW kernel where the parameters allow it (same update, one kernel)
    save_every: int = 0  # resumable checkpoint every N steps into RUN_DIR/checkpoints/; 0: none
    keep_checkpoints: int = 2  # newest checkpoints kept
    resume: bool = False  # continue from the newest checkpoint of the run directory
    mixed_precision: str = "no"  # no | bf16 | fp16: autocast through Accelerate (fp16 needs a GPU)
    gradient_checkpointing: bool = False  # recompute decoder-layer activations in backward (less memory)
    compile: str | bool = "auto"  # torch.compile each decoder layer: auto (CUDA only) | true | false
    compile_backend: str = "inductor"  # torch.compile backend: inductor | aot_eager | eager (debugging)
    log_with: list[str] = field(default_factory=list)  # trackers: tensorboard, wandb (offline unless WANDB_MODE)
    tracker_project: str = "mole"  # the trackers' project name (wandb project; tb/<name>/ under the run)
    label_smoothing: float = 0.0  # of the training LM loss (HMoRA: 0.1); validation loss is never smoothed
    val_acc_every: int = 0  # accuracy on the validation benchmarks (eval.val_benchmarks) every N steps; 0: off
    early_stop_patience: int = 0  # stop after N accuracy evaluations without improvement; 0: never
    keep_best: bool = False  # end with (save and evaluate) the adapter of the best validation accuracy

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
        for key in ("batch_size", "grad_accum", "eval_batch_size", "log_every", "keep_checkpoints"):
            if not (is_int(getattr(self, key)) and getattr(self, key) >= 1):
                raise bad(key, "a positive integer")
        for key in ("eval_every", "warmup_steps", "save_every"):
            if not (is_int(getattr(self, key)) and getattr(self, key) >= 0):
                raise bad(key, "a non-negative integer")
        if not isinstance(self.resume, bool):
            raise bad("resume", "true or false")
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
        if not isinstance(self.fused_optimizer, bool):
            raise bad("fused_optimizer", "true or false")
        if self.mixed_precision is False:  # YAML 1.1 reads a bare `no` as false
            self.mixed_precision = "no"
        if self.mixed_precision not in MIXED_PRECISION:
            raise bad("mixed_precision", f"one of {list(MIXED_PRECISION)}")
        if not (isinstance(self.label_smoothing, (int, float)) and 0 <= self.label_smoothing < 1):
            raise bad("label_smoothing", "a number in [0, 1)")
        for key in ("val_acc_every", "early_stop_patience"):
            if not (is_int(getattr(self, key)) and getattr(self, key) >= 0):
                raise bad(key, "a whole number >= 0")
        if not isinstance(self.keep_best, bool):
            raise bad("keep_best", "true or false")
        if (self.early_stop_patience or self.keep_best) and not self.val_acc_every:
            raise MoleConfigError(
                "trainer.early_stop_patience and trainer.keep_best need trainer.val_acc_every > 0 (how often the "
                "validation accuracy they act on is measured)"
            )
        if not isinstance(self.gradient_checkpointing, bool):
            raise bad("gradient_checkpointing", "true or false")
        if not valid_compile_setting(self.compile):
            raise bad("compile", "auto, true or false")
        if self.compile_backend not in COMPILE_BACKENDS:
            raise bad("compile_backend", f"one of {list(COMPILE_BACKENDS)}")
        if isinstance(self.log_with, str):
            self.log_with = [self.log_with]
        if self.log_with is None:
            self.log_with = []
        if not (isinstance(self.log_with, list) and all(t in TRACKERS for t in self.log_with)):
            raise bad("log_with", f"a list drawn from {list(TRACKERS)} (e.g. trainer.log_with=[tensorboard])")
        if not (isinstance(self.tracker_project, str) and self.tracker_project.strip()):
            raise bad("tracker_project", "a non-empty name")

    @classmethod
    def from_config(cls, node: DictConfig) -> TrainArgs:
        values = OmegaConf.to_container(node, resolve=True)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise MoleConfigError(f"trainer: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**values)
