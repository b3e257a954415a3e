"""Shared by the command lines: user errors end with one line and exit status 2, never a traceback."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from functools import wraps
from pathlib import Path

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from mole.config import compose_config
from mole.config_schema import validate_config
from mole.utils.errors import USER_ERRORS, MoleConfigError, error_line, os_error_line
from mole.utils.secrets import RedactFilter, redact_text


def fail(prog: str, line: str, status: int = 2):
    """Print ``prog: error: <line>`` (secrets redacted) on one line, log it when a log is open, and exit."""
    line = redact_text(" ".join(line.split("\n")))
    if logging.getLogger().handlers:  # into the run's log too, when there is one
        logging.getLogger(prog).error("%s", line)
    print(f"{prog}: error: {line}", file=sys.stderr)
    sys.exit(status)


def report_user_errors(prog: str) -> Callable:
    """Decorate a command body: a user error (:data:`mole.utils.errors.USER_ERRORS`), or an OSError of the
    machine's making (disk full, permissions, a name too long), prints ``prog: error: <message>`` on one
    line and exits 2."""

    def wrap(fn: Callable) -> Callable:
        @wraps(fn)
        def inner(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except USER_ERRORS as err:
                fail(prog, error_line(err))
            except OSError as err:
                line = os_error_line(err)
                if line is None:
                    raise
                fail(prog, line)

        return inner

    return wrap


def hydra_error_line(err: Exception) -> str:
    """One line from a Hydra/OmegaConf composition error: its first paragraph, and the options it lists.

    ``In 'train': Could not find 'router/nope'`` + ``Available options in 'router': crw, mor, ...``.
    """
    paragraphs = [p.strip() for p in str(err).split("\n\n") if p.strip()]
    if not paragraphs:
        return type(err).__name__
    skip = ("full_key:", "object_type=", "reference_type=")

    line = " ".join(ln.strip() for ln in paragraphs[0].splitlines() if not ln.strip().startswith(skip))
    moved = _moved_key_line(line)
    if moved is not None:
        return redact_text(moved)
    for para in paragraphs[1:]:
        head, *rest = para.splitlines()
        if head.startswith("Available options in"):
            options = []
            for ln in rest:  # indented option names, until the next unindented line
                if not ln[:1].isspace():
                    break
                options.append(ln.strip())
            line += f"; {head.rstrip(':').lower()}: {', '.join(options)}"
    return redact_text(line)


def _moved_key_line(line: str) -> str | None:
    """For Hydra's "Could not override 'KEY'" about a key that moved (:data:`mole.config_schema.MOVED_KEYS`, MoR's
    selection keys), the line naming its new place."""
    import re

    from mole.config_schema import moved_key_line

    found = re.match(r"Could not override '([^']+)'\.(?: To append to your config use \+[^=\s]+=(.*))?$", line)
    return None if found is None else moved_key_line(found.group(1), found.group(2))


def compose_from_argv(overrides: Sequence[str], config_name: str):
    """Compose ``conf/<config_name>.yaml`` with command-line overrides; Hydra's errors become one line."""
    try:
        cfg = compose_config(list(overrides), config_name=config_name)
    except (HydraException, OmegaConfBaseException) as err:
        raise MoleConfigError(hydra_error_line(err)) from None
    if config_name == "train":
        validate_config(cfg)
    return cfg


def log_to(console: bool = True, file: Path | None = None) -> None:
    """Log INFO to stdout and, if given, to a file (what Hydra's job logging does for mole-train)."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)] if console else []
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(file))

    for handler in handlers:
        handler.addFilter(RedactFilter())
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] %(message)s",
                        handlers=handlers, force=True)
    for noisy in ("lm_eval", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_main(doc: str, run: Callable[[list[str]], object], argv: Sequence[str] | None = None) -> None:
    """A compose-based command's entry point: ``-h``/``--help`` prints its docstring, else ``run(argv)``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(doc)
        return
    run(args)
