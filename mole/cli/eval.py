"""``mole-eval``: evaluate a finished run through lm-eval-harness.

    mole-eval checkpoint=outputs/runs/default
    mole-eval checkpoint=DIR eval.tasks=[mole_mc] eval.limit=8
    mole-eval checkpoint=DIR eval.include_path=/my/tasks eval.tasks=[my_task]

Rebuilds the model from ``DIR/config.yaml`` and ``DIR/adapter.safetensors``; writes
``DIR/eval/results.json`` (lm-eval's results format) and ``DIR/eval/eval.log``, and prints a table.
Overrides use Hydra's syntax (composed from ``conf/evaluate.yaml``); nothing is written before the
checkpoint is found valid. A run's ``config.yaml`` cannot make this command run code: a Hub model's own
Python files run only with ``trust_remote_code=true`` on this command line.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from mole.cli.common import compose_from_argv, log_to, report_user_errors, run_main
from mole.run_dir import check_trust_flag
from mole.utils.errors import MoleConfigError


@report_user_errors("mole-eval")
def run(overrides: list[str]) -> dict:
    from mole.model.state import ADAPTER_FILE
    from mole.recipes.evaluate import prepare_eval, run_eval

    cfg = compose_from_argv(overrides, "evaluate")
    try:
        checkpoint = Path(cfg.checkpoint)
    except MissingMandatoryValue:
        raise MoleConfigError("checkpoint=DIR is required: a run directory written by mole-train") from None
    trust = check_trust_flag(cfg.get("trust_remote_code", False))
    # only the keys the user set override the run's own eval config
    eval_overrides = {k: v for k, v in OmegaConf.to_container(cfg.eval, resolve=True).items() if v is not None}
    # validate before writing anything into it
    prepared = prepare_eval(checkpoint, eval_overrides, trust_remote_code=trust)
    if not (checkpoint / ADAPTER_FILE).is_file():
        raise MoleConfigError(f"checkpoint: {checkpoint / ADAPTER_FILE} not found (is the run finished? see its metrics.json)")
    log_to(file=checkpoint / "eval" / "eval.log")
    return run_eval(checkpoint, prepared=prepared)


def main(argv: list[str] | None = None) -> None:
    run_main(__doc__, run, argv)


if __name__ == "__main__":
    main()
