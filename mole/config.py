"""Config helpers: the OmegaConf resolvers the config tree uses, and composition outside a Hydra app.

Resolvers (registered when :mod:`mole` is imported):

* ``${mole_fixture:NAME}`` — absolute path of a fixture shipped in ``mole/data/fixtures/``.
* ``${mole_slug:TEXT}`` — a run-directory name from Hydra's override string: ``/`` becomes ``_``,
  secret-looking keys' values become ``redacted`` (:mod:`mole.utils.secrets`),
  and an empty string (no overrides) becomes ``default``; a name over 255 bytes (what file systems allow)
  keeps its first bytes and ends with a digest of the whole.
* ``${mul:A,B}`` — A * B, for shapes derived from other keys.
* ``${mole_writer:VALUE,OTHERWISE}`` — ``VALUE``, or ``OTHERWISE`` in a process that must not write the run
  directory: a SLURM task other than task 0, a rank other than 0 (:func:`mole.utils.slurm.writer_value`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from mole.utils.secrets import redact_overrides
from mole.utils.slurm import writer_value

MAX_NAME_BYTES = 255


def _conf_dir() -> str:
    """The Hydra config tree: ``mole/conf/`` in an installed wheel, else ``conf/`` beside the package (a
    source checkout or an editable install). Hydra takes the absolute path as ``config_path``."""
    package = Path(__file__).resolve().parent
    installed = package / "conf"
    return str(installed if (installed / "train.yaml").is_file() else package.parent / "conf")


CONF_DIR = _conf_dir()


def _slug(text: str | None) -> str:
    text = redact_overrides((text or "").strip(), "redacted")  # a secret on the command line never names a directory
    name = text.replace("/", "_").replace(" ", "") or "default"
    if len(name.encode()) > MAX_NAME_BYTES:  # file systems refuse longer names: keep a prefix, add a digest of the rest
        digest = hashlib.sha256(name.encode()).hexdigest()[:16]
        name = name.encode()[: MAX_NAME_BYTES - 17].decode(errors="ignore") + "-" + digest
    return name


def _fixture(name: str) -> str:
    from mole.data.sources import fixture_path  # the package mole.data imports torch: not at `import mole`

    return fixture_path(name)


def _writer(value, otherwise=None):
    return writer_value(value, otherwise)


def register_resolvers() -> None:
    for name, fn in (("mole_slug", _slug), ("mole_fixture", _fixture), ("mul", lambda a, b: a * b),
                     ("mole_writer", _writer)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def compose_config(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with overrides, as the command would, without running an app."""
    register_resolvers()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))
