"""Several machines: the config keys, their one-line errors, the SLURM task environment, and two "machines"
on the loopback address (one CPU process each, gloo) against one process with the same global batch."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import TINY
from safetensors.torch import load_file

from mole.config import compose_config
from mole.pipeline import run_train
from mole.training import checkpoint as ckpt
from mole.training.args import TrainArgs
from mole.training.distributed import DistributedArgs
from mole.training.launch import free_port, launch_command
from mole.training.slurm import slurm_task
from mole.utils.errors import MoleConfigError

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
COMMON = [*TINY, "method=mola", "loss=none", "trainer.max_steps=3", "trainer.lr=1e-2", "trainer.eval_every=0"]


def _nodes(port: int) -> list[str]:
    return ["trainer.batch_size=2", "distributed=ddp", "distributed.cpu=true", "distributed.num_processes=1",
            "distributed.num_machines=2", "distributed.main_process_ip=127.0.0.1", f"distributed.main_process_port={port}"]


def _start(*args: str, cwd: Path, env=None, driver: list[str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *(driver or ["-m", "mole.cli.train"]), *args], cwd=cwd, env=env or ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


# ---- configs (fast) ----


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["distributed.num_machines=2", "distributed.machine_rank=2", "distributed.main_process_ip=10.0.0.1",
          "distributed.main_process_port=29500"], r"distributed.machine_rank must be an integer in \[0, 2\)"),
        (["distributed.machine_rank=-1"], r"distributed.machine_rank must be an integer in \[0, 1\)"),
        (["distributed.num_machines=2", "distributed.main_process_port=29500"],
         "distributed.main_process_ip must be the address of machine 0 with distributed.num_machines=2"),
        (["distributed.num_machines=2", "distributed.main_process_ip=10.0.0.1"],
         "distributed.main_process_port must be a port number every machine uses"),
        (["distributed.num_machines=0"], "distributed.num_machines must be a positive integer"),
        (["distributed.rdzv_backend=etcd"], "distributed.rdzv_backend must be static or c10d"),
    ],
)
def test_bad_machine_settings_name_the_key(overrides, message):
    with pytest.raises(MoleConfigError, match=message):
        DistributedArgs.from_config(compose_config([*TINY, "distributed=ddp", *overrides]).distributed)


@pytest.mark.parametrize("preset", ["ddp", "deepspeed_zero2", "deepspeed_zero3"])
def test_machine_flags_reach_accelerate_launch(preset, tmp_path):
    cfg = compose_config([*TINY, f"distributed={preset}", "distributed.num_processes=4", "distributed.num_machines=2",
                          "distributed.machine_rank=1", "distributed.main_process_ip=10.1.2.3",
                          "distributed.main_process_port=29555"])
    dist = DistributedArgs.from_config(cfg.distributed)
    cmd = launch_command(dist, TrainArgs.from_config(cfg.trainer), tmp_path, 29555, tmp_path / "node" / "config.yaml")
    text = " ".join(cmd)
    assert "--num_processes 8 --num_machines 2" in text  # Accelerate counts the processes of every machine
    assert "--machine_rank 1 --main_process_ip 10.1.2.3 --rdzv_backend static" in text
    assert "--main_process_port 29555" in text
    assert ("--deepspeed_multinode_launcher standard" in text) == preset.startswith("deepspeed")
    assert cmd[-4:] == ["-m", "mole.cli.worker", str(tmp_path), str(tmp_path / "node")]
    one = compose_config([*TINY, f"distributed={preset}"])
    text = " ".join(launch_command(DistributedArgs.from_config(one.distributed), TrainArgs.from_config(one.trainer),
                                   tmp_path, 1))
    assert "--num_machines 1" in text and "--machine_rank" not in text


def test_slurm_task_environment(monkeypatch):
    for key in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS_PER_NODE", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    assert slurm_task() is None
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert slurm_task() is None  # one task: mole-train launches its own processes as on a workstation
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4(x2)")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-08]")
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    task = slurm_task()
    assert (task.rank, task.local_rank, task.world_size, task.local_world_size) == (5, 1, 8, 4)
    assert task.main_address == "gpu07" and task.default_port() == 20000 + 123456 % 20000
    monkeypatch.setenv("LOCAL_RANK", "1")  # a rank of accelerate launch inside a one-task job
    assert slurm_task() is None


# ---- the command line: one line each (slow: each starts mole-train) ----


@pytest.mark.slow
def test_bad_machine_input_is_one_line_each(tmp_path):
    busy = socket.socket()
    busy.bind(("", 0))
    busy.listen()
    port = busy.getsockname()[1]
    cases = [
        (["distributed.machine_rank=2"], "distributed.machine_rank must be an integer in [0, 2)"),
        (["distributed.main_process_ip=null"], "distributed.main_process_ip must be the address of machine 0"),
        ([f"distributed.main_process_port={port}"], f"distributed.main_process_port={port} is in use"),
    ]
    try:
        for extra, message in cases:
            run_dir = tmp_path / f"run{len(extra[0])}"
            proc = _start(*COMMON, *_nodes(free_port()), "distributed.machine_rank=0", *extra,
                          f"hydra.run.dir={run_dir}", cwd=tmp_path)
            code, err = _finish(proc, 300)
            lines = [ln for ln in err.splitlines() if ln.startswith("mole-train:")]
            assert code == 2 and "Traceback" not in err and len(lines) == 1, err[-2000:]
            assert lines[0].startswith("mole-train: error: ") and message in lines[0], lines
            assert not (run_dir / "config.yaml").exists()
    finally:
        busy.close()


@pytest.mark.slow
def test_machines_with_different_configs_stop_with_one_line_naming_the_key(tmp_path):
    port, run_dir = free_port(), tmp_path / "run"
    zero = _start(*COMMON, *_nodes(port), "distributed.machine_rank=0", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    one = _start(*COMMON, *_nodes(port), "distributed.machine_rank=1", "trainer.lr=2e-2", f"hydra.run.dir={run_dir}",
                 cwd=tmp_path)
    for proc in (zero, one):
        code, err = _finish(proc)
        lines = [ln for ln in err.splitlines() if ln.startswith("mole-train:")]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
        assert "machines were started with different configs: machine 1 differs from machine 0 at trainer.lr" in lines[0]
    assert not (run_dir / "adapter.safetensors").exists()


# ---- two machines on the loopback address ----


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a mole-train and every process it started (its workers run in their own session)."""
    parent = psutil.Process(proc.pid)
    for p in [*parent.children(recursive=True), parent]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


# every worker's micro-batch slowed down (through sitecustomize, which every Python process of the run imports),
# so that the kill lands between checkpoints
_SLOW_SITE = (
    "import os\n"
    "if os.environ.get('LOCAL_RANK') is not None:\n"
    "    import time, mole.training.loop as L\n"
    "    real = L.loss_step\n"
    "    def slow(*a, **k):\n"
    "        time.sleep(0.5)\n"
    "        return real(*a, **k)\n"
    "    L.loss_step = slow\n"
)


@pytest.mark.slow
def test_two_machines_on_loopback_match_one_process_write_once_and_resume_after_sigkill(tmp_path):
    """Machine 0 and machine 1 (one CPU process each, gloo over 127.0.0.1) with batch 2 against one process with
    batch 4: the same loss curve; one writer; a SIGKILL of both and a resume end with the same adapter."""
    one = run_train(compose_config([*COMMON, "trainer.batch_size=4"]), tmp_path / "one")

    port, two_dir = free_port(), tmp_path / "two"
    procs = [_start(*COMMON, *_nodes(port), f"distributed.machine_rank={r}", f"hydra.run.dir={two_dir}", cwd=tmp_path)
             for r in (0, 1)]
    for proc in procs:
        code, err = _finish(proc)
        assert code == 0, err[-3000:]
    two = json.loads((two_dir / "metrics.json").read_text())
    assert two["num_processes"] == 2 and two["global_batch_size"] == one["global_batch_size"] == 4
    curve_one, curve_two = [r["loss"] for r in one["train_loss"]], [r["loss"] for r in two["train_loss"]]
    assert len(curve_two) == 3 and curve_two[-1] < curve_two[0] - 0.1
    assert curve_two == pytest.approx(curve_one, rel=1e-5)
    a, b = load_file(tmp_path / "one" / "adapter.safetensors"), load_file(two_dir / "adapter.safetensors")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3
    # one writer: machine 0's launcher and rank 0 log into train.log; machine 1 left no Hydra files or markers
    log = (two_dir / "train.log").read_text()
    assert log.count("trainable params") == 1 and log.count("starting 1 processes") == 1
    assert sorted(p.name for p in two_dir.iterdir()) == [".hydra", ".mole-lock", "adapter.safetensors", "config.yaml",
                                                         "metrics.json", "train.log"]

    # killed mid-run (both machines, every process), then resumed on both: the uninterrupted run's adapter
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_SLOW_SITE)
    slow_env = {**ENV, "PYTHONPATH": os.pathsep.join([str(site), ENV.get("PYTHONPATH", "")])}
    run_dir, port = tmp_path / "killed", free_port()
    args = [*COMMON, *_nodes(port), "trainer.save_every=1", f"hydra.run.dir={run_dir}"]
    procs = [_start(*args, f"distributed.machine_rank={r}", cwd=tmp_path, env=slow_env) for r in (0, 1)]
    deadline = time.monotonic() + 300
    while not ckpt.list_checkpoints(run_dir) and time.monotonic() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    for proc in procs:
        _kill_tree(proc)
        proc.communicate(timeout=60)
    steps = [s for s, _ in ckpt.list_checkpoints(run_dir)]
    assert steps and max(steps) < 3, steps
    assert not (run_dir / "adapter.safetensors").exists()

    port = free_port()
    resumed = [_start(*COMMON, *_nodes(port), "trainer.save_every=1", "trainer.resume=true",
                      f"distributed.machine_rank={r}", f"hydra.run.dir={run_dir}", cwd=tmp_path) for r in (0, 1)]
    for proc in resumed:
        code, err = _finish(proc)
        assert code == 0, err[-3000:]
    assert "trainer.resume: continuing from" in (run_dir / "train.log").read_text()
    c = load_file(run_dir / "adapter.safetensors")
    assert c.keys() == b.keys() and all(torch.equal(b[k], c[k]) for k in b)
    assert json.loads((run_dir / "metrics.json").read_text())["train_loss"] == two["train_loss"]


@pytest.mark.slow
def test_slurm_tasks_train_as_the_processes_of_one_run(tmp_path):
    """Two tasks of a SLURM job, with the variables srun sets (SLURM_PROCID, SLURM_NTASKS, ...): each trains
    as one process; the result equals one process with the same global batch, and task 0 alone writes."""
    one = run_train(compose_config([*COMMON, "trainer.batch_size=4"]), tmp_path / "one")
    port, run_dir = free_port(), tmp_path / "slurm"
    procs = []
    for rank in (0, 1):
        env = {**ENV, "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2", "SLURM_PROCID": str(rank), "SLURM_LOCALID": "0",
               "SLURM_NODEID": str(rank), "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "1(x2)",
               "SLURM_JOB_NODELIST": "localhost"}
        procs.append(_start(*COMMON, "trainer.batch_size=2", "distributed.cpu=true",
                            f"distributed.main_process_port={port}", f"hydra.run.dir={run_dir}", cwd=tmp_path, env=env))
    for proc in procs:
        code, err = _finish(proc)
        assert code == 0, err[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["global_batch_size"] == 4
    assert [r["loss"] for r in metrics["train_loss"]] == pytest.approx([r["loss"] for r in one["train_loss"]], rel=1e-5)
    assert (run_dir / "train.log").read_text().count("trainable params") == 1
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", ".mole-lock", "adapter.safetensors", "config.yaml",
                                                         "metrics.json", "train.log"]


def test_slurm_launcher_takes_several_nodes_and_requeues(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    from mole import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=mole_slurm", "hydra.launcher.nodes=2",
                                          "hydra.launcher.tasks_per_node=4", "hydra.launcher.gpus_per_node=4"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert launcher.max_num_timeout >= 1 and launcher.signal_delay_s > 0  # requeue after a time-out, with a checkpoint


@pytest.mark.slow
def test_sigterm_to_a_multi_process_run_reaches_its_workers(tmp_path):
    """mole-train passes SIGTERM to its training processes: they stop after the same step with a checkpoint,
    and mole-train prints the one line and exits 143; the resumed run finishes."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_SLOW_SITE)
    slow_env = {**ENV, "PYTHONPATH": os.pathsep.join([str(site), ENV.get("PYTHONPATH", "")])}
    run_dir = tmp_path / "run"
    args = [*COMMON, "trainer.max_steps=20", "trainer.batch_size=2", "distributed=ddp", "distributed.cpu=true",
            f"hydra.run.dir={run_dir}"]
    proc = _start(*args, cwd=tmp_path, env=slow_env)
    deadline = time.monotonic() + 300
    log = run_dir / "train.log"
    while time.monotonic() < deadline and proc.poll() is None:
        if log.is_file() and "step 0: val/loss" in log.read_text():
            break
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    code, err = _finish(proc, 300)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert code == 143 and "Traceback" not in err, err[-3000:]
    assert [ln for ln in err.splitlines() if ln.startswith("mole-train:")] == [
        f"mole-train: interrupted at step {metrics['steps']}; resume with trainer.resume=true"]
    assert metrics["interrupted"] and metrics["num_processes"] == 2 and 1 <= metrics["steps"] < 20
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [metrics["steps"]]
    resumed = _start(*args, "trainer.resume=true", cwd=tmp_path)
    code, err = _finish(resumed)
    assert code == 0, err[-3000:]
    done = json.loads((run_dir / "metrics.json").read_text())
    assert done["finished"] and len(done["train_loss"]) == 20
