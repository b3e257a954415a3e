"""mole: Mixtures of LoRA Experts and their relatives, fine-tuned through one Hydra-configured tool."""

from mole.config import CONF_DIR, register_resolvers

__version__ = "0.1.0"
__all__ = ["CONF_DIR", "__version__"]

register_resolvers()
