"""Keep secrets out of run directories and logs.

A config key *looks like a secret* when its last component (lower-cased, ``-`` read as ``_``) contains
one of :data:`_SECRET_WORDS` (``api_key``, ``password``, ``secret``, ``private_key``, ``access_key``,
``passphrase``, ...), or is ``token`` or a credential's ``*_token`` (``hf_token``, ``access_token``,
``oauth_token``, ``hf_auth_token``, ``sas_token``, ...: a ``_``-part before ``_token`` is one of
:data:`_TOKEN_PREFIXES`). Other ``*_token`` keys name tokens of a vocabulary (``pad_token``, HMoRA's
``init_token``) and are left alone. Their values are replaced by :data:`REDACTED` wherever mole writes
a config (``config.yaml``, Hydra's ``.hydra/`` files, tracker hyper-parameters, run-directory names),
and in every error message and log line (:func:`redact_text`, :class:`RedactFilter`): the whole value,
quoted or not, spaces and commas included. ``null`` and empty values are left as they are.

Secrets belong in the environment (``WANDB_API_KEY``, ``HF_TOKEN``), not in the config.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

REDACTED = "<redacted>"

_SECRET_WORDS = ("api_key", "apikey", "password", "passwd", "passphrase", "secret", "credential", "private_key",
                 "access_key", "auth_key", "signing_key", "encryption_key", "ssh_key")
# `<prefix>_token` keys that hold credentials (anything else ending in _token is a vocabulary token)
_TOKEN_PREFIXES = frozenset(("hf", "huggingface", "hub", "access", "auth", "oauth", "api", "wandb", "github", "gh",
                             "bearer", "refresh", "session", "private", "personal", "user", "slack", "openai", "sas",
                             "id", "jwt", "csrf", "client", "bot", "app", "service"))
_KEY = r"[+~]{0,2}[A-Za-z0-9_.\-/@]+"
# `key=value` in override text: Hydra's override string (`a.b=1,c.api_key=xyz`), a list of overrides
# (`['+x.api_key="A B,C"', 'seed=1']`), a command line. A quoted value runs to its closing quote; a bare one
# to the next `,key=` / ` key=`, a quote that closes a list item, or the end of the line.
_OVERRIDE = re.compile(
    rf"(?P<key>{_KEY})=(?P<value>\"(?:[^\"\\\n]|\\.)*(?:\"|$)|'(?:[^'\\\n]|\\.)*(?:'|$)"
    rf"|.*?(?=,{_KEY}=|\s+['\"]?{_KEY}=|['\"]\s*[,\])]|['\"](?=\s|$)|\n|$))",
    re.MULTILINE,
)


def is_secret_key(key: str) -> bool:
    """Whether a config key (dotted or not) names a secret, by its last component."""
    name = str(key).rsplit(".", 1)[-1].strip().strip("'\"").lower().replace("-", "_")
    if any(word in name for word in _SECRET_WORDS):
        return True
    return name == "token" or (name.endswith("_token") and bool(set(name[: -len("_token")].split("_")) & _TOKEN_PREFIXES))


def _holds_value(value: Any) -> bool:
    return value is not None and value != ""


def redact(data: Any, prefix: str = "") -> tuple[Any, dict[str, Any]]:
    """A copy of a plain container (dicts, lists, scalars) with secret-looking keys' values redacted.

    Returns:
        ``(redacted copy, {dotted key: original value})``; the second lets a launcher hand the values
        to its worker processes through the environment instead of a file.
    """
    found: dict[str, Any] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                key = f"{path}.{k}" if path else str(k)
                if is_secret_key(str(k)) and _holds_value(v) and not isinstance(v, (dict, list)):
                    found[key] = v
                    out[k] = REDACTED
                else:
                    out[k] = walk(v, key)
            return out
        if isinstance(node, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(node)]
        if isinstance(node, str):
            return redact_overrides(node)
        return node

    return walk(data, prefix), found


def redact_overrides(text: str, replacement: str = REDACTED) -> str:
    """Redact the values of secret-looking keys in override text (``a=1,x.api_key=abc`` -> ``...=<redacted>``).

    The whole value goes: quoted (``x.api_key="A B,C"``) or bare with spaces and commas (``x.api_key=A B,C``
    in Hydra's ``override_dirname``), up to the next ``key=`` item.
    """

    def sub(m: re.Match) -> str:
        if is_secret_key(m.group("key").lstrip("+~")) and m.group("value").strip("'\""):
            return f"{m.group('key')}={replacement}"
        return m.group(0)

    return _OVERRIDE.sub(sub, text) if "=" in text else text


def redact_text(text: str) -> str:
    """Any text mole prints or logs (an error line, a log message) with secret values in it redacted."""
    return redact_overrides(text)


class RedactFilter(logging.Filter):
    """A logging filter that redacts secrets in every record it passes (installed on mole's log handlers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "=" in message:
            clean = redact_text(message)
            if clean != message:
                record.msg, record.args = clean, None
        return True


class RedactingStream:
    """A text stream that redacts secrets in what is written through it (for ``sys.stderr``: Hydra prints
    ``Error executing job with overrides: [...]`` there itself)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact_text(text) if "=" in text else text)
        return len(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextlib.contextmanager
def redacted_stderr():
    """Redact secrets in everything written to ``sys.stderr`` inside the block."""
    saved = sys.stderr
    sys.stderr = RedactingStream(saved)
    try:
        yield
    finally:
        sys.stderr = saved


def redact_yaml_file(path: Path) -> None:
    """Rewrite a YAML file (Hydra's ``.hydra/*.yaml``) with its secrets redacted; untouched if it has none."""
    path = Path(path)
    if not path.is_file():
        return
    data = yaml.safe_load(path.read_text())
    clean, found = redact(data)
    if found or clean != data:
        path.write_text(yaml.safe_dump(clean, sort_keys=False))


def _redacted(cfg) -> tuple[str, dict[str, Any]]:
    """A resolved OmegaConf config as YAML text with its secrets redacted, and the redacted values."""
    clean, found = redact(OmegaConf.to_container(cfg, resolve=True))
    return OmegaConf.to_yaml(OmegaConf.create(clean)), found


def redacted_yaml(cfg) -> str:
    """A resolved OmegaConf config as YAML text, its secrets redacted (what run directories may hold)."""
    return _redacted(cfg)[0]


def write_config(cfg, path: Path) -> dict[str, Any]:
    """Write a resolved OmegaConf config as YAML with its secrets redacted; return the redacted values."""
    text, found = _redacted(cfg)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return found
