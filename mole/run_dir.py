"""The run directory: its file names, atomic writes, its status, and who may write into it.

A run directory holds what one ``mole-train`` run wrote:

=======================  ==================================================================================
``config.yaml``          the resolved config, secrets redacted (:data:`CONFIG_FILE`)
``metrics.json``         the run's record and status (:data:`METRICS_FILE`, see :func:`run_status`)
``adapter.safetensors``  the trained weights and what made them (:mod:`mole.model.state`)
``checkpoints/``         resumable checkpoints (:mod:`mole.training.checkpoint`)
``error.txt``            a failed run's traceback (:mod:`mole.training.failures`)
``.mole-lock``           the run's exclusive lock; ``.mole-owner.json`` says who holds it
=======================  ==================================================================================

**Status.** ``metrics.json`` says ``status``: ``running`` (written when a run starts), ``finished``,
``failed`` or ``interrupted``, with the booleans ``finished`` / ``failed`` / ``interrupted`` that older
readers use. :func:`run_status` reads it: a ``running`` record whose process is gone (killed without a
word) reads as ``interrupted``, and a directory whose lock is held reads as ``running`` whatever the file says.

**Lock.** A run holds :class:`RunLock` (an OS file lock through ``filelock``; the kernel drops it when the
process dies, so a killed run leaves no stale lock) from before it looks at the directory until it ends. A
second process on the same directory stops at once with one line naming the directory and the holder's pid.
A process that starts others for the same run (``accelerate launch``) hands the lock down through
:data:`LOCK_ENV`. Removing anything a run did not write itself (old checkpoints) needs the lock
(:func:`holds_lock`).

**Reuse.** A directory that holds a finished run is skipped when the new config is the same, refused when it
differs (naming the differing keys), and trained over with ``force=true`` (:func:`finished_run`). A key the
stored config lacks (written before the key existed) is the same as the value the code takes in its absence
(:func:`mole.config_schema.absent_defaults`).

**Remote code.** :func:`load_run_config` never takes ``model.trust_remote_code`` from a stored config: the
caller passes what its own command line said, and a stored config that asks for remote code is refused.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from omegaconf import DictConfig, OmegaConf

from mole.config_schema import absent_defaults, check_run_config, current_layout, upgrade_config
from mole.utils.errors import MoleConfigError, io_error
from mole.utils.secrets import is_secret_key, redacted_yaml

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
LOCK_FILE = ".mole-lock"
OWNER_FILE = ".mole-owner.json"
#: ``<pid>:<run directory>``: set by a process holding a run's lock for the processes it starts for that run
LOCK_ENV = "MOLE_RUN_LOCK"

RUNNING, FINISHED, FAILED, INTERRUPTED = "running", "finished", "failed", "interrupted"
STATUSES = (RUNNING, FINISHED, FAILED, INTERRUPTED)

#: Config keys that may differ between a finished run and a new one that is still "the same run": they
#: change neither the training nor its evaluation.
RERUN_IGNORED_KEYS = ("force", "trainer.resume", "trainer.save_every", "trainer.keep_checkpoints",
                      "trainer.log_every", "paths.", "sweep_root", "model.cache_dir")


# ---------------------------------------------------------------------------------------------------
# files


def write_text(path: str | Path, text: str) -> None:
    """Write ``path`` atomically: a temporary file of this process renamed into place."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as err:  # disk full, no permission: one line, and no half-written file left behind
        raise io_error(path, err) from None
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2, default=str))


def read_metrics(run_dir: str | Path) -> dict[str, Any] | None:
    """``metrics.json`` as a dict; ``None`` when it is missing or unreadable."""
    path = Path(run_dir) / METRICS_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def with_status(metrics: dict[str, Any], status: str) -> dict[str, Any]:
    """``metrics`` with ``status`` and the booleans older readers use (``finished``, ``failed``, ``interrupted``)."""
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    out = {k: v for k, v in metrics.items() if k not in ("failed", "interrupted")}
    out.update(status=status, finished=status == FINISHED)
    if status in (FAILED, INTERRUPTED):
        out[status] = True
    return out


def is_finished(run_dir: str | Path) -> bool:
    return bool((read_metrics(run_dir) or {}).get("finished"))


def run_status(run_dir: str | Path) -> str | None:
    """``running``, ``finished``, ``failed``, ``interrupted``, or ``None`` when no run has recorded anything."""
    if lock_holder(run_dir) is not None:
        return RUNNING
    metrics = read_metrics(run_dir)
    if metrics is None:
        return None
    if metrics.get("finished"):
        return FINISHED
    if metrics.get("interrupted"):
        return INTERRUPTED
    if metrics.get("failed"):
        return FAILED
    return INTERRUPTED  # a run that started and left no end record: its process was killed


# ---------------------------------------------------------------------------------------------------
# the lock

_HELD: set[Path] = set()  # run directories whose lock this process holds


class RunDirectoryBusy(MoleConfigError):
    """Another process holds the run directory's lock."""


def _key(run_dir: str | Path) -> Path:
    return Path(run_dir).resolve()


def _owner(run_dir: str | Path) -> dict[str, Any]:
    try:
        data = json.loads((Path(run_dir) / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _lock_env_pid(run_dir: str | Path) -> int | None:
    """The pid in :data:`LOCK_ENV` when it names this run directory."""
    raw = os.environ.get(LOCK_ENV, "")
    pid, _, path = raw.partition(":")
    if not pid.isdigit() or not path or Path(path).resolve() != _key(run_dir):
        return None
    return int(pid)


def holds_lock(run_dir: str | Path) -> bool:
    """Whether this process holds ``run_dir``'s lock, itself or through the process that started it."""
    if _key(run_dir) in _HELD:
        return True
    pid = _lock_env_pid(run_dir)
    return pid is not None and _owner(run_dir).get("pid") == pid and lock_holder(run_dir) is not None


def lock_holder(run_dir: str | Path) -> dict[str, Any] | None:
    """Who holds ``run_dir``'s lock (``{"pid", "host", ...}``, as much as is known), or ``None`` when nobody does."""
    if _key(run_dir) in _HELD:
        return {"pid": os.getpid(), "host": socket.gethostname()}
    if not (Path(run_dir) / LOCK_FILE).is_file():
        return None

    probe = FileLock(str(Path(run_dir) / LOCK_FILE), timeout=0)
    try:
        probe.acquire()
    except Timeout:
        return _owner(run_dir) or {"pid": None}
    except OSError:  # a file system without locks: nobody can hold one
        return None
    probe.release()
    return None


class RunLock:
    """The exclusive lock of a run directory, held for the whole run (a context manager).

    Raises :class:`RunDirectoryBusy` (a one-line user error) when another process holds it. On a file
    system that has no locks the run goes on unprotected, with a warning.
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self._lock = None
        self._held = False

    def acquire(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.run_dir / LOCK_FILE), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            owner = _owner(self.run_dir)
            who = f"pid {owner['pid']}" if owner.get("pid") else "a process that has not yet said its pid"
            if owner.get("host") and owner.get("host") != socket.gethostname():
                who += f" on {owner['host']}"
            raise RunDirectoryBusy(
                f"run directory {self.run_dir} is in use by another mole run ({who}); wait for it to end, "
                "or give this run another directory (hydra.run.dir=DIR)"
            ) from None
        except (OSError, NotImplementedError) as err:
            log.warning("cannot lock %s (%s): this run is not protected against a second one on the same directory",
                        self.run_dir, err)
            lock = None
        self._lock, self._held = lock, True
        _HELD.add(_key(self.run_dir))
        write_json(self.run_dir / OWNER_FILE, {"pid": os.getpid(), "host": socket.gethostname(),
                                               "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        return self

    def release(self) -> None:
        if not self._held:
            return
        _HELD.discard(_key(self.run_dir))
        (self.run_dir / OWNER_FILE).unlink(missing_ok=True)
        if self._lock is not None:
            self._lock.release()
        self._lock, self._held = None, False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def handed_down_env(run_dir: str | Path) -> dict[str, str]:
    """The environment entry that hands this process's lock of ``run_dir`` to the processes it starts for the run."""
    return {LOCK_ENV: f"{os.getpid()}:{_key(run_dir)}"} if _key(run_dir) in _HELD else {}


def lock_run(run_dir: str | Path) -> RunLock | None:
    """:class:`RunLock` for a run's main process, or ``None`` when the lock is already this process's (a
    worker started by the process that holds it, or a run inside another that holds it)."""
    return None if holds_lock(run_dir) else RunLock(run_dir)


# ---------------------------------------------------------------------------------------------------
# configs


def config_differences(saved: DictConfig, current: DictConfig, ignored: tuple[str, ...] = (),
                       defaults: dict[str, Any] | None = None) -> list[str]:
    """Dotted keys whose (resolved) values differ, except ``ignored`` ones (``"a.b"`` a key, ``"a."`` a subtree).
    Both configs are read in the current layout of the config tree (:func:`~mole.config_schema.current_layout`).

    ``defaults``: ``{key: value}`` for keys whose absence means that value (a config written before the key
    existed): absent on one side and that value on the other is no difference.
    """

    def flat(node, prefix="") -> dict[str, Any]:
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                out.update(flat(v, f"{prefix}{k}."))
            return out
        return {prefix[:-1]: node}

    a = flat(OmegaConf.to_container(current_layout(saved), resolve=True))
    b = flat(OmegaConf.to_container(current_layout(current), resolve=True))
    for key, value in (defaults or {}).items():
        if (key in a) != (key in b):
            a.setdefault(key, value)
            b.setdefault(key, value)
    keys = sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))
    return [k for k in keys if not any(k == i or (i.endswith(".") and k.startswith(i)) for i in ignored)]


def finished_run(run_dir: str | Path, cfg: DictConfig) -> dict[str, Any] | None:
    """The metrics of a finished run in ``run_dir`` made with ``cfg``'s settings (the caller skips the run).

    ``None`` when there is no finished run there, or ``force=true`` asks to train over it. A finished run
    made with another config is an error naming the keys that differ (secrets are not compared).
    """
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    if not metrics or not metrics.get("finished") or cfg.get("force", False):
        return None
    hint = "give this run another directory (hydra.run.dir=DIR), or train over it with force=true"
    try:
        saved = OmegaConf.load(run_dir / CONFIG_FILE)  # compared in today's layout (config_differences)
    except Exception as err:  # noqa: BLE001 - a missing file or a YAML error, in their many types
        raise MoleConfigError(f"{run_dir} holds a finished run whose {CONFIG_FILE} cannot be read to compare with "
                              f"this config ({type(err).__name__}); {hint}") from None

    current = OmegaConf.create(redacted_yaml(cfg))
    differences = [k for k in config_differences(saved, current, RERUN_IGNORED_KEYS, absent_defaults())
                   if not is_secret_key(k)]  # credentials change nothing a run computes
    if differences:
        shown = ", ".join(differences[:8]) + (f" and {len(differences) - 8} more" if len(differences) > 8 else "")
        raise MoleConfigError(f"{run_dir} holds a finished run of another config (differs at {shown}); {hint}")
    return metrics


def load_run_config(checkpoint: str | Path, *, trust_remote_code: bool = False, own_run: bool = False) -> DictConfig:
    """A run directory's ``config.yaml``, checked.

    Args:
        trust_remote_code: what the current command line says about ``model.trust_remote_code``; it replaces
            the stored value, and a stored ``true`` without it is refused.
        own_run: keep the stored value instead: only for the processes of the run that wrote the file
            (``accelerate launch`` workers reading what their ``mole-train`` wrote).
    """
    run_dir = Path(checkpoint)
    path = run_dir / CONFIG_FILE
    try:
        run_dir.stat()
    except OSError as err:  # a name too long, no permission: say so rather than "not a directory"
        if err.errno not in (errno.ENOENT, errno.ENOTDIR):
            raise MoleConfigError(f"checkpoint={str(run_dir)!r} cannot be opened: {os.strerror(err.errno)}") from None
    if not run_dir.is_dir():
        raise MoleConfigError(f"checkpoint={str(run_dir)!r} is not a directory (expected a mole-train run directory)")
    if not path.is_file():
        raise MoleConfigError(f"checkpoint: {path} not found (expected a run directory written by mole-train)")
    try:
        cfg = OmegaConf.load(path)
    except OSError as err:
        raise io_error(path, err, "read") from None
    except Exception as err:  # noqa: BLE001 - yaml errors come in many types
        raise MoleConfigError(f"checkpoint: {path} is not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(cfg, DictConfig) or not isinstance(cfg.get("model"), DictConfig):
        raise MoleConfigError(f"checkpoint: {path} is not a mole run config (no `model` key)")

    cfg = upgrade_config(cfg)  # a file just read: upgraded in place
    check_run_config(cfg, path)
    if own_run:
        return cfg
    stored = cfg.model.get("trust_remote_code", False)
    if stored is not False and stored is not None and not trust_remote_code:
        raise MoleConfigError(
            f"checkpoint: {path} sets model.trust_remote_code={str(stored).lower()}; a run directory cannot make mole run code. "
            f"If you trust model.hf_id={cfg.model.get('hf_id')!r}, say so on this command line: trust_remote_code=true"
        )
    if trust_remote_code or "trust_remote_code" in cfg.model:
        cfg.model.trust_remote_code = bool(trust_remote_code)
    return cfg


def check_trust_flag(value: Any, key: str = "trust_remote_code") -> bool:
    """A command line's ``trust_remote_code`` value: true or false."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise MoleConfigError(f"{key} must be true or false, got {value!r}")
