"""Adapter-only checkpoints: the trainable (``mole_``) parameters in one safetensors file.

Only safetensors is read or written; nothing is unpickled.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mole.model.inject import is_trainable_name
from mole.utils.errors import MoleConfigError, io_error

ADAPTER_FILE = "adapter.safetensors"


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The saved parameters: the ``mole_`` ones, or every parameter under full fine-tuning.

    ``named_parameters`` lists a shared (tied) parameter once, so no two entries share storage.
    """
    from mole.adapters.baselines import saves_everything

    everything = saves_everything(model)
    return {n: p.detach() for n, p in model.named_parameters() if everything or is_trainable_name(n)}


def save_adapter(model: nn.Module, path: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the trainable weights to ``path`` atomically (a temp file renamed into place).

    ``state``: a full state dict to take them from instead of the model (gathered from a sharded model).
    """
    path = Path(path)
    source = trainable_state_dict(model) if state is None else {n: t for n, t in state.items() if is_trainable_name(n)}
    state = {n: t.detach().contiguous().cpu() for n, t in source.items()}
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(state, str(tmp), metadata={"format": "mole-adapter-v1"})
        os.replace(tmp, path)
    except (OSError, SafetensorError) as err:  # disk full, no permission: no half-written file left behind
        tmp.unlink(missing_ok=True)
        raise io_error(path, err) from None
    return path


def load_adapter(model: nn.Module, path: str | Path) -> None:
    """Load an adapter file into a model built with the same method; every key must match."""
    path = Path(path)
    if not path.is_file():
        raise MoleConfigError(f"{path}: adapter file not found")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise MoleConfigError(f"{path}: not a readable safetensors file ({err})") from None
    own = trainable_state_dict(model)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise MoleConfigError(
            f"{path}: adapter does not match the model built from its config "
            f"({len(missing)} missing keys, e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}); "
            "was it trained with another method or model?"
        )
    for name, tensor in state.items():
        if tensor.shape != own[name].shape:
            raise MoleConfigError(
                f"{path}: {name} has shape {tuple(tensor.shape)}, the model expects {tuple(own[name].shape)}; "
                "was it trained with another method or model?"
            )
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, tensor in state.items():
            params[name].copy_(tensor.to(params[name].dtype))
