"""mole: Mixtures of LoRA Experts and their relatives, fine-tuned through one Hydra-configured tool."""

from pathlib import Path

__version__ = "0.1.0"

# The Hydra config tree lives at the repository root (conf/), beside this package; mole is used as an
# editable install so the path resolves to the checkout. Hydra accepts an absolute config_path.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

from mole.config import register_resolvers as _register_resolvers  # noqa: E402

_register_resolvers()
