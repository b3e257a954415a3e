"""``mole-train``: compose the config with Hydra and train one run (or a sweep with ``-m``).

    mole-train                                    # SmolLM2-135M, MoLA + MoR, shipped fixtures
    mole-train router=mor experts=mola_2468       # any router x layout x adapter
    mole-train -m method=mola,mola_mor seed=1,2   # a grid sweep
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mole import CONF_DIR
from mole.cli.common import report_user_errors


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
@report_user_errors("mole-train")
def _app(cfg: DictConfig) -> None:
    from mole.pipeline import run_train

    run_train(cfg, HydraConfig.get().runtime.output_dir)


def main() -> None:
    _app()


if __name__ == "__main__":
    main()
