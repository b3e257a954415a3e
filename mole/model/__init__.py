"""The model side: base models, MoLE injection, the MoLE layer, adapter checkpoints."""

from mole.model.base import build_model, build_skeleton
from mole.model.inject import decoder_layers, inject_mole, mole_layers
from mole.model.layer import MoLELinear
from mole.model.routing import collect_routing
from mole.model.state import load_adapter, save_adapter, trainable_state_dict

__all__ = [
    "MoLELinear",
    "build_model",
    "build_skeleton",
    "collect_routing",
    "decoder_layers",
    "inject_mole",
    "load_adapter",
    "mole_layers",
    "save_adapter",
    "trainable_state_dict",
]
