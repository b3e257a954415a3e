"""Processes, precision and the Accelerator: the ``distributed`` config group and what the loop needs from it.

* :class:`DistributedArgs` — the validated ``distributed`` node (``single``, ``ddp``, ``deepspeed_zero2``,
  ``deepspeed_zero3``).
* :func:`build_accelerator` — one :class:`accelerate.Accelerator` from ``trainer`` + ``distributed``:
  mixed precision (fp16 is refused on the CPU), DeepSpeed ZeRO through ``DeepSpeedPlugin``, trackers.
* :func:`lm_normalizer`, :func:`backward`, :func:`reduce_mean` — the three places where the training
  loop differs with several processes.

Global batch. Every process draws ``trainer.batch_size`` examples per micro-batch, so one optimizer step
sees ``batch_size x num_processes x grad_accum`` examples. Accelerate's default sharding
(``split_batches=False``) cuts the *same* shuffled order (the sampler's generator is synchronised from
process 0 at every epoch) into per-process batches of ``batch_size`` and deals them out in turn: process
``r`` gets batches ``r, r + P, r + 2P, ...``. Global batch ``s`` is therefore examples
``[s*B*P, (s+1)*B*P)`` of the permutation — exactly the batch a single process with batch size
``B*P`` draws, so ``batch_size=2`` on 2 processes and ``batch_size=4`` on one train on identical data.

Token weighting. The LM loss is the mean over the *global* batch's response tokens: each process
divides its token sum by (global tokens / P), and DDP's gradient average divides by P again, so the
gradient is that of the single-process mean whatever the tokens per process. The auxiliary routing
losses use each process's own tokens (local balance statistics, as in Switch Transformer and most MoE
code) and are averaged over processes; with them the two runs differ slightly.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import secrets
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import (
    DeepSpeedPlugin,
    DistributedDataParallelKwargs,
    DistributedType,
    GradientAccumulationPlugin,
    InitProcessGroupKwargs,
    ProjectConfiguration,
)
from omegaconf import DictConfig, OmegaConf

from mole.run_dir import config_differences
from mole.utils.errors import MoleConfigError

log = logging.getLogger(__name__)

MIXED_PRECISION = ("no", "bf16", "fp16")
OFFLOAD_DEVICES = ("none", "cpu", "nvme")
DEEPSPEED_KEYS = {
    "zero_stage": 2,
    "offload_optimizer_device": "none",
    "offload_optimizer_nvme_path": None,
    "offload_param_device": "none",
    "offload_param_nvme_path": None,
    "zero3_init_flag": False,
    "zero3_save_16bit_model": False,
}


@dataclass
class DistributedArgs:
    """The ``distributed`` config node (see ``conf/distributed/single.yaml``)."""

    name: str = "single"
    num_processes: int = 1
    cpu: bool = False
    backend: str | None = None
    main_process_port: int | None = None
    # several machines: each runs the same mole-train command with its own machine_rank (docs/distributed.md)
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str | None = None  # the address of machine 0, which every machine can reach
    rdzv_backend: str = "static"  # torchrun's rendezvous: static (fixed ranks) or c10d
    # DDP: let parameters that got no gradient this step pass (threshold routers' thresholds, experts a
    # sparse router chose for no token); costs one graph traversal per step
    find_unused_parameters: bool = True
    deepspeed: dict[str, Any] | None = field(default=None)

    def __post_init__(self) -> None:
        def bad(key: str, expected: str, value: Any = None) -> MoleConfigError:
            got = getattr(self, key) if value is None else value
            return MoleConfigError(f"distributed.{key} must be {expected}, got {got!r}")

        if not (isinstance(self.num_processes, int) and not isinstance(self.num_processes, bool) and self.num_processes >= 1):
            raise bad("num_processes", "a positive integer")
        if not isinstance(self.cpu, bool):
            raise bad("cpu", "true or false")
        if not isinstance(self.find_unused_parameters, bool):
            raise bad("find_unused_parameters", "true or false")
        if self.backend not in (None, "gloo", "nccl", "mpi"):
            raise bad("backend", "null, gloo, nccl or mpi")
        if self.main_process_port is not None and not (isinstance(self.main_process_port, int) and 0 < self.main_process_port < 65536):
            raise bad("main_process_port", "null or a port number")
        if not (isinstance(self.num_machines, int) and not isinstance(self.num_machines, bool) and self.num_machines >= 1):
            raise bad("num_machines", "a positive integer")
        if not (isinstance(self.machine_rank, int) and not isinstance(self.machine_rank, bool)
                and 0 <= self.machine_rank < self.num_machines):
            raise bad("machine_rank", f"an integer in [0, {self.num_machines}) (distributed.num_machines={self.num_machines})")
        if self.num_machines > 1 and not (isinstance(self.main_process_ip, str) and self.main_process_ip.strip()):
            raise bad("main_process_ip", f"the address of machine 0 with distributed.num_machines={self.num_machines}")
        if self.num_machines > 1 and self.main_process_port is None:
            raise bad("main_process_port", f"a port number every machine uses with distributed.num_machines={self.num_machines}")
        if self.rdzv_backend not in ("static", "c10d"):
            raise bad("rdzv_backend", "static or c10d")
        if self.deepspeed is not None:
            if not isinstance(self.deepspeed, dict):
                raise bad("deepspeed", "null or a mapping (see conf/distributed/deepspeed_zero2.yaml)")
            unknown = sorted(set(self.deepspeed) - set(DEEPSPEED_KEYS))
            if unknown:
                raise MoleConfigError(f"distributed.deepspeed: unknown keys {unknown}; known keys are {sorted(DEEPSPEED_KEYS)}")
            ds = {**DEEPSPEED_KEYS, **self.deepspeed}
            if ds["zero_stage"] not in (0, 1, 2, 3):
                raise MoleConfigError(f"distributed.deepspeed.zero_stage must be 0, 1, 2 or 3, got {ds['zero_stage']!r}")
            for key in ("offload_optimizer_device", "offload_param_device"):
                if ds[key] not in OFFLOAD_DEVICES:
                    raise MoleConfigError(f"distributed.deepspeed.{key} must be one of {list(OFFLOAD_DEVICES)}, got {ds[key]!r}")
            if ds["zero_stage"] == 3 and not ds["zero3_save_16bit_model"]:
                raise MoleConfigError(
                    "distributed.deepspeed.zero3_save_16bit_model must be true with zero_stage=3: "
                    "the sharded adapter is gathered to be saved"
                )
            if self.cpu:
                raise MoleConfigError("distributed.cpu=true cannot run DeepSpeed (it needs CUDA); use distributed=ddp for CPU processes")
            self.deepspeed = ds

    @classmethod
    def from_config(cls, node: DictConfig | None) -> DistributedArgs:
        values = OmegaConf.to_container(node, resolve=True) if node is not None else {}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise MoleConfigError(f"distributed: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**values)

    @property
    def multi_process(self) -> bool:
        """Whether this run needs ``accelerate launch`` (several processes or machines, or DeepSpeed)."""
        return self.num_processes > 1 or self.num_machines > 1 or self.deepspeed is not None

    @property
    def world_size(self) -> int:
        """Processes over all machines."""
        return self.num_processes * self.num_machines


def launched() -> bool:
    """Whether this process was started by ``accelerate launch`` / torchrun (it is then one rank of a run)."""
    return "LOCAL_RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def use_cpu(dist: DistributedArgs) -> bool:
    return dist.cpu or not torch.cuda.is_available()


def check_precision(mixed_precision: str, dist: DistributedArgs) -> None:
    """Refuse fp16 autocast on the CPU (no fp16 kernels or loss scaler there): a clear error, not a downgrade."""
    if mixed_precision == "fp16" and use_cpu(dist):
        raise MoleConfigError(
            "trainer.mixed_precision=fp16 needs a CUDA GPU; on the CPU use trainer.mixed_precision=bf16 or no"
        )


def check_deepspeed(dist: DistributedArgs) -> None:
    """DeepSpeed is an optional extra: one line saying how to get it."""
    if dist.deepspeed is None:
        return
    if importlib.util.find_spec("deepspeed") is None:
        raise MoleConfigError(
            f"distributed={dist.name} needs DeepSpeed, which is not installed: pip install 'mole[deepspeed]' "
            "(or pip install deepspeed), or choose distributed=ddp"
        )
    if not torch.cuda.is_available():
        raise MoleConfigError(f"distributed={dist.name}: DeepSpeed needs a CUDA GPU; on the CPU use distributed=ddp distributed.cpu=true")


def _deepspeed_plugin(dist: DistributedArgs, grad_accum: int, max_grad_norm: float):
    ds = dist.deepspeed or {}
    return DeepSpeedPlugin(
        zero_stage=int(ds["zero_stage"]),
        gradient_accumulation_steps=grad_accum,
        gradient_clipping=max_grad_norm if max_grad_norm > 0 else None,
        offload_optimizer_device=ds["offload_optimizer_device"],
        offload_param_device=ds["offload_param_device"],
        offload_optimizer_nvme_path=ds["offload_optimizer_nvme_path"],
        offload_param_nvme_path=ds["offload_param_nvme_path"],
        zero3_init_flag=bool(ds["zero3_init_flag"]),
        zero3_save_16bit_model=bool(ds["zero3_save_16bit_model"]),
    )


def build_accelerator(args, dist: DistributedArgs, run_dir: Path):
    """The run's :class:`accelerate.Accelerator`.

    Args:
        args: :class:`mole.training.TrainArgs` (``mixed_precision``, ``grad_accum``, ``log_with``).
        dist: the ``distributed`` settings.
        run_dir: the run directory (trackers write under it).
    """
    check_precision(args.mixed_precision, dist)
    check_deepspeed(dist)
    if not launched():
        # One process: Accelerate's state is a process-wide singleton, so a second run in the same
        # process (tests, notebooks) with another precision or device would be refused; start afresh.
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    handlers = [InitProcessGroupKwargs(backend=dist.backend)] if dist.backend else []
    handlers.append(DistributedDataParallelKwargs(find_unused_parameters=dist.find_unused_parameters))
    return Accelerator(
        mixed_precision=args.mixed_precision,
        cpu=dist.cpu,
        deepspeed_plugin=_deepspeed_plugin(dist, args.grad_accum, args.max_grad_norm) if dist.deepspeed else None,
        # accumulate() syncs every grad_accum-th micro-batch, counted from the Accelerator's start (a run, or its
        # resumption, starts at an optimizer step's first micro-batch); not at the end of the data loader: the
        # loop's steps run across epochs (sync_with_dataloader=False)
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=args.grad_accum, sync_with_dataloader=False),
        log_with=list(args.log_with) or None,
        # the schedule counts optimizer steps already: one scheduler.step() per step, whatever the processes
        step_scheduler_with_optimizer=False,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(Path(run_dir) / "tb")),
        kwargs_handlers=handlers,
    )


def is_deepspeed(accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


# ---------------------------------------------------------------------------------------------------
# the training loop's helpers


def lm_normalizer(accelerator, labels: torch.Tensor) -> torch.Tensor | None:
    """Tokens per process of the global micro-batch, ``(global response tokens) / P``; ``None`` with one process.

    Dividing each process's token-sum loss by it makes DDP's averaged gradient the gradient of the
    global batch's token mean (see the module docstring). One all-reduce of a scalar.
    """
    if accelerator.num_processes == 1:
        return None
    local = (labels[:, 1:] != -100).sum().to(torch.float32)  # response tokens on this process
    total = accelerator.reduce(local.reshape(1), reduction="sum")  # (1,)
    return (total / accelerator.num_processes).clamp_min(1.0).reshape(())


@contextlib.contextmanager
def grad_sync(accelerator, model, last: bool):
    """The context of one micro-batch's forward and backward: Accelerate's ``accumulate``. Under DDP,
    gradients are all-reduced only on the ``last`` micro-batch before the optimizer step (``no_sync`` on the
    others); under DeepSpeed the engine steps only there (Accelerate hands it ``sync_gradients``); one
    process has nothing to sync. The Accelerator counts the micro-batches itself
    (:func:`build_accelerator`); a count that disagrees with the loop's ``last`` is an error, not a
    silently misplaced optimizer step."""
    with accelerator.accumulate(model):
        if accelerator.sync_gradients != last:
            raise RuntimeError(f"gradient accumulation out of step: Accelerate syncs={accelerator.sync_gradients}, but "
                               f"this is {'' if last else 'not '}the step's last micro-batch")
        yield


def backward(accelerator, loss: torch.Tensor, grad_accum: int) -> None:
    """Backward one micro-batch of ``grad_accum`` (inside :func:`grad_sync`).

    ``accelerator.backward`` scales plain and DDP runs' micro-batches by ``1 / grad_accum`` (the Accelerator's
    ``gradient_accumulation_steps``) so the accumulated gradient is their mean; DeepSpeed scales by its own
    ``gradient_accumulation_steps`` (set to ``grad_accum``) and steps its engine at the boundary that
    :func:`grad_sync` set.
    """
    if accelerator.gradient_accumulation_steps != grad_accum:
        raise RuntimeError(f"the Accelerator accumulates {accelerator.gradient_accumulation_steps} micro-batches, "
                           f"the loop {grad_accum} (build it with mole.training.distributed.build_accelerator)")
    accelerator.backward(loss)


def reduce_mean(accelerator, values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Scalar tensors averaged over processes, as floats: one collective and one host sync for them all."""
    keys = list(values)
    stacked = torch.stack([values[k].detach().float().reshape(()) for k in keys])  # (K,)
    if accelerator.num_processes > 1:
        stacked = accelerator.reduce(stacked, reduction="mean")
    return dict(zip(keys, stacked.tolist(), strict=True))


# ---------------------------------------------------------------------------------------------------
# start-up checks of a run over several machines

SHARED_MARKER = ".mole-shared-check-"
# seconds the other machines wait for machine 0's marker file; a shared filesystem whose clients cache
# directory entries (NFS's attribute cache) can need longer than the default
SHARED_TIMEOUT_ENV = "MOLE_SHARED_DIR_TIMEOUT_S"
SHARED_TIMEOUT_S = 60.0


def release_process_group() -> None:
    """Tear down this process's process group, if one is up. A run that stops with an error after the
    processes met would otherwise leave the group's threads running into interpreter shutdown, where
    their destruction can abort the process (SIGABRT) instead of letting it exit with its status."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def machine_count() -> int:
    """Machines of a launched run: ``WORLD_SIZE / LOCAL_WORLD_SIZE`` (1 outside one)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return max(1, world // max(local, 1))


def _gather_text(accelerator, text: str) -> list[str]:
    """Every process's ``text``, gathered as bytes in a tensor (nothing is pickled)."""
    data = torch.tensor(list(text.encode()), dtype=torch.uint8, device=accelerator.device)
    lengths = accelerator.gather(torch.tensor([data.numel()], dtype=torch.int64, device=accelerator.device)).tolist()
    padded = torch.zeros(max(lengths), dtype=torch.uint8, device=accelerator.device)
    padded[: data.numel()] = data
    rows = accelerator.gather(padded.reshape(1, -1)).cpu()  # (P, max length)
    return [bytes(rows[i, :n].tolist()).decode() for i, n in enumerate(lengths)]


def check_same_config(accelerator, cfg: DictConfig) -> None:
    """Every process must have the same resolved config (``distributed.machine_rank`` aside): each
    machine composes its own from its command line, and a machine started with another setting would
    train something else. One line naming the differing keys otherwise."""
    if accelerator.num_processes == 1:
        return

    mine = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    if "distributed" in mine:
        mine.distributed.machine_rank = 0
    text = OmegaConf.to_yaml(mine)
    digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "big")  # fits an int64
    digests = accelerator.gather(torch.tensor([digest], dtype=torch.int64, device=accelerator.device)).tolist()
    if len(set(digests)) == 1:
        return
    texts = _gather_text(accelerator, text)  # only on a mismatch: which keys differ
    reference = OmegaConf.create(texts[0])
    per_machine = max(1, accelerator.num_processes // machine_count())
    diffs = {}
    for rank, other in enumerate(texts):
        keys = config_differences(reference, OmegaConf.create(other))
        if keys:
            diffs.setdefault(rank // per_machine, keys)
    machine, keys = next(iter(diffs.items()))
    raise MoleConfigError(
        f"distributed: the machines were started with different configs: machine {machine} differs from machine 0 "
        f"at {', '.join(keys[:6])}; run the same mole-train command on every machine, changing only "
        "distributed.machine_rank"
    )


def shared_dir_timeout() -> float:
    """The marker wait of :func:`check_shared_run_dir`: ``$MOLE_SHARED_DIR_TIMEOUT_S`` seconds, or 60."""
    raw = os.environ.get(SHARED_TIMEOUT_ENV)
    if raw is None or not raw.strip():
        return SHARED_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise MoleConfigError(f"{SHARED_TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}")
    return value


def check_shared_run_dir(accelerator, run_dir: Path, timeout_s: float | None = None) -> None:
    """With several machines, the run directory must be one every machine sees: process 0 writes a marker
    file there, and the first process of every other machine waits up to ``timeout_s`` (default
    :func:`shared_dir_timeout`) for it. Every process raises the same one-line error when one did not see it;
    the marker is removed either way."""
    machines = machine_count()
    if machines == 1 or accelerator.num_processes == 1:
        return
    timeout_s = shared_dir_timeout() if timeout_s is None else timeout_s

    token = torch.tensor([secrets.randbits(62) if accelerator.is_main_process else 0], dtype=torch.int64,
                         device=accelerator.device)
    tdist.broadcast(token, src=0)
    marker = Path(run_dir) / f"{SHARED_MARKER}{int(token.item()):x}"
    if accelerator.is_main_process:
        marker.write_text(str(int(token.item())))
    seen = True
    if accelerator.is_local_main_process and not accelerator.is_main_process:
        deadline = time.monotonic() + timeout_s
        while not marker.is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        seen = marker.is_file()
    flags = accelerator.gather(torch.tensor([int(seen)], dtype=torch.int64, device=accelerator.device)).tolist()
    if accelerator.is_main_process:
        marker.unlink(missing_ok=True)
    if not all(flags):
        per_machine = max(1, accelerator.num_processes // machines)
        blind = sorted({rank // per_machine for rank, ok in enumerate(flags) if not ok})
        raise MoleConfigError(
            f"hydra.run.dir={str(run_dir)!r} is not on a filesystem every machine sees: machine(s) {blind} did not "
            f"see machine 0's marker file within {timeout_s:g} s; put the run directory on a shared filesystem"
        )
