"""User-facing errors.

A :class:`MoleConfigError` is a mistake in what the user asked for (a config key, a file): the command
lines catch it and print its one-line message, naming the key or file and what was expected, and exit
with status 2 instead of a traceback. A :class:`NonFiniteLossError` (training diverged) is reported the
same way: its message says at which step and where the last good adapter is. An :class:`OSError` of the
machine's, not mole's, making (disk full, permission denied, a name too long) is one line too, naming
the file (:func:`io_error`, :func:`os_error_line`).
"""

from __future__ import annotations

import errno
import os


class MoleConfigError(ValueError):
    """Bad configuration or input; the message names the config key or file and what was expected."""


class NonFiniteLossError(RuntimeError):
    """The training loss (or the gradient norm) became NaN or infinite; the message says at which step."""


class MoleIOError(OSError):
    """Reading or writing a file failed for a reason outside mole (disk full, permissions); names the file."""


#: The errors the command lines report as one line (exit status 2) instead of a traceback.
USER_ERRORS: tuple[type[Exception], ...] = (MoleConfigError, NonFiniteLossError, MoleIOError)

#: ``errno`` values that are the machine's state, not a bug: reported as one line naming the file.
IO_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENAMETOOLONG,
                       errno.EIO, errno.EMFILE, errno.ENFILE, errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.EEXIST})
_HINTS = {errno.ENOSPC: "free some space and run again", errno.EDQUOT: "free some space and run again",
          errno.ENAMETOOLONG: "a file or directory name may have at most 255 bytes; choose a shorter one",
          errno.EACCES: "check the file's permissions", errno.EROFS: "choose a writable place",
          errno.EEXIST: "a file stands where a directory is needed", errno.ENOTDIR: "a file stands where a directory "
          "is needed"}
# what the Rust writer of safetensors says for the same failures (it raises its own SafetensorError)
_RUST_IO = (("No space left", errno.ENOSPC), ("StorageFull", errno.ENOSPC), ("Permission denied", errno.EACCES),
            ("QuotaExceeded", errno.EDQUOT), ("ReadOnlyFilesystem", errno.EROFS))


def _errno_of(err: BaseException) -> int | None:
    if isinstance(err, OSError) and err.errno is not None:
        return err.errno
    text = str(err)
    return next((code for needle, code in _RUST_IO if needle in text), None)


def io_error(path: str | os.PathLike, err: BaseException, doing: str = "write") -> MoleIOError:
    """A :class:`MoleIOError` for ``err`` (an OSError or a safetensors I/O error) while ``doing`` ``path``."""
    code = _errno_of(err)
    reason = os.strerror(code) if code is not None else error_line(err)
    hint = _HINTS.get(code)
    return MoleIOError(code or 0, f"cannot {doing} {os.fspath(path)}: {reason}" + (f"; {hint}" if hint else ""))


def os_error_line(err: BaseException) -> str | None:
    """The one line for an OSError of the machine's making (:data:`IO_ERRNOS`), naming its file; else None."""
    if isinstance(err, MoleIOError):
        return str(err)
    if not isinstance(err, OSError) or err.errno not in IO_ERRNOS:
        return None
    name = err.filename if err.filename is not None else "a file"
    hint = _HINTS.get(err.errno)
    return f"{name}: {os.strerror(err.errno)}" + (f"; {hint}" if hint else "")


def error_line(err: BaseException) -> str:
    """One line describing ``err``: a user error's own message, else ``Type: first line of the message``."""
    if isinstance(err, MoleIOError):
        return " ".join(err.strerror.split("\n")) if err.strerror else str(err)
    if isinstance(err, USER_ERRORS):
        return " ".join(str(err).split("\n"))
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
