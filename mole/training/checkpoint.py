"""Resumable training checkpoints: safetensors and JSON only, written atomically.

``trainer.save_every=N`` writes ``RUN_DIR/checkpoints/step-<step>/`` every N optimizer steps:

=========================  ==========================================================================
``adapter.safetensors``    the trainable (``mole_``) weights, as in the run's final adapter
``optimizer.safetensors``  every tensor of ``optimizer.state_dict()["state"]`` as ``state.<i>.<key>``
``optimizer.json``         the rest of the optimizer state: param groups (lr, betas, ...), non-tensor state
``scheduler.json``         ``scheduler.state_dict()``
``rng.safetensors``        torch CPU (and CUDA) RNG states; the sampler generator at the epoch's start
``rng.json``               python ``random`` and numpy RNG states
``trainer_state.json``     step, data position (epoch, batch index), the train/val loss history, timers
``config.yaml``            the resolved config the checkpoint was made with (resume checks it)
=========================  ==========================================================================

A checkpoint is built in ``checkpoints/.tmp-step-<step>-<pid>/`` and renamed into place, so a run
killed while saving leaves no half-written ``step-*`` directory (stale temporary directories are removed
by the next run). The newest ``trainer.keep_checkpoints`` are kept. A process removes a checkpoint it did
not write itself only while it holds the run directory's lock (:mod:`mole.run_dir`): another live run's
checkpoints are never touched.

``trainer.resume=true`` continues from the newest checkpoint: the adapter, optimizer, scheduler and RNG
states are loaded, and the data order continues exactly: the sampler generator is set to its state at the
start of the interrupted epoch, that epoch's batches are drawn again and the consumed ones skipped. On the
CPU a resumed run ends bit for bit where the uninterrupted run does (``tests/unit/training/test_checkpoint.py``).

Nothing here is pickled: tensors go through safetensors, everything else through JSON/YAML.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mole.model.state import ADAPTER_FILE, load_adapter, save_adapter
from mole.run_dir import config_differences, holds_lock
from mole.training.loop import TrainState
from mole.utils.errors import MoleConfigError

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
FORMAT = "mole-checkpoint-v1"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TMP_PREFIX = ".tmp-step-"

#: Config keys that may differ between a checkpoint and the run resuming it (they do not change training).
RESUME_IGNORED_KEYS = ("force", "trainer.resume", "trainer.save_every", "trainer.keep_checkpoints",
                       "trainer.log_every", "eval.", "paths.", "distributed.machine_rank",
                       "distributed.main_process_ip", "distributed.main_process_port", "distributed.rdzv_backend",
                       "distributed.num_machines", "distributed.num_processes")


# ---------------------------------------------------------------------------------------------------
# the data position


def sampler_generator(loader) -> torch.Generator | None:
    """The ``torch.Generator`` that shuffles ``loader`` (a DataLoader or Accelerate's wrapper of one)."""
    sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
    gen = getattr(sampler, "generator", None)
    return gen if isinstance(gen, torch.Generator) else getattr(loader, "generator", None)


class BatchStream(Iterator[dict]):
    """Endless batches, epoch after epoch, that know their position and can be put back to it.

    The position is ``(epoch, batch_index)`` plus the sampler generator's state at the start of the epoch:
    the generator draws an epoch's shuffling order when the epoch's iterator starts, so restoring that
    state, starting the iterator and skipping ``batch_index`` batches gives exactly the remaining batches.
    """

    def __init__(self, loader):
        self.loader = loader
        self.generator = sampler_generator(loader)
        self.epoch = 0
        self.batch_index = 0  # batches of the current epoch already handed out
        self._epoch_start: torch.Tensor | None = None  # generator state before the epoch's iterator
        self._iter: Iterator | None = None
        self._pending: tuple[torch.Tensor | None, int] | None = None  # a position to resume at
        self._after_resume: Callable[[], None] | None = None

    def __next__(self) -> dict:
        for _ in range(2):  # at most one epoch boundary per batch
            if self._iter is None:
                self._start_epoch()
            try:
                batch = next(self._iter)
            except StopIteration:
                self._iter, self.epoch, self.batch_index = None, self.epoch + 1, 0
                continue
            self.batch_index += 1
            return batch
        raise MoleConfigError("data: the training loader yields no batches")

    def _start_epoch(self) -> None:
        skip = 0
        if self._pending is not None:
            gen_state, skip = self._pending
            if gen_state is not None and self.generator is not None:
                self.generator.set_state(gen_state)
        self._epoch_start = self.generator.get_state().clone() if self.generator is not None else None
        if hasattr(self.loader, "iteration"):  # Accelerate's DataLoaderShard counts epochs (set_epoch)
            self.loader.iteration = self.epoch
        self._iter = iter(self.loader)
        for _ in range(skip):
            next(self._iter)
        self.batch_index = skip
        if self._pending is not None:
            self._pending = None
            if self._after_resume is not None:
                self._after_resume()
                self._after_resume = None

    def state_dict(self) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
        """``({"epoch", "batch_index"}, {"epoch_start_generator": state})``."""
        tensors = {} if self._epoch_start is None else {"epoch_start_generator": self._epoch_start}
        return {"epoch": self.epoch, "batch_index": self.batch_index}, tensors

    def resume(self, position: dict[str, int], tensors: dict[str, torch.Tensor],
               then: Callable[[], None] | None = None) -> None:
        """Continue at ``position`` (from :meth:`state_dict`); ``then`` runs once the epoch is restarted."""
        self.epoch, self._iter = int(position["epoch"]), None
        gen_state = tensors.get("epoch_start_generator")
        if gen_state is None and self.generator is not None:
            log.warning("checkpoint has no sampler state; the shuffling order after resuming differs")
        self._pending = (gen_state, int(position["batch_index"]))
        self._after_resume = then


# ---------------------------------------------------------------------------------------------------
# RNG, optimizer and scheduler states as tensors + JSON


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Global RNG states: torch CPU and CUDA (tensors), python ``random`` and numpy (JSON)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, internal, gauss = random.getstate()
    meta: dict[str, Any] = {"python": [version, list(internal), gauss]}
    name, keys, pos, has_gauss, cached = np.random.get_state()
    meta["numpy"] = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda_")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in meta:
        name, keys, pos, has_gauss, cached = meta["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _jsonable(value):
    """Tuples become lists (JSON has no tuples); everything else must already be JSON."""
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``optimizer.state_dict()`` split into tensors (``state.<i>.<key>``) and JSON (the rest)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    other: dict[str, dict[str, Any]] = {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                other.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": _jsonable(sd["param_groups"]), "state": other}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                         meta: dict[str, Any], where: Path) -> None:
    """Inverse of :func:`optimizer_state`; checks that the state fits the optimizer's parameters."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = tensor
    for idx, entry in meta.get("state", {}).items():
        state.setdefault(int(idx), {}).update(entry)
    groups = meta["param_groups"]
    saved_params = sum(len(g["params"]) for g in groups)
    if len(groups) != len(optimizer.param_groups) or saved_params != len(params):
        raise MoleConfigError(
            f"{where}: optimizer state for {saved_params} parameters in {len(groups)} groups; the model has "
            f"{len(params)} trainable parameters in {len(optimizer.param_groups)} groups (another model or method?)"
        )
    for idx, entry in state.items():
        for key, value in entry.items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape != params[idx].shape:
                raise MoleConfigError(
                    f"{where}: optimizer state {key} of parameter {idx} has shape {tuple(value.shape)}, "
                    f"the model's has {tuple(params[idx].shape)} (another model or method?)"
                )
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ---------------------------------------------------------------------------------------------------
# the checkpoint directory

_WRITTEN: set[Path] = set()  # checkpoint directories this process wrote


def _may_remove(run_dir: str | Path, path: Path) -> bool:
    """A checkpoint may go when this process wrote it, or holds the run directory's lock."""
    return path.resolve() in _WRITTEN or holds_lock(run_dir)


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first, as ``(step, path)``."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir() and (path / "trainer_state.json").is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def remove_stale_temporaries(run_dir: str | Path) -> None:
    """Remove half-written checkpoints left by a run that was killed while saving: all of them under the run's
    lock, else only this process's own (another's may be a live run's checkpoint in the making)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return
    pattern = _TMP_PREFIX + "*" if holds_lock(run_dir) else f"{_TMP_PREFIX}*-{os.getpid()}"
    for path in root.glob(pattern):
        shutil.rmtree(path, ignore_errors=True)


def clear_checkpoints(run_dir: str | Path) -> int:
    """Remove every checkpoint of a run (a fresh start); returns how many there were. Needs the run's lock."""
    root = checkpoints_dir(run_dir)
    count = len(list_checkpoints(run_dir))
    if root.is_dir() and not holds_lock(run_dir):
        raise RuntimeError(f"{run_dir}: not removing checkpoints without holding the run directory's lock")
    if root.is_dir():
        shutil.rmtree(root)
    return count


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1))


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    state: TrainState,
    stream: BatchStream,
    config_yaml: str,
    keep: int,
) -> Path:
    """Write ``checkpoints/step-<step>/`` atomically and keep the newest ``keep`` checkpoints."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{_TMP_PREFIX}{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()

    save_adapter(model, tmp / ADAPTER_FILE)
    opt_tensors, opt_meta = optimizer_state(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"), metadata={"format": FORMAT})
    _write_json(tmp / "optimizer.json", opt_meta)
    _write_json(tmp / "scheduler.json", _jsonable(scheduler.state_dict()))
    rng_tensors, rng_meta = rng_state()
    position, data_tensors = stream.state_dict()
    save_file({**rng_tensors, **data_tensors}, str(tmp / "rng.safetensors"), metadata={"format": FORMAT})
    _write_json(tmp / "rng.json", rng_meta)
    (tmp / "config.yaml").write_text(config_yaml)
    _write_json(tmp / "trainer_state.json", {
        "format": FORMAT,
        "step": step,
        "world_size": world_size(),
        "data": position,
        "train_loss": state.train_loss,
        "val_loss": state.val_loss,
        "routing_stats": state.routing_stats,
        "val_acc": state.val_acc,
        "best_step": state.best_step,
        "train_time_s": state.train_time_s,
        "eval_time_s": state.eval_time_s,
    })

    final = root / f"step-{step}"
    if final.exists():  # a checkpoint of the same step from an earlier attempt
        if not _may_remove(run_dir, final):
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(f"{final} exists and was written by another process; not replacing it without "
                               "the run directory's lock")
        shutil.rmtree(final)
    os.replace(tmp, final)  # atomic: the step directory appears complete or not at all
    _WRITTEN.add(final.resolve())

    for _, old in list_checkpoints(run_dir)[:-keep]:
        if _may_remove(run_dir, old):
            shutil.rmtree(old, ignore_errors=True)
            _WRITTEN.discard(old.resolve())
    return final


def _config_differences(saved: DictConfig, current: DictConfig) -> list[str]:
    """Dotted keys whose values differ, except those in :data:`RESUME_IGNORED_KEYS`."""
    return config_differences(saved, current, RESUME_IGNORED_KEYS)


def world_size() -> int:
    """Processes of this run over all machines (1 outside a launched run)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _check_world_size(path: Path, trainer_state: dict, saved_cfg: DictConfig) -> None:
    """A checkpoint resumes exactly only with as many processes as wrote it (machines may differ: 2 x 1 and
    1 x 2 shard every batch alike). With another count the per-process batches, their data shards and the
    dropout masks drawn for them change, so the continuation would not be the run that was interrupted."""
    saved = trainer_state.get("world_size")
    if saved is None:  # written before the count was recorded: the config says it
        dist = saved_cfg.get("distributed") or {}
        saved = int(dist.get("num_processes", 1)) * int(dist.get("num_machines", 1))
    if int(saved) != world_size():
        raise MoleConfigError(
            f"trainer.resume: {path} was written by {saved} process(es) in all and this run has {world_size()}: the "
            "per-process batches, data shards and dropout masks would differ, so it would not continue exactly; "
            f"resume with distributed.num_processes x distributed.num_machines = {saved}, or start over with force=true"
        )


def load_checkpoint(
    path: str | Path,
    *,
    config: DictConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    stream: BatchStream,
) -> TrainState:
    """Restore everything :func:`save_checkpoint` wrote; returns the loop's state at that step.

    The global RNG states are restored when the data stream restarts the interrupted epoch, right before
    the next training step draws from them.
    """
    path = Path(path)
    try:
        trainer_state = json.loads((path / "trainer_state.json").read_text())
        if trainer_state.get("format") != FORMAT:
            raise MoleConfigError(f"{path}: not a {FORMAT} checkpoint (format {trainer_state.get('format')!r})")
        saved_cfg = OmegaConf.load(path / "config.yaml")
        _check_world_size(path, trainer_state, saved_cfg)
        differences = _config_differences(saved_cfg, config)
        if differences:
            raise MoleConfigError(
                f"trainer.resume: {path} was made with a different config (differs at {', '.join(differences[:6])}); "
                "resume with the same settings, or start over with force=true"
            )
        load_adapter(model, path / ADAPTER_FILE)
        load_optimizer_state(optimizer, load_file(str(path / "optimizer.safetensors")),
                             json.loads((path / "optimizer.json").read_text()), path)
        scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
        rng_tensors = load_file(str(path / "rng.safetensors"))
        rng_meta = json.loads((path / "rng.json").read_text())
    except (OSError, json.JSONDecodeError, SafetensorError, KeyError, ValueError) as err:
        if isinstance(err, MoleConfigError):
            raise
        raise MoleConfigError(f"trainer.resume: checkpoint {path} is unreadable ({type(err).__name__}: {err})") from None

    data_tensors = {k: v for k, v in rng_tensors.items() if k == "epoch_start_generator"}
    global_rng = {k: v for k, v in rng_tensors.items() if k != "epoch_start_generator"}
    stream.resume(trainer_state["data"], data_tensors, then=lambda: set_rng_state(global_rng, rng_meta))
    return TrainState(
        step=int(trainer_state["step"]),
        train_loss=list(trainer_state["train_loss"]),
        val_loss=list(trainer_state["val_loss"]),
        routing_stats=list(trainer_state.get("routing_stats", [])),
        val_acc=list(trainer_state.get("val_acc", [])),
        best_step=trainer_state.get("best_step"),
        train_time_s=float(trainer_state["train_time_s"]),
        eval_time_s=float(trainer_state["eval_time_s"]),
    )


class Checkpointer:
    """The loop's ``on_step`` callback: a checkpoint every ``every`` steps (main process only)."""

    def __init__(self, run_dir: Path, every: int, keep: int, *, model, optimizer, scheduler, stream: BatchStream,
                 config_yaml: str, is_main_process: bool = True):
        self.run_dir, self.every, self.keep = Path(run_dir), every, keep
        self.model, self.optimizer, self.scheduler, self.stream = model, optimizer, scheduler, stream
        self.config_yaml, self.is_main_process = config_yaml, is_main_process

    def __call__(self, step: int, state: TrainState) -> None:
        if self.every and step % self.every == 0 and self.is_main_process:
            path = save_checkpoint(self.run_dir, step, model=self.model, optimizer=self.optimizer,
                                   scheduler=self.scheduler, state=state, stream=self.stream,
                                   config_yaml=self.config_yaml, keep=self.keep)
            log.info("step %d: checkpoint %s", step, path)


def prepare_run_dir(run_dir: Path, *, resume: bool, force: bool, is_main_process: bool = True) -> Path | None:
    """The checkpoint to resume from, or ``None`` for a fresh start (which removes old checkpoints).

    Only the main process removes anything; the others just read where to resume from.
    """
    if not is_main_process:
        return latest_checkpoint(run_dir) if resume and not force else None
    remove_stale_temporaries(run_dir)
    if resume and not force:
        path = latest_checkpoint(run_dir)
        if path is not None:
            log.info("trainer.resume: continuing from %s", path)
            return path
        log.info("trainer.resume: no checkpoint in %s; starting from scratch", run_dir)
    removed = clear_checkpoints(run_dir)
    if removed:
        log.warning("starting over: removed %d checkpoint(s) of an earlier attempt (trainer.resume=true "
                    "continues from them instead)", removed)
    return None


def adapter_is_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for n, p in model.named_parameters() if p.requires_grad)
