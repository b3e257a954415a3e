"""One process of a multi-process ``mole-train`` run (started by :mod:`mole.training.launch`).

    accelerate launch --num_processes N ... -m mole.cli.worker RUN_DIR [CONFIG_DIR]

Reads ``RUN_DIR/config.yaml`` (written once by the launching ``mole-train``; only YAML is read) and
trains its shard through :func:`mole.recipes.train.run_train`. Rank 0 logs to the console and appends to
``RUN_DIR/train.log`` and writes the run's files; the other ranks log warnings only and write nothing.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from omegaconf import OmegaConf

from mole.cli.common import log_to
from mole.recipes.train import run_train
from mole.run_dir import load_run_config
from mole.training.launch import read_secrets
from mole.training.signals import RunInterrupted
from mole.utils.errors import MoleConfigError

PROG = "mole-train"


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) not in (1, 2) or args[0] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if args and args[0] in ("-h", "--help") else 2)
    run_dir = Path(args[0])
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        log_to(console=True, file=run_dir / "train.log")
    else:
        log_to(console=True)
        logging.getLogger().setLevel(logging.WARNING)

    try:
        # machines other than machine 0 read their own config (compared with machine 0's at start-up)
        cfg = load_run_config(run_dir if len(args) == 1 else Path(args[1]), own_run=True)
        for key, value in read_secrets().items():
            OmegaConf.update(cfg, key, value, force_add=True)
        run_train(cfg, run_dir)
    except RunInterrupted:
        sys.exit(0)  # an orderly stop: the launching mole-train reads metrics.json and reports it
    except MoleConfigError as err:
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # one line on every machine's console
            logging.getLogger(PROG).error("%s", err)
            print(f"{PROG}: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
