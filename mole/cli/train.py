"""``mole-train``: compose the config with Hydra and train one run (or a sweep with ``-m``).

    mole-train                                    # SmolLM2-135M, MoLA + MoR, shipped fixtures
    mole-train router=mor experts=mola_2468       # any router x layout x adapter
    mole-train -m method=mola,mola_mor seed=1,2   # a grid sweep
    mole-train trainer.save_every=10              # resumable checkpoints in RUN_DIR/checkpoints/
    mole-train trainer.save_every=10 trainer.resume=true   # continue an interrupted run
    mole-train distributed=ddp distributed.num_processes=4   # 4 processes via accelerate launch
    mole-train -m hydra/launcher=mole_joblib method=lora,mola # sweep jobs in parallel (pip install 'mole[joblib]')

A user error (bad config key, missing file, non-finite loss) ends with one line ``mole-train: error: ...``
and exit status 2. In a sweep (``-m``) a failed job records its error in its own directory
(``metrics.json`` with ``failed: true``, ``error.txt``) and the other jobs still run; the sweep then
ends with one line saying how many jobs failed, and exit status 1. That count is read from the jobs'
run directories after the launcher returns (:mod:`mole.cli.sweep`), so it holds under every launcher.

With ``distributed.num_processes > 1`` (or DeepSpeed) Hydra composes here, once; the resolved config
goes to the run directory and ``accelerate launch`` starts the processes that train from it
(:mod:`mole.training.launch`). Under ``accelerate launch`` itself this command trains directly.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra._internal.utils import get_args_parser
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from mole import CONF_DIR
from mole.cli import hydra_notes, sweep
from mole.cli.common import hydra_error_line, report_user_errors
from mole.cli.hydra_notes import owned_run, pending_folder, publish
from mole.run_dir import lock_run
from mole.utils.errors import MoleConfigError, error_line, os_error_line
from mole.utils.secrets import redact_text, redact_yaml_file, redacted_stderr
from mole.utils.slurm import slurm_task, writes_run_dir

PROG = "mole-train"
log = logging.getLogger(PROG)


class RunDirectoryLock(Callback):
    """Hydra callback (``hydra.callbacks`` in ``conf/train.yaml``): a single run takes its run directory's lock
    (:mod:`mole.run_dir`) before Hydra writes into the directory (``.hydra/``, the log), so a second run on a
    busy directory stops without touching it. A sweep job takes its lock when it starts
    (:func:`mole.cli.hydra_notes.owned_run`): Hydra has written its notes by then, into a folder of their own."""

    def on_run_start(self, config, **kwargs) -> None:
        # a machine other than machine 0 of a multi-machine run neither owns nor writes the directory
        self.lock = None if _not_machine_zero(sys.argv[1:]) else lock_run(config.hydra.run.dir)
        if self.lock is None:
            return
        try:
            self.lock.acquire()
        except MoleConfigError as err:  # Hydra turns a callback's exception into a warning: stop here
            print(f"{PROG}: error: {err}", file=sys.stderr)
            sys.exit(2)

    def on_run_end(self, config, **kwargs) -> None:
        if getattr(self, "lock", None) is not None:
            self.lock.release()


def _redact_hydra_files(hydra_cfg) -> None:
    """Hydra saved the overrides and config (``.hydra/``, a sweep's ``multirun.yaml``) before the job
    started: redact secrets there."""
    if not writes_run_dir():  # a SLURM task other than task 0: it wrote none of them (hydra.output_subdir is null)
        return
    if hydra_cfg.mode == RunMode.MULTIRUN:
        redact_yaml_file(Path(hydra_cfg.sweep.dir) / "multirun.yaml")
    if not hydra_cfg.output_subdir:
        return
    folder = Path(hydra_cfg.runtime.output_dir) / hydra_cfg.output_subdir
    for name in ("config.yaml", "overrides.yaml", "hydra.yaml"):
        redact_yaml_file(folder / name)


def _train_one(cfg: DictConfig, run_dir: str) -> None:
    """Train in this process, or start ``accelerate launch`` when the config asks for several processes."""
    from mole.recipes.train import run_train
    from mole.training.distributed import launched
    from mole.training.launch import launch, needs_launch

    task = slurm_task()
    if task is not None:  # one task of a multi-task SLURM job: one process of the run (mole.utils.slurm)
        task.export(cfg.get("distributed", {}).get("main_process_port"))
    if launched() and int(os.environ.get("RANK", "0")) != 0:
        logging.getLogger().setLevel(logging.WARNING)  # one rank of `accelerate launch -m mole.cli.train`: rank 0 logs
        root = logging.getLogger()
        for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
            root.removeHandler(handler)  # the run's train.log is rank 0's
    if needs_launch(cfg):
        launch(cfg, run_dir)
    else:
        run_train(cfg, run_dir)


@report_user_errors(PROG)
def _single_run(cfg: DictConfig, run_dir: str) -> None:
    from mole.training.launch import LaunchError

    try:
        _train_one(cfg, run_dir)
    except LaunchError as err:
        if err.reported:  # a worker printed its one-line error (a user error)
            sys.exit(2)
        print(f"{PROG}: error: {err}", file=sys.stderr)
        sys.exit(1)


def _sweep_job(cfg: DictConfig, run_dir: str, sweep_dir: str, job_num: int, pending: Path | None = None) -> None:
    """One job of a sweep: a failure is recorded (by run_train) and reported, and the sweep goes on.

    Hydra 1.3's basic launcher stores a job's exception and re-raises the first one after the whole
    batch, skipping ``on_multirun_end``; a ``SystemExit`` (how user errors end a single run) would even
    stop the sweep at once. So a job never raises here; :func:`main` reports the failures at the end,
    from what each job recorded (:mod:`mole.cli.sweep`).
    """
    writer = writes_run_dir()  # a job of several SLURM tasks is recorded by task 0 (asked before the tasks meet)
    if writer:
        sweep.record_job(sweep_dir, job_num, run_dir)
    try:
        with owned_run(run_dir, pending):  # the lock, then Hydra's notes into .hydra/ (mole.cli.hydra_notes)
            _train_one(cfg, run_dir)
    except Exception as err:  # noqa: BLE001 - isolate the job, whatever failed
        line = error_line(err)
        log.error("job failed: %s (details in %s)", line, Path(run_dir) / "error.txt")
        print(f"{PROG}: job {Path(run_dir).name} failed: {line}", file=sys.stderr)
        if writer:
            sweep.record_job(sweep_dir, job_num, run_dir, error=line)


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def _app(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    _redact_hydra_files(hydra_cfg)
    pending = pending_folder(hydra_cfg)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        _sweep_job(cfg, hydra_cfg.runtime.output_dir, hydra_cfg.sweep.dir, hydra_cfg.job.num, pending)
    else:
        if pending is not None:  # RunDirectoryLock holds the directory
            publish(pending, hydra_cfg.runtime.output_dir)
        _single_run(cfg, hydra_cfg.runtime.output_dir)


def _not_machine_zero(argv: list[str]) -> bool:
    """Whether this command is a machine other than machine 0 of a run over several machines
    (``distributed.machine_rank=N``, or a SLURM task other than task 0): it writes nothing into the run
    directory, so Hydra is told to keep its ``.hydra/`` files and its log file out of it."""
    task = slurm_task()
    if task is not None:
        return task.rank != 0
    ranks = [a.split("=", 1)[1] for a in argv if a.lstrip("+").startswith("distributed.machine_rank=")]
    return bool(ranks) and ranks[-1].strip() not in ("0", "")


def _check_options(argv: list[str]) -> None:
    """An option Hydra does not know ends with one line (argparse would print its whole usage first)."""
    unknown = [a for a in get_args_parser().parse_known_args(argv)[1] if a.startswith("-")]
    if unknown:
        print(f"{PROG}: error: unrecognized option {redact_text(' '.join(unknown))}; overrides are key=value "
              f"(see {PROG} --help)", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    _check_options(sys.argv[1:])
    token = sweep.start()
    launcher_error = None
    if "-m" not in sys.argv[1:] and "--multirun" not in sys.argv[1:] and _not_machine_zero(sys.argv[1:]):
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
    elif not hydra_notes.user_chose_folder(sys.argv[1:]):  # Hydra's notes reach .hydra/ only under the lock
        sys.argv.append(hydra_notes.override(token))
    user_full_error = os.environ.get("HYDRA_FULL_ERROR")
    # Hydra raises its own errors (unknown config option or key) instead of printing them over many lines,
    # so they end in one line like every other user error (HYDRA_FULL_ERROR=1 keeps Hydra's full report)
    os.environ["HYDRA_FULL_ERROR"] = "1"
    from mole.training.signals import RunInterrupted

    try:
        with redacted_stderr():  # Hydra prints a failed job's overrides, secrets and all
            _app()
    except RunInterrupted as stop:  # checkpoint and metrics.json are written (mole.training.signals)
        if int(os.environ.get("RANK", "0")) == 0:
            print(stop.line(PROG), file=sys.stderr)
        sys.exit(stop.exit_status)
    except KeyboardInterrupt:  # Ctrl-C before training started: nothing to keep
        print(f"{PROG}: interrupted before training started", file=sys.stderr)
        sys.exit(130)
    except (HydraException, OmegaConfBaseException) as err:
        if user_full_error == "1":
            raise
        sweep.finish()
        print(f"{PROG}: error: {hydra_error_line(err)}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:  # Hydra creating the run directory: a name too long, no space, no permission
        line = os_error_line(err)
        if user_full_error == "1" or (line is None and sweep.started() is None):
            raise
        if line is not None and sweep.started() is None:
            print(f"{PROG}: error: {redact_text(line)}", file=sys.stderr)
            sys.exit(2)
        launcher_error = redact_text(line or error_line(err))
    except Exception as err:  # a launcher that gave up (a worker killed, a SLURM job lost): report the jobs
        if sweep.started() is None:
            raise
        launcher_error = error_line(err)
    finally:
        if user_full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = user_full_error
    outcome = sweep.finish()
    if outcome is not None and (outcome.failed or launcher_error):
        names = ", ".join(Path(d).name for d, _ in outcome.failed)
        line = f"{len(outcome.failed)} of {len(outcome.jobs)} sweep jobs failed" + (f" ({names})" if names else "")
        line += "; see each job's metrics.json and error.txt"
        if launcher_error:
            line = f"the launcher stopped ({launcher_error}); {line}"
        print(f"{PROG}: error: {line}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
