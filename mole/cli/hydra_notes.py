"""Hydra's notes of a run (``RUN_DIR/.hydra/``) are written into the run directory only by its owner.

Hydra 1.3 writes ``.hydra/config.yaml``, ``hydra.yaml`` and ``overrides.yaml`` in ``run_job``
(``hydra/core/utils.py``) after it creates the job's directory and before it calls the job callbacks
(``on_job_start``) and the task function, so a sweep job cannot take its run directory's lock
(:mod:`mole.run_dir`) before they are written. ``mole-train`` therefore points Hydra at a folder of the job's
own (:func:`override`: ``hydra.output_subdir=.hydra-pending-<sweep id>-<job>-<SLURM task>``). Once the job
holds the lock, :func:`owned_run` moves the notes to ``.hydra/``; a job refused because another process holds
the directory removes its folder and stops logging into the directory before it says why, so the owner's
files stay as the owner wrote them. A single run takes its lock before Hydra starts the job
(:class:`mole.cli.train.RunDirectoryLock`) and moves its notes the same way.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from omegaconf import OmegaConf

from mole.run_dir import RunDirectoryBusy, lock_run, write_text
from mole.utils.slurm import slurm_task

FOLDER = ".hydra"
PENDING_PREFIX = ".hydra-pending-"
KEY = "hydra.output_subdir"


def override(token: str) -> str:
    """The command-line override that sends Hydra's notes to the job's own folder (resolved in the job)."""
    # a SLURM task other than task 0 writes no notes at all (null), as conf/train.yaml's own default says
    folder = f"{PENDING_PREFIX}{token}-${{oc.select:hydra.job.num,0}}-${{oc.env:SLURM_PROCID,0}}"
    return f"{KEY}='${{mole_writer:{folder},null}}'"  # quoted: a bare comma would make it a sweep


def user_chose_folder(argv: list[str]) -> bool:
    """Whether the command line sets ``hydra.output_subdir`` itself (then Hydra writes where it says)."""
    return any(a.lstrip("+").startswith(f"{KEY}=") for a in argv)


def pending_folder(hydra_cfg) -> Path | None:
    """The job's folder of Hydra's notes, when :func:`override` chose it."""
    subdir = hydra_cfg.output_subdir
    if not subdir or not str(subdir).startswith(PENDING_PREFIX):
        return None
    return Path(hydra_cfg.runtime.output_dir) / str(subdir)


def publish(pending: Path, run_dir: str | Path) -> Path:
    """Move the notes to ``RUN_DIR/.hydra/`` (replacing an earlier run's), saying ``output_subdir: .hydra``."""
    notes = pending / "hydra.yaml"
    if notes.is_file():
        cfg = OmegaConf.load(notes)
        if OmegaConf.select(cfg, "hydra") is not None:
            cfg.hydra.output_subdir = FOLDER
            given = OmegaConf.select(cfg, "hydra.overrides.hydra")
            if given is not None:
                cfg.hydra.overrides.hydra = [o for o in given if not (str(o).startswith(f"{KEY}=") and PENDING_PREFIX in str(o))]
            write_text(notes, OmegaConf.to_yaml(cfg))
    final = Path(run_dir) / FOLDER
    old = final.with_name(f"{FOLDER}-old-{os.getpid()}")
    if final.exists() or final.is_symlink():
        os.replace(final, old)
    os.replace(pending, final)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)
    return final


def stop_logging_into(run_dir: str | Path) -> None:
    """Close the log files Hydra opened in ``run_dir`` for this job (its ``train.log``)."""
    root = Path(run_dir).resolve()
    for handler in list(logging.root.handlers):
        path = getattr(handler, "baseFilename", None)
        if path and Path(path).resolve().parent == root:
            logging.root.removeHandler(handler)
            handler.close()


@contextmanager
def owned_run(run_dir: str | Path, pending: Path | None) -> Iterator[None]:
    """A sweep job's hold on its run directory: the lock (only the main task of a multi-task SLURM job takes
    it), then Hydra's notes moved into ``.hydra/``. On a busy directory the job's folder is removed and
    :class:`~mole.run_dir.RunDirectoryBusy` raised, with nothing of the owner's changed."""
    task = slurm_task()
    main = task is None or task.rank == 0
    lock = lock_run(run_dir) if main else None
    if lock is not None:
        try:
            lock.acquire()
        except RunDirectoryBusy:
            if pending is not None:
                shutil.rmtree(pending, ignore_errors=True)
            stop_logging_into(run_dir)
            raise
    try:
        if pending is not None:
            if main:
                publish(pending, run_dir)
            else:  # the main task's notes are the run's
                shutil.rmtree(pending, ignore_errors=True)
        yield
    finally:
        if lock is not None:
            lock.release()
