"""mole: Mixtures of LoRA Experts and their relatives, fine-tuned through one Hydra-configured tool."""

from pathlib import Path

__version__ = "0.1.0"


def _conf_dir() -> str:
    """The Hydra config tree: ``mole/conf/`` in an installed wheel, else ``conf/`` beside the package (a
    source checkout or an editable install). Hydra takes the absolute path as ``config_path``."""
    package = Path(__file__).resolve().parent
    installed = package / "conf"
    return str(installed if (installed / "train.yaml").is_file() else package.parent / "conf")


CONF_DIR = _conf_dir()

from mole.config import register_resolvers as _register_resolvers  # noqa: E402

_register_resolvers()
