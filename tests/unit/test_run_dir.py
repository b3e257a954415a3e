"""The run directory (mole/run_dir.py): status, lock, finished-run comparison, checkpoint removal, remote code.

User errors here end as ``tests/integration/test_bad_input.py`` requires: exit status 2, one line
``mole-<command>: error: ...`` naming the directory or key, and nothing already on disk changed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY

from mole import run_dir as rd
from mole.config import compose_config
from mole.utils.errors import MoleConfigError

TRAIN = [*TINY, "trainer.max_steps=0", "data.max_records=12"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (but the lock files) and its bytes."""
    skip = {rd.LOCK_FILE, rd.OWNER_FILE}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in skip}


def _error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if "error:" in ln]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished tiny run (untrained: max_steps=0)."""
    from mole.recipes.train import run_train

    path = tmp_path_factory.mktemp("run_dir") / "finished"
    run_train(compose_config(TRAIN), path)
    return path


# ---- status ----


def test_status_reads_the_record_and_the_lock(tmp_path):
    assert rd.run_status(tmp_path) is None  # nothing recorded
    for status in (rd.FINISHED, rd.FAILED, rd.INTERRUPTED):
        rd.write_json(tmp_path / rd.METRICS_FILE, rd.with_status({"steps": 3}, status))
        record = json.loads((tmp_path / rd.METRICS_FILE).read_text())
        assert rd.run_status(tmp_path) == status and record["finished"] == (status == rd.FINISHED)
        assert record.get(status) is True or status == rd.FINISHED
    # a run that started and was killed without a word
    rd.write_json(tmp_path / rd.METRICS_FILE, rd.with_status({}, rd.RUNNING))
    assert rd.run_status(tmp_path) == rd.INTERRUPTED
    with rd.RunLock(tmp_path):
        assert rd.run_status(tmp_path) == rd.RUNNING and rd.holds_lock(tmp_path)
        assert json.loads((tmp_path / rd.OWNER_FILE).read_text())["pid"] == os.getpid()
    assert not rd.holds_lock(tmp_path) and not (tmp_path / rd.OWNER_FILE).exists()
    with pytest.raises(ValueError, match="status must be one of"):
        rd.with_status({}, "done")


def test_the_lock_of_another_process_is_refused_naming_the_directory_and_pid(tmp_path):
    """A child process holds the lock; this one cannot take it, and learns who holds it."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from mole.run_dir import RunLock; held = RunLock(sys.argv[1]).acquire(); "
         "print('held', flush=True); sys.stdin.read()", str(tmp_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert holder.stdout.readline().strip() == "held"
        assert rd.run_status(tmp_path) == rd.RUNNING and not rd.holds_lock(tmp_path)
        with pytest.raises(rd.RunDirectoryBusy) as err:
            rd.RunLock(tmp_path).acquire()
        assert str(tmp_path) in str(err.value) and f"pid {holder.pid}" in str(err.value)
        # the lock handed down to this process's own workers: only with the holder's pid in the environment
        os.environ[rd.LOCK_ENV] = f"{holder.pid}:{tmp_path}"
        try:
            assert rd.holds_lock(tmp_path) and rd.lock_run(tmp_path) is None
        finally:
            del os.environ[rd.LOCK_ENV]
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    with rd.RunLock(tmp_path):  # the kernel released it with the process
        pass


# ---- a finished directory and a new config ----


def test_finished_run_with_the_same_config_is_skipped(finished):
    cfg = compose_config([*TRAIN, "trainer.save_every=5", "+wandb.api_key=other-secret"])  # changes nothing trained
    assert rd.finished_run(finished, cfg)["finished"] is True
    assert rd.finished_run(finished, compose_config([*TRAIN, "trainer.lr=1e-3", "force=true"])) is None


@pytest.mark.parametrize("overrides, keys", [
    (["trainer.lr=1e-3"], ["trainer.lr"]),
    (["adapter.rank=4", "seed=7"], ["adapter.rank", "seed"]),
    (["eval=fixtures"], ["eval."]),  # another evaluation is another result
])
def test_finished_run_with_another_config_is_an_error_naming_the_keys(finished, overrides, keys):
    with pytest.raises(MoleConfigError) as err:
        rd.finished_run(finished, compose_config([*TRAIN, *overrides]))
    line = str(err.value)
    assert str(finished) in line and "another config" in line and "force=true" in line
    assert all(k in line for k in keys), line


def test_config_differences_ignore_only_the_listed_keys():
    from omegaconf import OmegaConf

    a = OmegaConf.create({"trainer": {"lr": 1, "save_every": 0}, "paths": {"out": "x"}, "seed": 1})
    b = OmegaConf.create({"trainer": {"lr": 2, "save_every": 5}, "paths": {"out": "y"}, "extra": 3, "seed": 1})
    assert rd.config_differences(a, b) == ["extra", "paths.out", "trainer.lr", "trainer.save_every"]
    assert rd.config_differences(a, b, ("trainer.save_every", "paths.")) == ["extra", "trainer.lr"]


def test_a_key_the_stored_config_lacks_counts_as_its_default(finished, tmp_path):
    """A run written before ``data.truncation`` existed is the same run as one with its default, prompt_left."""
    from omegaconf import OmegaConf

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    saved = OmegaConf.load(run / rd.CONFIG_FILE)
    assert saved.data.truncation == "prompt_left"
    del saved.data["truncation"]
    OmegaConf.save(saved, run / rd.CONFIG_FILE)
    assert rd.finished_run(run, compose_config(TRAIN))["finished"] is True
    assert rd.finished_run(run, compose_config([*TRAIN, "data.truncation=prompt_left"]))["finished"] is True
    with pytest.raises(MoleConfigError, match=r"differs at data\.truncation\)"):
        rd.finished_run(run, compose_config([*TRAIN, "data.truncation=right"]))
    # only keys with a declared default: another key missing from the stored config is a difference
    del saved.data["cutoff_len"]
    OmegaConf.save(saved, run / rd.CONFIG_FILE)
    with pytest.raises(MoleConfigError, match=r"differs at data\.cutoff_len\)"):
        rd.finished_run(run, compose_config(TRAIN))


def test_config_differences_fill_a_key_absent_on_one_side_with_its_default():
    from omegaconf import OmegaConf

    old = OmegaConf.create({"data": {"cutoff_len": 8}})
    new = OmegaConf.create({"data": {"cutoff_len": 8, "truncation": "prompt_left"}})
    right = OmegaConf.create({"data": {"cutoff_len": 8, "truncation": "right"}})
    defaults = {"data.truncation": "prompt_left"}
    assert rd.config_differences(old, new) == ["data.truncation"]
    assert rd.config_differences(old, new, defaults=defaults) == []
    assert rd.config_differences(new, old, defaults=defaults) == []
    assert rd.config_differences(old, right, defaults=defaults) == ["data.truncation"]


def test_a_run_written_with_the_smollm2_source_is_the_same_run_on_the_gguf_source():
    """``model.source: smollm2`` (SmolLM2's own converter) is read as the GGUF source with the preset's file
    and cache, so re-running, resuming and evaluating such a run need no ``force=true``."""
    from omegaconf import OmegaConf

    current = compose_config([*TRAIN, "model=smollm2_135m"])
    old = current.copy()
    old.model = OmegaConf.create({k: v for k, v in OmegaConf.to_container(current.model).items()
                                  if k not in ("gguf", "cache_name")})
    old.model.source = "smollm2"
    assert rd.config_differences(old, current) == []
    assert rd.config_differences(old, compose_config([*TRAIN, "model=smollm2_135m", "model.cache_name=other"])) == [
        "model.cache_name"]
    assert rd.config_differences(old, compose_config(TRAIN)) != []  # another model is still another run


def _train_cli(cfg, run_dir: Path, capsys) -> tuple[int, str]:
    from mole.cli.train import _single_run

    try:
        _single_run(cfg, str(run_dir))
        code = 0
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err


def test_mole_train_on_a_finished_run_of_another_config_stops_and_changes_nothing(finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = _snapshot(run)
    code, err = _train_cli(compose_config([*TRAIN, "trainer.lr=1e-3"]), run, capsys)
    assert code == 2 and "Traceback" not in err
    (line,) = _error_lines(err)
    assert line.startswith(f"mole-train: error: {run} holds a finished run of another config (differs at trainer.lr)")
    assert _snapshot(run) == before
    code, err = _train_cli(compose_config(TRAIN), run, capsys)  # the same config: skipped
    assert code == 0 and _error_lines(err) == [] and _snapshot(run) == before


def test_mole_train_on_a_finished_run_without_a_readable_config_stops(finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / rd.CONFIG_FILE).write_text("model: [1\n")
    before = _snapshot(run)
    code, err = _train_cli(compose_config(TRAIN), run, capsys)
    (line,) = _error_lines(err)
    assert code == 2 and f"{run} holds a finished run whose config.yaml cannot be read" in line
    assert _snapshot(run) == before


def test_force_trains_over_a_finished_run(finished, tmp_path):
    from mole.recipes.train import run_train

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    metrics = run_train(compose_config([*TRAIN, "trainer.max_steps=1", "force=true"]), run)
    assert metrics["finished"] and metrics["status"] == rd.FINISHED and metrics["steps"] == 1
    assert json.loads((run / rd.METRICS_FILE).read_text())["steps"] == 1


# ---- checkpoints: removed only by their writer or under the lock ----


def _fake_checkpoint(run: Path, step: int) -> Path:
    path = run / "checkpoints" / f"step-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text("{}")
    return path


def test_checkpoints_of_another_process_are_removed_only_under_the_lock(tmp_path):
    from mole.training import checkpoint as ckpt

    _fake_checkpoint(tmp_path, 1)
    stale_tmp = tmp_path / "checkpoints" / ".tmp-step-2-999999"  # another process's checkpoint in the making
    stale_tmp.mkdir()
    with pytest.raises(RuntimeError, match="without holding the run directory's lock"):
        ckpt.prepare_run_dir(tmp_path, resume=False, force=False)
    assert stale_tmp.is_dir() and [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1]
    with rd.RunLock(tmp_path):
        assert ckpt.prepare_run_dir(tmp_path, resume=False, force=False) is None
    assert not (tmp_path / "checkpoints").exists()


def test_rotation_keeps_checkpoints_this_process_did_not_write(tmp_path):
    """keep_checkpoints=1 removes this process's older checkpoints, not those it found there."""
    import torch

    from mole.training import checkpoint as ckpt
    from mole.training.loop import TrainState

    _fake_checkpoint(tmp_path, 1)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    loader = torch.utils.data.DataLoader(list(range(4)), batch_size=2)
    for step in (2, 3):
        ckpt.save_checkpoint(tmp_path, step, model=model, optimizer=opt, scheduler=sched, state=TrainState(step=step),
                             stream=ckpt.BatchStream(loader), config_yaml="a: 1\n", keep=1)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1, 3]


# ---- remote code: only from the current command line ----


EVIL = "import pathlib; pathlib.Path(__file__).with_name('EXECUTED').write_text('yes')\n"


def _shared_run_asking_for_remote_code(finished: Path, tmp: Path) -> Path:
    """A copy of a finished run edited as a hostile share would: a local "Hub" folder with code of its own."""
    evil = tmp / "evil_model"
    evil.mkdir()
    (evil / "modeling_evil.py").write_text(EVIL)
    (evil / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": {
        "AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"}}))
    run = tmp / "run"
    shutil.copytree(finished, run)
    text = (run / rd.CONFIG_FILE).read_text().replace("source: config", f"source: hub\n  hf_id: {evil}\n  trust_remote_code: true")
    (run / rd.CONFIG_FILE).write_text(text)
    return run


def _cli(module: str, args: list[str], capsys) -> tuple[int, str]:
    import importlib
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level  # the command logs to this test's captured stdout
    try:
        importlib.import_module(f"mole.cli.{module}").main(args)
        code = 0
    except SystemExit as stop:
        code = stop.code
    finally:
        root.handlers[:], root.level = handlers, level
    return code, capsys.readouterr().err


@pytest.mark.parametrize("command", ["eval", "analyze"])
def test_a_stored_config_asking_for_remote_code_is_refused(command, finished, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = _shared_run_asking_for_remote_code(finished, tmp_path)
    before = _snapshot(run)
    args = [f"checkpoint={run}"] if command == "eval" else [str(run)]
    code, err = _cli(command, args, capsys)
    assert code == 2 and "Traceback" not in err
    (line,) = _error_lines(err)
    assert line.startswith(f"mole-{command}: error: checkpoint: {run / rd.CONFIG_FILE} sets model.trust_remote_code=true")
    assert "trust_remote_code=true" in line.split(";")[-1]  # says how to allow it
    assert _snapshot(run) == before and not (tmp_path / "evil_model" / "EXECUTED").exists()


def test_init_from_a_run_asking_for_remote_code_is_refused(finished, tmp_path, capsys):
    run = _shared_run_asking_for_remote_code(finished, tmp_path)
    code, err = _train_cli(compose_config([*TRAIN, f"trainer.init_from={run}"]), tmp_path / "new", capsys)
    (line,) = _error_lines(err)
    assert code == 2 and line.startswith("mole-train: error: trainer.init_from: checkpoint:")
    assert "sets model.trust_remote_code=true" in line and not (tmp_path / "evil_model" / "EXECUTED").exists()


def test_remote_code_from_the_command_line_replaces_the_stored_value_and_names_the_code(finished, tmp_path, caplog,
                                                                                     monkeypatch):
    import mole.model.base as base

    def stop(*args, **kwargs):  # what transformers would import is not run in a test
        raise OSError("stopped before loading")

    monkeypatch.setattr(base.AutoTokenizer, "from_pretrained", stop)

    run = _shared_run_asking_for_remote_code(finished, tmp_path)
    assert rd.load_run_config(run, trust_remote_code=True).model.trust_remote_code is True
    (run / rd.CONFIG_FILE).write_text((run / rd.CONFIG_FILE).read_text().replace("trust_remote_code: true",
                                                                                 "trust_remote_code: false"))
    assert rd.load_run_config(run).model.trust_remote_code is False
    cfg = rd.load_run_config(run, trust_remote_code=True)
    with caplog.at_level("WARNING"), pytest.raises(MoleConfigError, match="stopped before loading"):
        base.build_model(cfg.model)
    assert "model.trust_remote_code=true" in caplog.text and "modeling_evil.py" in caplog.text
    with pytest.raises(MoleConfigError, match="trust_remote_code must be true or false, got 'maybe'"):
        rd.check_trust_flag("maybe")


# ---- two real processes on one directory ----

# the first run stops before its second step while the file HOLD exists (after its first checkpoint)
_HOLDING_DRIVER = (
    "import os, sys, time, mole.training.loop as L\n"
    "real, calls = L.loss_step, []\n"
    "def held(*a, **k):\n"
    "    calls.append(1)\n"
    "    deadline = time.monotonic() + 200\n"
    "    while len(calls) > 1 and os.path.exists(os.environ['HOLD']) and time.monotonic() < deadline:\n"
    "        time.sleep(0.05)\n"
    "    return real(*a, **k)\n"
    "L.loss_step = held\n"
    "from mole.cli.train import main\n"
    "main()\n"
)
RUN = ["model=tiny_llama", "eval=none", "trainer.batch_size=2", "data.max_records=12", "trainer.max_steps=3",
       "trainer.save_every=1", "trainer.keep_checkpoints=10"]


@pytest.mark.slow
def test_a_second_process_on_a_live_run_directory_stops_at_once(tmp_path):
    from mole.training import checkpoint as ckpt

    run, hold = tmp_path / "run", tmp_path / "HOLD"
    hold.write_text("")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": os.getcwd()}
    first = subprocess.Popen([sys.executable, "-c", _HOLDING_DRIVER, *RUN, f"hydra.run.dir={run}"], cwd=tmp_path,
                             env={**env, "HOLD": str(hold)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not ckpt.list_checkpoints(run) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ckpt.list_checkpoints(run), "the first run wrote no checkpoint"
        notes = _snapshot(run / ".hydra")  # Hydra's notes of the first run's command line
        # the same config (which used to remove the live run's checkpoints) and another config
        for extra in ([], ["trainer.lr=1e-3"]):
            started = time.monotonic()
            second = subprocess.run([sys.executable, "-m", "mole.cli.train", *RUN, *extra, f"hydra.run.dir={run}"],
                                    cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
            assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-2000:]
            (line,) = _error_lines(second.stderr)
            assert line == (f"mole-train: error: run directory {run} is in use by another mole run (pid {first.pid}); "
                            "wait for it to end, or give this run another directory (hydra.run.dir=DIR)")
            assert first.poll() is None and ckpt.list_checkpoints(run)  # the first run goes on, checkpoints kept
            assert _snapshot(run / ".hydra") == notes  # the second stopped before writing anything
            assert time.monotonic() - started < 60
        hold.unlink()
        assert first.wait(timeout=240) == 0, first.stderr.read()[-2000:]
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGKILL)
    metrics = json.loads((run / rd.METRICS_FILE).read_text())
    assert metrics["finished"] and metrics["steps"] == 3
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [1, 2, 3]  # none removed by the second process
    from omegaconf import OmegaConf

    assert OmegaConf.load(run / rd.CONFIG_FILE).trainer.lr == 3e-4  # the first run's own config, not the second's


def _hold_lock(run: Path) -> subprocess.Popen:
    """Another process that holds ``run``'s lock until its stdin closes."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from mole.run_dir import RunLock; held = RunLock(sys.argv[1]).acquire(); "
         "print('held', flush=True); sys.stdin.read()", str(run)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.mark.slow
def test_a_sweep_job_on_a_busy_directory_changes_nothing_there(tmp_path):
    """Hydra writes a job's notes before any job callback runs: they go to the job's own folder, which the
    refused job removes, so the owner's ``.hydra/`` and log stay byte for byte as they were."""
    sweep_dir = tmp_path / "sweep"
    run = sweep_dir / "job"
    (run / ".hydra").mkdir(parents=True)
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (run / ".hydra" / name).write_text(f"# the owner's {name}\n")
    rd.write_json(run / rd.METRICS_FILE, rd.with_status({"pid": 1}, rd.RUNNING))  # an owner that has logged nothing yet
    before = _snapshot(run)
    holder = _hold_lock(run)
    try:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": os.getcwd(),
               "MOLE_OUTPUT_DIR": str(tmp_path / "out")}
        proc = subprocess.run([sys.executable, "-m", "mole.cli.train", "-m", *RUN, f"hydra.sweep.dir={sweep_dir}",
                               "hydra.sweep.subdir=job"], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("mole-train:")]
        assert lines == [
            f"mole-train: job job failed: run directory {run} is in use by another mole run (pid {holder.pid}); "
            "wait for it to end, or give this run another directory (hydra.run.dir=DIR)",
            "mole-train: error: 1 of 1 sweep jobs failed (job); see each job's metrics.json and error.txt"], lines
        assert _snapshot(run) == before
        # nothing new either: no notes folder of the refused job, not even an empty log file
        assert sorted(p.name for p in run.iterdir()) == [".hydra", rd.LOCK_FILE, rd.OWNER_FILE, rd.METRICS_FILE]
        assert holder.poll() is None
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
