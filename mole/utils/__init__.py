from mole.utils.errors import MoleConfigError

__all__ = ["MoleConfigError"]
