"""``mole-train``'s side of a multi-process run: compose once, write the config, ``accelerate launch`` the workers.

When ``distributed.num_processes > 1`` or ``distributed.deepspeed`` is set, and this process is not
already one rank of a launched run, :func:`launch`:

1. validates the cheap things (trainer keys, precision vs device, DeepSpeed and tracker packages, the
   data files), so a mistake ends in one line before any process starts;
2. writes the resolved config to ``RUN_DIR/config.yaml`` (secrets redacted; their values reach the
   workers through the environment variable ``MOLE_SECRETS``, never a file);
3. runs ``accelerate launch --num_processes N ... -m mole.cli.worker RUN_DIR`` and waits. Every
   worker reads ``RUN_DIR/config.yaml`` and calls :func:`mole.pipeline.run_train`; only rank 0 writes.

CPU processes (``distributed.cpu=true`` or no GPU) are started through the same torchrun-based launcher
with ``ACCELERATE_USE_CPU=true``; they talk over gloo.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import DictConfig

from mole.training.args import TrainArgs
from mole.training.distributed import DistributedArgs, check_deepspeed, check_precision, launched, use_cpu
from mole.utils.errors import MoleConfigError

log = logging.getLogger(__name__)

SECRETS_ENV = "MOLE_SECRETS"


class LaunchError(RuntimeError):
    """The launched processes failed; their own messages are above (and in ``RUN_DIR/train.log``)."""


def needs_launch(cfg: DictConfig) -> bool:
    """Whether ``mole-train`` should start worker processes instead of training in this one."""
    return DistributedArgs.from_config(cfg.get("distributed")).multi_process and not launched()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_command(dist: DistributedArgs, args: TrainArgs, run_dir: Path, port: int) -> list[str]:
    """The ``accelerate launch`` command line for the workers."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--num_processes", str(dist.num_processes),
        "--num_machines", "1",
        "--mixed_precision", args.mixed_precision,
        "--dynamo_backend", "no",
        "--main_process_port", str(port),
    ]
    if dist.deepspeed is not None:
        ds = dist.deepspeed
        cmd += [
            "--use_deepspeed",
            "--zero_stage", str(ds["zero_stage"]),
            "--gradient_accumulation_steps", str(args.grad_accum),
            "--gradient_clipping", str(args.max_grad_norm),
            "--offload_optimizer_device", ds["offload_optimizer_device"],
            "--offload_param_device", ds["offload_param_device"],
            "--zero3_init_flag", str(bool(ds["zero3_init_flag"])).lower(),
            "--zero3_save_16bit_model", str(bool(ds["zero3_save_16bit_model"])).lower(),
        ]
    else:
        cmd += ["--multi_gpu"]  # the torchrun launcher; CPU processes via ACCELERATE_USE_CPU
    return [*cmd, "-m", "mole.cli.worker", str(run_dir)]


def launch(cfg: DictConfig, run_dir: str | Path) -> None:
    """Start the run's processes with ``accelerate launch`` and wait for them (see the module docstring)."""
    from mole.data import load_datasets
    from mole.pipeline import CONFIG_FILE, build_aux_losses, is_finished
    from mole.training.tracking import check_trackers
    from mole.utils.secrets import write_config

    run_dir = Path(run_dir).resolve()
    args = TrainArgs.from_config(cfg.trainer)
    dist = DistributedArgs.from_config(cfg.get("distributed"))
    check_precision(args.mixed_precision, dist)
    check_deepspeed(dist)
    check_trackers(args.log_with)
    build_aux_losses(cfg)
    load_datasets(cfg.data, seed=cfg.seed)  # a missing data file: one line here, not one per process
    if is_finished(run_dir) and not cfg.get("force", False):
        log.info("%s already holds a finished run; skipping (force=true to run it again)", run_dir)
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    secrets = write_config(cfg, run_dir / CONFIG_FILE)

    env = dict(os.environ)
    if secrets:
        env[SECRETS_ENV] = json.dumps(secrets)
    if use_cpu(dist):
        env["ACCELERATE_USE_CPU"] = "true"
    port = dist.main_process_port or free_port()
    cmd = launch_command(dist, args, run_dir, port)
    log.info("starting %d processes (global batch %d = %d x %d x %d): %s", dist.num_processes,
             args.batch_size * dist.num_processes * args.grad_accum, args.batch_size, dist.num_processes,
             args.grad_accum, " ".join(cmd[1:]))
    # flush our own log file before the workers append to it
    for handler in logging.getLogger().handlers:
        handler.flush()
    started = time.time()
    returncode = run_workers(cmd, env)
    interrupted = _interrupted(run_dir, since=started)
    if interrupted is not None:
        raise interrupted
    if returncode != 0:
        raise LaunchError(
            f"the {dist.num_processes}-process run exited with status {returncode} (its messages are above "
            f"and in {run_dir / 'train.log'})"
        )


def run_workers(cmd: list[str], env: dict[str, str]) -> int:
    """Run ``accelerate launch`` and wait; SIGTERM and SIGINT received meanwhile go to the workers.

    The launcher runs in its own session, so a Ctrl-C in the terminal reaches only this process, which
    passes it to the training processes themselves (not to torchrun's agent, which would end them after
    30 s): each stops at its next step boundary with a checkpoint (:mod:`mole.training.signals`) and
    exits 0. A second signal is passed on too (the workers then stop at once) and ends this process.
    """
    import signal

    import psutil

    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    received: list[int] = []

    def forward(signum, frame) -> None:
        received.append(signum)
        try:
            targets = psutil.Process(proc.pid).children() or [psutil.Process(proc.pid)]
        except psutil.NoSuchProcess:
            targets = []
        for target in targets:
            try:
                target.send_signal(signum)
            except psutil.NoSuchProcess:
                pass
        if len(received) > 1:
            os._exit(128 + signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:  # a handler of the embedding program; keep waiting for the workers
                continue
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _interrupted(run_dir: Path, since: float):
    """The :class:`~mole.training.signals.RunInterrupted` the workers recorded in ``metrics.json``, if any."""
    import signal

    from mole.pipeline import METRICS_FILE
    from mole.training.signals import RunInterrupted

    path = run_dir / METRICS_FILE
    try:
        if path.stat().st_mtime < since - 1:  # an earlier attempt's record
            return None
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not (isinstance(metrics, dict) and metrics.get("interrupted")):
        return None
    signum = getattr(signal, str(metrics.get("signal")), signal.SIGTERM)
    return RunInterrupted(int(metrics.get("steps", 0)), int(signum))


def read_secrets() -> dict:
    """The redacted config values a launcher passed to its workers (empty outside a launched run)."""
    raw = os.environ.get(SECRETS_ENV)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        raise MoleConfigError(f"{SECRETS_ENV} is not valid JSON") from None
    return data if isinstance(data, dict) else {}
