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
ends with one line saying how many jobs failed, and exit status 1.

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
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from mole import CONF_DIR
from mole.cli.common import hydra_error_line, report_user_errors

PROG = "mole-train"
log = logging.getLogger(PROG)

# jobs of this process's sweep, and the directories of those that failed (read by main() at the end)
_SWEEP: dict[str, list] = {"jobs": [], "failed": []}


def _redact_hydra_files(hydra_cfg) -> None:
    """Hydra saved the overrides and config (``.hydra/``, a sweep's ``multirun.yaml``) before the job
    started: redact secrets there."""
    from mole.utils.secrets import redact_yaml_file

    if hydra_cfg.mode == RunMode.MULTIRUN:
        redact_yaml_file(Path(hydra_cfg.sweep.dir) / "multirun.yaml")
    if not hydra_cfg.output_subdir:
        return
    folder = Path(hydra_cfg.runtime.output_dir) / hydra_cfg.output_subdir
    for name in ("config.yaml", "overrides.yaml", "hydra.yaml"):
        redact_yaml_file(folder / name)


def _train_one(cfg: DictConfig, run_dir: str) -> None:
    """Train in this process, or start ``accelerate launch`` when the config asks for several processes."""
    from mole.pipeline import run_train
    from mole.training.distributed import launched
    from mole.training.launch import launch, needs_launch

    if launched() and int(os.environ.get("RANK", "0")) != 0:
        logging.getLogger().setLevel(logging.WARNING)  # one rank of `accelerate launch -m mole.cli.train`: rank 0 logs
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
        print(f"{PROG}: error: {err}", file=sys.stderr)
        sys.exit(1)


def _sweep_job(cfg: DictConfig, run_dir: str) -> None:
    """One job of a sweep: a failure is recorded (by run_train) and reported, and the sweep goes on.

    Hydra 1.3's basic launcher stores a job's exception and re-raises the first one after the whole
    batch, skipping ``on_multirun_end``; a ``SystemExit`` (how user errors end a single run) would even
    stop the sweep at once. So a job never raises here; :func:`main` reports the failures at the end.
    """
    from mole.utils.errors import error_line

    _SWEEP["jobs"].append(run_dir)
    try:
        _train_one(cfg, run_dir)
    except Exception as err:  # noqa: BLE001 - isolate the job, whatever failed
        line = error_line(err)
        log.error("job failed: %s (details in %s)", line, Path(run_dir) / "error.txt")
        print(f"{PROG}: job {Path(run_dir).name} failed: {line}", file=sys.stderr)
        _SWEEP["failed"].append(run_dir)


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def _app(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    _redact_hydra_files(hydra_cfg)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        _sweep_job(cfg, hydra_cfg.runtime.output_dir)
    else:
        _single_run(cfg, hydra_cfg.runtime.output_dir)


def _check_options(argv: list[str]) -> None:
    """An option Hydra does not know ends with one line (argparse would print its whole usage first)."""
    from hydra._internal.utils import get_args_parser

    unknown = [a for a in get_args_parser().parse_known_args(argv)[1] if a.startswith("-")]
    if unknown:
        from mole.utils.secrets import redact_text

        print(f"{PROG}: error: unrecognized option {redact_text(' '.join(unknown))}; overrides are key=value "
              f"(see {PROG} --help)", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from mole.utils.errors import os_error_line
    from mole.utils.secrets import redact_text, redacted_stderr

    _check_options(sys.argv[1:])
    _SWEEP["jobs"].clear()
    _SWEEP["failed"].clear()
    user_full_error = os.environ.get("HYDRA_FULL_ERROR")
    # Hydra raises its own errors (unknown config option or key) instead of printing them over many lines,
    # so they end in one line like every other user error (HYDRA_FULL_ERROR=1 keeps Hydra's full report)
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        with redacted_stderr():  # Hydra prints a failed job's overrides, secrets and all
            _app()
    except (HydraException, OmegaConfBaseException) as err:
        if user_full_error == "1":
            raise
        print(f"{PROG}: error: {hydra_error_line(err)}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:  # Hydra creating the run directory: a name too long, no space, no permission
        line = os_error_line(err)
        if line is None or user_full_error == "1":
            raise
        print(f"{PROG}: error: {redact_text(line)}", file=sys.stderr)
        sys.exit(2)
    finally:
        if user_full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = user_full_error
    failed = _SWEEP["failed"]
    if failed:
        names = ", ".join(Path(d).name for d in failed)
        print(f"{PROG}: error: {len(failed)} of {len(_SWEEP['jobs'])} sweep jobs failed ({names}); each holds "
              "error.txt and metrics.json with failed: true", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
