"""``mole-train``'s side of a multi-process run: compose once, write the config, ``accelerate launch`` the workers.

When ``distributed.num_processes > 1`` or ``distributed.deepspeed`` is set, and this process is not
already one rank of a launched run, :func:`launch`:

1. validates the cheap things (trainer keys, precision vs device, DeepSpeed and tracker packages, the
   data files), so a mistake ends in one line before any process starts;
2. writes the resolved config to ``RUN_DIR/config.yaml`` (secrets redacted; their values reach the
   workers through the environment variable ``MOLE_SECRETS``, never a file);
3. runs ``accelerate launch --num_processes N ... -m mole.cli.worker RUN_DIR`` and waits. Every
   worker reads ``RUN_DIR/config.yaml`` and calls :func:`mole.recipes.train.run_train`; only rank 0 writes.

CPU processes (``distributed.cpu=true`` or no GPU) are started through the same torchrun-based launcher
with ``ACCELERATE_USE_CPU=true``; they talk over gloo.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from omegaconf import DictConfig

from mole.build import build_aux_losses
from mole.data import load_datasets
from mole.run_dir import CONFIG_FILE, METRICS_FILE, finished_run, handed_down_env, is_finished, lock_run
from mole.training.args import TrainArgs
from mole.training.distributed import DistributedArgs, check_deepspeed, check_precision, launched, use_cpu
from mole.training.signals import RunInterrupted
from mole.training.tracking import check_trackers
from mole.utils.errors import MoleConfigError
from mole.utils.secrets import write_config

log = logging.getLogger(__name__)

SECRETS_ENV = "MOLE_SECRETS"
PROG = "mole-train"


class LaunchError(RuntimeError):
    """The launched processes failed; their own messages are above (and in ``RUN_DIR/train.log``).
    ``reported``: a worker printed the one-line error already."""

    def __init__(self, message: str, reported: bool = False):
        super().__init__(message)
        self.reported = reported


def needs_launch(cfg: DictConfig) -> bool:
    """Whether ``mole-train`` should start worker processes instead of training in this one."""
    return DistributedArgs.from_config(cfg.get("distributed")).multi_process and not launched()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError:
            return True
    return False


def launch_command(dist: DistributedArgs, args: TrainArgs, run_dir: Path, port: int,
                   config: Path | None = None) -> list[str]:
    """The ``accelerate launch`` command line for the workers (``config``: where they read the config,
    when not ``RUN_DIR/config.yaml``)."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--num_processes", str(dist.world_size),  # Accelerate counts the processes of all machines
        "--num_machines", str(dist.num_machines),
        "--mixed_precision", args.mixed_precision,
        "--dynamo_backend", "no",
        "--main_process_port", str(port),
    ]
    if dist.num_machines > 1:
        cmd += ["--machine_rank", str(dist.machine_rank), "--main_process_ip", str(dist.main_process_ip),
                "--rdzv_backend", dist.rdzv_backend]
        if dist.deepspeed is not None:
            cmd += ["--deepspeed_multinode_launcher", "standard"]  # torchrun on each machine, as for DDP
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
    return [*cmd, "-m", "mole.cli.worker", str(run_dir), *([str(config.parent)] if config is not None else [])]


def launch(cfg: DictConfig, run_dir: str | Path) -> None:
    """Start the run's processes with ``accelerate launch`` and wait for them (see the module docstring)."""
    run_dir = Path(run_dir).resolve()
    args = TrainArgs.from_config(cfg.trainer)
    dist = DistributedArgs.from_config(cfg.get("distributed"))
    check_precision(args.mixed_precision, dist)
    check_deepspeed(dist)
    check_trackers(args.log_with)
    build_aux_losses(cfg)
    load_datasets(cfg.data, seed=cfg.seed)  # a missing data file: one line here, not one per process
    if dist.machine_rank != 0:  # machine 0 alone owns (locks) and writes the run directory

        if is_finished(run_dir) and not cfg.get("force", False):
            log.info("%s already holds a finished run; skipping (force=true to run it again)", run_dir)
            return
        _launch_workers(cfg, run_dir, args, dist, {})
        return
    lock = lock_run(run_dir)  # held until the workers end; they inherit it through the environment
    with lock if lock is not None else contextlib.nullcontext():
        if finished_run(run_dir, cfg) is not None:
            log.info("%s already holds a finished run of this config; skipping (force=true to run it again)", run_dir)
            return
        _launch_workers(cfg, run_dir, args, dist, handed_down_env(run_dir))


def _launch_workers(cfg: DictConfig, run_dir: Path, args: TrainArgs, dist: DistributedArgs, lock_env: dict) -> None:
    port = dist.main_process_port or free_port()
    if dist.machine_rank == 0 and dist.main_process_port is not None and port_in_use(port):
        raise MoleConfigError(f"distributed.main_process_port={port} is in use on this machine; choose a free port")
    if dist.machine_rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        config_path = None
        secrets = write_config(cfg, run_dir / CONFIG_FILE)
    else:  # machine 0 alone writes the run directory; this machine's config is compared with its config

        config_path = Path(tempfile.mkdtemp(prefix="mole-node-")) / CONFIG_FILE
        secrets = write_config(cfg, config_path)

    env = {**os.environ, **lock_env}
    if secrets:
        env[SECRETS_ENV] = json.dumps(secrets)
    if use_cpu(dist):
        env["ACCELERATE_USE_CPU"] = "true"
    cmd = launch_command(dist, args, run_dir, port, config_path)
    log.info("starting %d processes (global batch %d = %d x %d x %d): %s", dist.num_processes,
             args.batch_size * dist.world_size * args.grad_accum, args.batch_size, dist.world_size,
             args.grad_accum, " ".join(cmd[1:]))
    # flush our own log file before the workers append to it
    for handler in logging.getLogger().handlers:
        handler.flush()
    started = time.time()
    try:
        returncode = run_workers(cmd, env)
    finally:
        if config_path is not None:
            shutil.rmtree(config_path.parent, ignore_errors=True)
    interrupted = _interrupted(run_dir, since=started)
    if interrupted is not None:
        raise interrupted
    if returncode == WORKER_REPORTED:
        raise LaunchError("", reported=True)
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
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stderr=subprocess.PIPE)
    relay = _StderrRelay(proc.stderr)
    relay.start()
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
                code = proc.wait()
                relay.join()
                return WORKER_REPORTED if code != 0 and relay.reported else code
            except KeyboardInterrupt:  # a handler of the embedding program; keep waiting for the workers
                continue
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


WORKER_REPORTED = -1000  # run_workers: the workers failed and printed their one-line error


class _StderrRelay(threading.Thread):
    """Copy the launched processes' stderr to ours as it comes, until a worker prints its one-line error
    (``mole-train: error: ...``): the report torchrun's agent prints after a worker's non-zero exit is
    dropped, so a user error stays one line."""

    def __init__(self, stream):
        super().__init__(daemon=True)
        self.stream, self.reported = stream, False

    def run(self) -> None:
        pending = ""
        out = sys.stderr
        while True:
            chunk = os.read(self.stream.fileno(), 65536)
            pending += chunk.decode(errors="replace")
            pieces = re.split(r"(?<=[\r\n])", pending)  # keep each piece's line end (tqdm redraws with \r)
            pending = "" if not chunk else pieces.pop()
            for piece in pieces:
                if not self.reported:
                    out.write(piece)
                    self.reported = piece.startswith(f"{PROG}: error:")
            out.flush()
            if not chunk:
                return


def _interrupted(run_dir: Path, since: float):
    """The :class:`~mole.training.signals.RunInterrupted` the workers recorded in ``metrics.json``, if any."""
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
