"""``mole-export``: a trained run in a format other tools load.

    mole-export RUN_DIR format=peft out=DIR      # lora / dora: load with PeftModel.from_pretrained on (base, DIR)
    mole-export RUN_DIR format=merged out=DIR    # lora / dora / full_ft: load with AutoModelForCausalLM.from_pretrained on DIR
    mole-export RUN_DIR format=mixlora out=DIR   # method=mixlora: the mixlora package's layout
    mole-export RUN_DIR format=hf out=DIR        # any run: load with from_pretrained and trust_remote_code on, mole installed

    mole-export RUN_DIR format=hf out=DIR check=true trust_remote_code=true   # also load it back with its client and compare logits

RUN_DIR (or checkpoint=RUN_DIR) is a run directory written by mole-train. ``out`` must be a new (or
empty) directory; it is written whole or not at all, and nothing else is written. A run that cannot take
the asked format is one error line naming the formats it can take. docs/generate-export.md shows the
client for each format.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf.errors import MissingMandatoryValue

from mole.cli.common import compose_from_argv, report_user_errors, run_main
from mole.utils.errors import MoleConfigError

PROG = "mole-export"


@report_user_errors(PROG)
def run(args: list[str]) -> Path:
    from mole.export import CLIENTS, FORMATS, check_out, export_run

    positional = None
    if args and "=" not in args[0]:
        positional, args = args[0], args[1:]
    cfg = compose_from_argv(args, "export")
    if positional is not None:
        cfg.checkpoint = positional
    try:
        checkpoint, fmt, out = str(cfg.checkpoint), cfg.format, cfg.out
    except MissingMandatoryValue as err:
        key = str(err.full_key) if getattr(err, "full_key", None) else "a key"
        hints = {"checkpoint": "a run directory: mole-export RUN_DIR format=... out=DIR",
                 "format": f"format= one of {', '.join(FORMATS)}", "out": "out=DIR, a new directory"}
        raise MoleConfigError(f"{key} is required: {hints.get(key, key)}") from None
    if fmt not in FORMATS:
        raise MoleConfigError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
    check = cfg.check
    if not isinstance(check, bool):
        raise MoleConfigError(f"check must be true or false, got {check!r}")
    trust = cfg.get("trust_remote_code", False)
    if not isinstance(trust, bool):
        raise MoleConfigError(f"trust_remote_code must be true or false, got {trust!r}")
    check_out(str(out))
    done, diff = export_run(Path(checkpoint), fmt, str(out), check=check, trust_remote_code=trust)
    print(f"{PROG}: {fmt} export written to {done}", file=sys.stderr)
    if diff is not None:
        print(f"{PROG}: largest logit difference to the run, loaded by {CLIENTS[fmt]}: {diff:.3g}")
    return done


def main(argv: list[str] | None = None) -> None:
    run_main(__doc__, run, argv)


if __name__ == "__main__":
    main()
