"""Keep secrets out of run directories and logs.

A config key *looks like a secret* when its last component (lower-cased) contains ``api_key``,
``apikey``, ``password``, ``passwd``, ``secret`` or ``credential``, or is ``token`` or a credential's
``*_token`` (``hf_token``, ``access_token``, ``auth_token``, ``wandb_token``, ...; see
:data:`_TOKEN_PREFIXES`). Other ``*_token`` keys name tokens of a vocabulary (``pad_token``, HMoRA's
``init_token``) and are left alone. Their values are replaced by :data:`REDACTED` wherever mole writes
a config (``config.yaml``, Hydra's ``.hydra/`` files, tracker hyper-parameters, run-directory names).
``null`` and empty values are left as they are: they hold nothing.

Secrets belong in the environment (``WANDB_API_KEY``, ``HF_TOKEN``), not in the config.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

REDACTED = "<redacted>"

_SECRET_WORDS = ("api_key", "apikey", "password", "passwd", "secret", "credential")
# `<prefix>_token` keys that hold credentials (anything else ending in _token is a vocabulary token)
_TOKEN_PREFIXES = ("hf", "huggingface", "hub", "access", "auth", "api", "wandb", "github", "gh", "bearer",
                   "refresh", "session", "private", "personal", "user", "slack", "openai")
# `key=value` items of a Hydra override string (`a.b=1,c.api_key=xyz`)
_OVERRIDE = re.compile(r"(?P<key>[+~]{0,2}[A-Za-z0-9_.\-/@]+)=(?P<value>[^,\s]*)")


def is_secret_key(key: str) -> bool:
    """Whether a config key (dotted or not) names a secret, by its last component."""
    name = str(key).rsplit(".", 1)[-1].strip().lower().replace("-", "_")
    if any(word in name for word in _SECRET_WORDS):
        return True
    return name == "token" or (name.endswith("_token") and name[: -len("_token")] in _TOKEN_PREFIXES)


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
    """Redact the values of secret-looking keys in override text (``a=1,x.api_key=abc`` -> ``...=<redacted>``)."""

    def sub(m: re.Match) -> str:
        if is_secret_key(m.group("key").lstrip("+~")) and m.group("value"):
            return f"{m.group('key')}={replacement}"
        return m.group(0)

    return _OVERRIDE.sub(sub, text) if "=" in text else text


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
    from omegaconf import OmegaConf

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
