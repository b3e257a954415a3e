"""Multi-process training: the distributed configs, the launcher, and 2 CPU processes vs 1 on tiny_llama."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import TINY
from safetensors.torch import load_file

from mole.config import compose_config
from mole.recipes.train import run_train
from mole.training.args import TrainArgs
from mole.training.distributed import DistributedArgs, check_deepspeed, check_precision
from mole.training.launch import launch_command, needs_launch
from mole.utils.errors import MoleConfigError

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def _train_cli(*overrides: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mole.cli.train", *overrides], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=600)


# ---- configs and the launch decision ----


def test_distributed_options_parse_with_their_documented_values():
    single = DistributedArgs.from_config(compose_config(TINY).distributed)
    assert (single.num_processes, single.deepspeed, single.multi_process) == (1, None, False)
    ddp = DistributedArgs.from_config(compose_config([*TINY, "distributed=ddp"]).distributed)
    assert (ddp.num_processes, ddp.deepspeed, ddp.multi_process) == (2, None, True)
    z2 = DistributedArgs.from_config(compose_config([*TINY, "distributed=deepspeed_zero2"]).distributed)
    z3 = DistributedArgs.from_config(compose_config([*TINY, "distributed=deepspeed_zero3"]).distributed)
    assert z2.deepspeed["zero_stage"] == 2 and z3.deepspeed["zero_stage"] == 3
    assert z3.deepspeed["zero3_save_16bit_model"] is True and z2.deepspeed["offload_optimizer_device"] == "none"


@pytest.mark.parametrize(
    "override, message",
    [
        ("distributed.num_processes=0", "distributed.num_processes must be a positive integer"),
        ("distributed.backend=tcp", "distributed.backend must be null, gloo, nccl or mpi"),
        ("+distributed.gpus=2", r"distributed: unknown keys \['gpus'\]"),
    ],
)
def test_bad_distributed_values_name_the_key(override, message):
    with pytest.raises(MoleConfigError, match=message):
        DistributedArgs.from_config(compose_config([*TINY, "distributed=ddp", override]).distributed)


def test_bad_deepspeed_values_name_the_key():
    with pytest.raises(MoleConfigError, match="distributed.deepspeed.zero_stage must be 0, 1, 2 or 3"):
        DistributedArgs.from_config(compose_config([*TINY, "distributed=deepspeed_zero2", "distributed.deepspeed.zero_stage=4"]).distributed)
    with pytest.raises(MoleConfigError, match="zero3_save_16bit_model must be true with zero_stage=3"):
        DistributedArgs.from_config(compose_config([*TINY, "distributed=deepspeed_zero3", "distributed.deepspeed.zero3_save_16bit_model=false"]).distributed)
    with pytest.raises(MoleConfigError, match="distributed.deepspeed.offload_optimizer_device must be one of"):
        DistributedArgs.from_config(compose_config([*TINY, "distributed=deepspeed_zero3", "distributed.deepspeed.offload_optimizer_device=disk"]).distributed)


def test_launch_only_when_several_processes_and_not_already_launched(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not needs_launch(compose_config(TINY))
    assert not needs_launch(compose_config([*TINY, "distributed=ddp", "distributed.num_processes=1"]))
    assert needs_launch(compose_config([*TINY, "distributed=ddp"]))
    assert needs_launch(compose_config([*TINY, "distributed=deepspeed_zero2", "distributed.num_processes=1"]))
    # a rank of a run started by accelerate launch trains directly
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not needs_launch(compose_config([*TINY, "distributed=ddp"]))


def test_launch_command_lines(tmp_path):
    cfg = compose_config([*TINY, "distributed=ddp", "distributed.num_processes=4", "trainer.mixed_precision=bf16"])
    cmd = launch_command(DistributedArgs.from_config(cfg.distributed), TrainArgs.from_config(cfg.trainer), tmp_path, 29999)
    text = " ".join(cmd)
    assert "accelerate.commands.launch --num_processes 4 --num_machines 1 --mixed_precision bf16" in text
    assert "--main_process_port 29999" in text and "--multi_gpu" in text and "--use_deepspeed" not in text
    assert cmd[-3:] == ["-m", "mole.cli.worker", str(tmp_path)]
    cfg = compose_config([*TINY, "distributed=deepspeed_zero3", "trainer.grad_accum=2",
                          "distributed.deepspeed.offload_optimizer_device=cpu"])
    text = " ".join(launch_command(DistributedArgs.from_config(cfg.distributed), TrainArgs.from_config(cfg.trainer), tmp_path, 1))
    assert "--use_deepspeed --zero_stage 3 --gradient_accumulation_steps 2" in text
    assert "--offload_optimizer_device cpu" in text and "--zero3_save_16bit_model true" in text and "--multi_gpu" not in text


def test_fp16_on_the_cpu_is_refused_with_the_key():
    cpu = DistributedArgs(cpu=True)
    check_precision("bf16", cpu)
    check_precision("no", cpu)
    with pytest.raises(MoleConfigError, match="trainer.mixed_precision=fp16 needs a CUDA GPU"):
        check_precision("fp16", cpu)


@pytest.mark.skipif(HAS_DEEPSPEED, reason="DeepSpeed is installed")
def test_deepspeed_missing_is_a_config_error():
    # the command's one line for it: tests/integration/test_cli_guards.py
    dist = DistributedArgs.from_config(compose_config([*TINY, "distributed=deepspeed_zero2"]).distributed)
    with pytest.raises(MoleConfigError, match=r"distributed=deepspeed_zero2 needs DeepSpeed.*pip install 'mole\[deepspeed\]'"):
        check_deepspeed(dist)


# ---- 2 CPU processes vs 1: the same global batches give the same training ----


@pytest.mark.slow  # three processes start torch: ~30 s alone, a minute on a busy 2-core machine
def test_two_cpu_processes_match_one_process_with_the_same_global_batch(tmp_path):
    """batch 2 x 2 processes (gloo) and batch 4 x 1 process: identical loss curves and adapters.

    lr 1e-2 makes three steps move the adapter far enough that a different data order, a scheduler
    stepping once per process, or per-process token means (instead of the global batch's) would show:
    the last two change the step-2 loss by ~6e-5 relative, above the 1e-5 tolerance used here.
    """
    common = [*TINY, "method=mola", "loss=none", "trainer.max_steps=3", "trainer.lr=1e-2", "trainer.eval_every=0"]
    one = run_train(compose_config([*common, "trainer.batch_size=4"]), tmp_path / "one")

    two_dir = tmp_path / "two"
    proc = _train_cli(*common, "trainer.batch_size=2", "distributed=ddp", "distributed.cpu=true",
                      f"hydra.run.dir={two_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((two_dir / "metrics.json").read_text())

    assert (one["num_processes"], two["num_processes"]) == (1, 2)
    assert one["global_batch_size"] == two["global_batch_size"] == 4
    curve_one = [r["loss"] for r in one["train_loss"]]
    curve_two = [r["loss"] for r in two["train_loss"]]
    assert len(curve_two) == 3 and curve_two[-1] < curve_two[0] - 0.1  # it trained
    assert curve_two == pytest.approx(curve_one, rel=1e-5)
    assert [r["lr"] for r in two["train_loss"]] == [r["lr"] for r in one["train_loss"]]
    assert [v["loss"] for v in two["val_loss"]] == pytest.approx([v["loss"] for v in one["val_loss"]], rel=1e-5)
    a, b = load_file(tmp_path / "one" / "adapter.safetensors"), load_file(two_dir / "adapter.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3  # vs 1.3e-2 with per-process token means
    # only rank 0 wrote, and its log went to the run's train.log next to the launcher's
    log = (two_dir / "train.log").read_text()
    assert log.count("trainable params") == 1 and "starting 2 processes (global batch 4 = 2 x 2 x 1)" in log


# ---- DeepSpeed (GPU only) ----

@pytest.mark.gpu
@pytest.mark.skipif(not HAS_DEEPSPEED, reason="DeepSpeed is not installed (pip install 'mole[deepspeed]')")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="DeepSpeed needs CUDA")
@pytest.mark.parametrize("stage", ["deepspeed_zero2", "deepspeed_zero3"])
def test_deepspeed_matches_plain_training(stage, tmp_path):
    common = [*TINY, "method=mola", "loss=none", "trainer.max_steps=3", "trainer.lr=1e-2", "trainer.eval_every=0",
              "trainer.batch_size=2", "trainer.grad_accum=2"]
    plain = run_train(compose_config(common), tmp_path / "plain")
    run_dir = tmp_path / stage
    proc = _train_cli(*common, f"distributed={stage}", "distributed.num_processes=1", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ds = json.loads((run_dir / "metrics.json").read_text())
    # DeepSpeed's own accumulation (2 micro-batches) must average them as the plain loop does
    assert [r["loss"] for r in ds["train_loss"]] == pytest.approx([r["loss"] for r in plain["train_loss"]], rel=1e-4)
    state = load_file(run_dir / "adapter.safetensors")
    assert state and all(".mole_" in k for k in state)



@pytest.mark.slow
def test_two_processes_train_a_preset_whose_threshold_gets_no_gradient(tmp_path):
    """Sparse MoA's threshold network never receives a gradient (MoA eq. 4 keeps g_i): DDP must allow
    parameters without one (`distributed.find_unused_parameters`, true by default)."""
    run_dir = tmp_path / "run"
    proc = _train_cli(*TINY, "method=moa_sparse", "trainer.batch_size=2", "distributed=ddp", "distributed.cpu=true",
                      f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["finished"] and metrics["num_processes"] == 2 and len(metrics["train_loss"]) == 2
