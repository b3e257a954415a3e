"""Shared by the command lines: user errors end with one line and exit status 2, never a traceback."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from functools import wraps

from mole.utils.errors import MoleConfigError


def report_user_errors(prog: str) -> Callable:
    """Decorate a command body: a :class:`MoleConfigError` prints ``prog: error: <message>`` and exits 2."""

    def wrap(fn: Callable) -> Callable:
        @wraps(fn)
        def inner(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except MoleConfigError as err:
                logging.getLogger(prog).error("%s", err)
                print(f"{prog}: error: {err}", file=sys.stderr)
                sys.exit(2)

        return inner

    return wrap
