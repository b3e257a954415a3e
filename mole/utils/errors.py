"""User-facing errors.

A :class:`MoleConfigError` is a mistake in what the user asked for (a config key, a file): the command
lines catch it and print its one-line message, naming the key or file and what was expected, and exit
with status 2 instead of a traceback. A :class:`NonFiniteLossError` (training diverged) is reported the
same way: its message says at which step and where the last good adapter is.
"""

from __future__ import annotations


class MoleConfigError(ValueError):
    """Bad configuration or input; the message names the config key or file and what was expected."""


class NonFiniteLossError(RuntimeError):
    """The training loss (or the gradient norm) became NaN or infinite; the message says at which step."""


#: The errors the command lines report as one line (exit status 2) instead of a traceback.
USER_ERRORS: tuple[type[Exception], ...] = (MoleConfigError, NonFiniteLossError)


def error_line(err: BaseException) -> str:
    """One line describing ``err``: a user error's own message, else ``Type: first line of the message``."""
    if isinstance(err, USER_ERRORS):
        return " ".join(str(err).split("\n"))
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
