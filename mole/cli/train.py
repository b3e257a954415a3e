"""``mole-train``: compose the config with Hydra and train one run (or a sweep with ``-m``).

    mole-train                                    # SmolLM2-135M, MoLA + MoR, shipped fixtures
    mole-train router=mor experts=mola_2468       # any router x layout x adapter
    mole-train -m method=mola,mola_mor seed=1,2   # a grid sweep
    mole-train distributed=ddp distributed.num_processes=4   # 4 processes via accelerate launch
    mole-train -m hydra/launcher=mole_joblib method=lora,mola # sweep jobs in parallel (pip install 'mole[joblib]')

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
from omegaconf import DictConfig

from mole import CONF_DIR
from mole.cli.common import report_user_errors


def _redact_hydra_files(hydra_cfg) -> None:
    """Hydra saved the overrides and config (``.hydra/``, a sweep's ``multirun.yaml``) before the job
    started: redact secrets there."""
    from hydra.types import RunMode

    from mole.utils.secrets import redact_yaml_file

    if hydra_cfg.mode == RunMode.MULTIRUN:
        redact_yaml_file(Path(hydra_cfg.sweep.dir) / "multirun.yaml")
    if not hydra_cfg.output_subdir:
        return
    folder = Path(hydra_cfg.runtime.output_dir) / hydra_cfg.output_subdir
    for name in ("config.yaml", "overrides.yaml", "hydra.yaml"):
        redact_yaml_file(folder / name)


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
@report_user_errors("mole-train")
def _app(cfg: DictConfig) -> None:
    from mole.pipeline import run_train
    from mole.training.distributed import launched
    from mole.training.launch import LaunchError, launch, needs_launch

    if launched() and int(os.environ.get("RANK", "0")) != 0:
        logging.getLogger().setLevel(logging.WARNING)  # one rank of `accelerate launch -m mole.cli.train`: rank 0 logs
    hydra_cfg = HydraConfig.get()
    _redact_hydra_files(hydra_cfg)
    run_dir = hydra_cfg.runtime.output_dir
    if not needs_launch(cfg):
        run_train(cfg, run_dir)
        return
    try:
        launch(cfg, run_dir)
    except LaunchError as err:
        print(f"mole-train: error: {err}", file=sys.stderr)
        sys.exit(1)


def main() -> None:
    _app()


if __name__ == "__main__":
    main()
