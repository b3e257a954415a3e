"""Several machines: the config keys, their one-line errors, the SLURM task environment, and two "machines"
on the loopback address (one CPU process each, gloo) against one process with the same global batch."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
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
from mole.recipes.train import run_train
from mole.training import checkpoint as ckpt
from mole.training.args import TrainArgs
from mole.training.distributed import DistributedArgs
from mole.training.launch import free_port, launch_command
from mole.utils.errors import MoleConfigError
from mole.utils.slurm import slurm_task

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


def _succeed(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        code, err = _finish(proc)
        assert code == 0, err[-3000:]


def _slurm_vars(rank: int, tasks: int = 2, nodes: int = 2) -> dict[str, str]:
    """The variables srun sets for task ``rank`` of a job with ``tasks`` tasks on ``nodes`` nodes (all on this host)."""
    per_node = tasks // nodes
    return {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": str(tasks), "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank % per_node), "SLURM_NODEID": str(rank // per_node),
            "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_NTASKS_PER_NODE": f"{per_node}(x{nodes})",
            "SLURM_JOB_NODELIST": "localhost"}


def _slurm_env(rank: int, tasks: int = 2, nodes: int = 2, **extra: str) -> dict[str, str]:
    return {**ENV, **_slurm_vars(rank, tasks, nodes), **extra}


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


def test_every_machine_names_the_same_default_run_directory():
    """The default run directory comes from the overrides; those that differ between the machines of one run
    (machine_rank) or between its attempts (the rendezvous port) do not change it."""
    from hydra import compose, initialize_config_dir

    from mole import CONF_DIR

    dirs = []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for rank, port in ((0, 29500), (1, 29500), (0, 29612)):
            cfg = compose("train", overrides=[*TINY, "distributed=ddp", "distributed.num_machines=2",
                                              f"distributed.machine_rank={rank}", "distributed.main_process_ip=10.0.0.1",
                                              f"distributed.main_process_port={port}"], return_hydra_config=True)
            dirs.append(cfg.hydra.run.dir)
        other = compose("train", overrides=[*TINY, "distributed=ddp", "distributed.num_machines=3"],
                        return_hydra_config=True).hydra.run.dir
    assert dirs[0] == dirs[1] == dirs[2] and "num_machines=2" in dirs[0] and "machine_rank" not in dirs[0]
    assert other != dirs[0]


def test_shared_dir_timeout_from_the_environment(monkeypatch):
    from mole.training.distributed import SHARED_TIMEOUT_ENV, shared_dir_timeout

    monkeypatch.delenv(SHARED_TIMEOUT_ENV, raising=False)
    assert shared_dir_timeout() == 60.0
    monkeypatch.setenv(SHARED_TIMEOUT_ENV, "2.5")
    assert shared_dir_timeout() == 2.5
    for bad in ("0", "-1", "soon", "inf"):
        monkeypatch.setenv(SHARED_TIMEOUT_ENV, bad)
        with pytest.raises(MoleConfigError, match=f"{SHARED_TIMEOUT_ENV} must be a positive number of seconds"):
            shared_dir_timeout()


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


def _print_curves(title: str, runs: dict[str, dict]) -> None:
    """The loss curves side by side (``pytest -s`` shows them; docs/distributed.md quotes them)."""
    print(f"\n{title}\nstep | " + " | ".join(runs))
    for i, row in enumerate(next(iter(runs.values()))["train_loss"]):
        print(f"{row['step']} | " + " | ".join(f"{m['train_loss'][i]['loss']:.6f}" for m in runs.values()))
    for i, row in enumerate(next(iter(runs.values())).get("val_loss") or []):
        print(f"val {row['step']} | " + " | ".join(f"{m['val_loss'][i]['loss']:.6f}" for m in runs.values()))


@pytest.mark.slow
@pytest.mark.timing
def test_two_machines_on_loopback_match_one_process_write_once_and_resume_after_sigkill(tmp_path, capsys):
    """Machine 0 and machine 1 (one CPU process each, gloo over 127.0.0.1) with batch 2 against one process with
    batch 4: the same loss curve; one writer; a SIGKILL of both and a resume end with the same adapter. The
    killed run's checkpoint also resumes exactly on one machine with two processes (as a requeued one-node
    SLURM job), and is refused with one line on one process, whose shards and dropout masks would differ."""
    from mole.cli.train import _single_run

    one = run_train(compose_config([*COMMON, "trainer.batch_size=4"]), tmp_path / "one")

    port, two_dir = free_port(), tmp_path / "two"
    procs = [_start(*COMMON, *_nodes(port), f"distributed.machine_rank={r}", f"hydra.run.dir={two_dir}", cwd=tmp_path)
             for r in (0, 1)]
    _succeed(procs)
    two = json.loads((two_dir / "metrics.json").read_text())
    with capsys.disabled():
        _print_curves("loss: two machines x 1 process (batch 2) against 1 process (batch 4)",
                      {"2 machines x 1 process": two, "1 process": one})
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
    refused_dir, requeued_dir = tmp_path / "refused", tmp_path / "requeued"
    shutil.copytree(run_dir, refused_dir)
    shutil.copytree(run_dir, requeued_dir)

    # on one process with batch 4 (the same global batch, half the processes): one line naming the keys
    kept = {p: p.read_bytes() for p in [refused_dir / "config.yaml", *(refused_dir / "checkpoints").rglob("*")]
            if p.is_file()}
    with pytest.raises(SystemExit) as stop:
        _single_run(compose_config([*COMMON, "trainer.batch_size=4", "distributed=ddp", "distributed.cpu=true",
                                    "distributed.num_processes=1", "trainer.save_every=1", "trainer.resume=true"]),
                    str(refused_dir))
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("mole-train:")]
    assert stop.value.code == 2 and len(lines) == 1, lines
    assert "was written by 2 process(es) in all and this run has 1" in lines[0], lines
    assert "resume with distributed.num_processes x distributed.num_machines = 2" in lines[0], lines
    assert all(p.read_bytes() == data for p, data in kept.items()) and not (refused_dir / "adapter.safetensors").exists()

    # on both machines again (resume=true), and as a requeued SLURM job of one node with two tasks (no resume
    # key: SLURM_RESTART_COUNT says it), at once
    port, slurm_port = free_port(), free_port()
    resumed = [_start(*COMMON, *_nodes(port), "trainer.save_every=1", "trainer.resume=true",
                      f"distributed.machine_rank={r}", f"hydra.run.dir={run_dir}", cwd=tmp_path) for r in (0, 1)]
    resumed += [_start(*COMMON, "trainer.batch_size=2", "distributed=ddp", "distributed.cpu=true",
                       "distributed.num_processes=2", f"distributed.main_process_port={slurm_port}",
                       "trainer.save_every=1", f"hydra.run.dir={requeued_dir}", cwd=tmp_path,
                       env=_slurm_env(r, nodes=1, SLURM_RESTART_COUNT="1")) for r in (0, 1)]
    _succeed(resumed)
    for resumed_dir in (run_dir, requeued_dir):
        assert "trainer.resume: continuing from" in (resumed_dir / "train.log").read_text()
        c = load_file(resumed_dir / "adapter.safetensors")
        assert c.keys() == b.keys() and all(torch.equal(b[k], c[k]) for k in b)
        assert json.loads((resumed_dir / "metrics.json").read_text())["train_loss"] == two["train_loss"]


@pytest.mark.slow
def test_slurm_tasks_train_as_the_processes_of_one_run(tmp_path):
    """Two tasks of a SLURM job, with the variables srun sets (SLURM_PROCID, SLURM_NTASKS, ...): each trains
    as one process; the result equals one process with the same global batch, and task 0 alone writes."""
    one = run_train(compose_config([*COMMON, "trainer.batch_size=4"]), tmp_path / "one")
    port, run_dir = free_port(), tmp_path / "slurm"
    procs = []
    for rank in (0, 1):
        procs.append(_start(*COMMON, "trainer.batch_size=2", "distributed.cpu=true",
                            f"distributed.main_process_port={port}", f"hydra.run.dir={run_dir}", cwd=tmp_path,
                            env=_slurm_env(rank)))
    _succeed(procs)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["global_batch_size"] == 4
    assert [r["loss"] for r in metrics["train_loss"]] == pytest.approx([r["loss"] for r in one["train_loss"]], rel=1e-5)
    assert (run_dir / "train.log").read_text().count("trainable params") == 1
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", ".mole-lock", "adapter.safetensors", "config.yaml",
                                                         "metrics.json", "train.log"]


@pytest.mark.slow
def test_a_run_directory_machine_1_does_not_see_stops_the_run_with_one_line(tmp_path):
    """Machine 1 looks for machine 0's marker file in a directory that is not machine 0's (as on a filesystem the
    machines do not share): both stop with one line naming hydra.run.dir, exit 2, and leave no marker, config,
    adapter or checkpoint behind."""
    port, dirs = free_port(), [tmp_path / "machine0" / "run", tmp_path / "machine1" / "run"]
    procs = [_start(*COMMON, "trainer.batch_size=2", "trainer.save_every=1", "distributed.cpu=true",
                    f"distributed.main_process_port={port}", f"hydra.run.dir={dirs[rank]}", cwd=tmp_path,
                    env=_slurm_env(rank, MOLE_SHARED_DIR_TIMEOUT_S="2")) for rank in (0, 1)]
    for rank, proc in enumerate(procs):  # each machine names the directory it was given
        code, err = _finish(proc, 300)
        assert code == 2 and "Traceback" not in err, err[-3000:]
        assert [ln for ln in err.splitlines() if ln.startswith("mole-train:")] == [
            f"mole-train: error: hydra.run.dir={str(dirs[rank])!r} is not on a filesystem every machine sees: "
            "machine(s) [1] did not see machine 0's marker file within 2 s; put the run directory on a shared "
            "filesystem"], err[-3000:]
    for run_dir in dirs:
        left = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
        assert not [name for name in left if name.startswith(".mole-shared-check-")], left
        assert not {"config.yaml", "adapter.safetensors", "checkpoints"} & set(left), left
    metrics = json.loads((dirs[0] / "metrics.json").read_text())  # machine 0's failure record, whole
    assert metrics["failed"] and "is not on a filesystem every machine sees" in metrics["error"]
    assert not (dirs[1] / "metrics.json").exists()


def test_slurm_launcher_takes_several_nodes_and_requeues(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    from mole import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=mole_slurm", "hydra.launcher.nodes=2",
                                                           "hydra.mode=MULTIRUN",  # what -m adds
                                          "hydra.launcher.tasks_per_node=4", "hydra.launcher.gpus_per_node=4"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert launcher.max_num_timeout >= 1 and launcher.signal_delay_s > 0  # requeue after a time-out, with a checkpoint


@pytest.fixture
def _root_logging():
    """Hydra's ``run_job`` configures the root logger (console, ``train.log``): put the test's back afterwards."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


def _slurm_job_task(tmp_path: Path, monkeypatch, rank: int) -> tuple[Path, Path, list]:
    """One task of a two-task job of ``mole-train -m hydra/launcher=mole_slurm``, as submitit runs it on a node:
    the launcher's ``__call__`` (Hydra's ``run_job``, then the job function) with the variables srun sets for the
    task. Training itself is replaced by a stand-in that records the call. Returns the job's run directory, the
    sweep's job records and the calls."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import initialize_config_dir
    from hydra._internal.callbacks import Callbacks
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.plugins import Plugins
    from hydra.core.singleton import Singleton
    from hydra.types import HydraContext, RunMode

    from mole import CONF_DIR
    from mole.cli import sweep
    from mole.cli import train as train_cli
    from mole.recipes import train as train_recipe

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "TORCHELASTIC_RUN_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.setenv(key, "")  # recorded, so that what the task sets when it joins the run is undone afterwards
        monkeypatch.delenv(key)
    monkeypatch.setenv(sweep.SWEEP_ENV, "sweep0")
    for key, value in {**_slurm_vars(rank), "SUBMITIT_EXECUTOR": "slurm"}.items():  # submitit's sbatch script sets it
        monkeypatch.setenv(key, value)
    calls = []
    monkeypatch.setattr(train_recipe, "run_train",
                        lambda cfg, run_dir: (logging.getLogger("mole.recipes.train").info("training"),  # opens train.log
                                              calls.append((str(run_dir), os.environ.get("RANK")))))
    sweep_dir = tmp_path / "sweep"
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        hydra_app = GlobalHydra.instance().hydra
        cfg = hydra_app.compose_config("train", overrides=[*COMMON, "hydra/launcher=mole_slurm", "hydra.launcher.nodes=2",
                                                           "hydra.mode=MULTIRUN",  # what -m adds
                                                           f"hydra.sweep.dir={sweep_dir}"],
                                       run_mode=RunMode.MULTIRUN, with_log_configuration=False)
        context = HydraContext(config_loader=hydra_app.config_loader, callbacks=Callbacks(cfg))
        launcher = Plugins.instance().instantiate_launcher(hydra_context=context, config=cfg,
                                                           task_function=train_cli._app.__wrapped__)
        result = launcher(["seed=7"], "hydra.sweep.dir", 0, "job_id_for_0", Singleton.get_state())
    assert result.return_value is None, result.return_value  # the job function raised nothing
    return sweep_dir / "seed=7", sweep_dir / sweep.MANIFEST_DIR / "sweep0", calls


def test_slurm_sweep_task_other_than_task_0_writes_nothing(tmp_path, monkeypatch, _root_logging):
    """Under ``-m`` every task of a multi-task job runs Hydra's run_job and the job function: task 1 trains as
    rank 1 but leaves no ``.hydra/``, log file or sweep record; task 0, in the same job, writes them."""
    run_dir, records, calls = _slurm_job_task(tmp_path / "one", monkeypatch, rank=1)
    assert calls == [(str(run_dir), "1")]
    assert not (run_dir / ".hydra").exists() and not (run_dir / "train.log").exists()
    assert not records.exists()
    assert not run_dir.exists() or not any(run_dir.iterdir())

    run_dir, records, calls = _slurm_job_task(tmp_path / "zero", monkeypatch, rank=0)
    assert calls == [(str(run_dir), "0")]
    assert sorted(p.name for p in (run_dir / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    assert (run_dir / "train.log").is_file()
    assert [p.name for p in records.iterdir()] == ["0.json"]


@pytest.mark.slow
@pytest.mark.timing
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


# ---- DeepSpeed on two machines (GPU only) ----


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                    reason="DeepSpeed is not installed (pip install 'mole[deepspeed]')")
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="two machines on one host need a GPU each")
@pytest.mark.parametrize("stage", ["deepspeed_zero2", "deepspeed_zero3"])
def test_deepspeed_on_two_machines_on_loopback_matches_one_process(stage, tmp_path):
    """ZeRO-2/3 over two "machines" on 127.0.0.1, one GPU each (NCCL): the loss curve of one process with the
    same global batch, and one adapter."""
    one = run_train(compose_config([*COMMON, "trainer.batch_size=4"]), tmp_path / "one")
    port, run_dir = free_port(), tmp_path / stage
    nodes = [arg for arg in _nodes(port) if arg not in ("distributed=ddp", "distributed.cpu=true")]
    procs = [_start(*COMMON, *nodes, f"distributed={stage}", f"distributed.machine_rank={r}", f"hydra.run.dir={run_dir}",
                    cwd=tmp_path, env={**ENV, "CUDA_VISIBLE_DEVICES": str(r)}) for r in (0, 1)]
    _succeed(procs)
    two = json.loads((run_dir / "metrics.json").read_text())
    assert two["num_processes"] == 2 and two["global_batch_size"] == 4
    assert [r["loss"] for r in two["train_loss"]] == pytest.approx([r["loss"] for r in one["train_loss"]], rel=1e-4)
    assert (run_dir / "train.log").read_text().count("trainable params") == 1
    assert load_file(run_dir / "adapter.safetensors")
