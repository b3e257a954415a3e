"""User-facing errors.

A :class:`MoleConfigError` is a mistake in what the user asked for (a config key, a file): the command
lines catch it and print its one-line message, naming the key or file and what was expected, and exit
with status 2 instead of a traceback.
"""

from __future__ import annotations


class MoleConfigError(ValueError):
    """Bad configuration or input; the message names the config key or file and what was expected."""
