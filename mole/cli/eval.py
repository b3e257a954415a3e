"""``mole-eval``: evaluate a finished run through lm-eval-harness.

    mole-eval checkpoint=outputs/runs/default
    mole-eval checkpoint=DIR eval.tasks=[mole_mc] eval.limit=8
    mole-eval checkpoint=DIR eval.include_path=/my/tasks eval.tasks=[my_task]

Writes ``DIR/eval/results.json`` (lm-eval's results format) and prints a table.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from mole import CONF_DIR
from mole.cli.common import report_user_errors


@hydra.main(config_path=CONF_DIR, config_name="evaluate", version_base="1.3")
@report_user_errors("mole-eval")
def _app(cfg: DictConfig) -> None:
    from mole.pipeline import run_eval

    # only the keys the user set override the run's own eval config
    overrides = {k: v for k, v in OmegaConf.to_container(cfg.eval, resolve=True).items() if v is not None}
    run_eval(cfg.checkpoint, overrides)


def main() -> None:
    _app()


if __name__ == "__main__":
    main()
