"""Adapter-only checkpoints: the trainable (``mole_``) parameters in one safetensors file.

Only safetensors is read or written; nothing is unpickled.

The file says what made it, in safetensors' header metadata (strings; the structured ones JSON):
``method``, ``router``, ``experts`` and ``adapter`` (the resolved config groups), ``base_model`` (its
name) and ``base_shape`` (layers, widths, vocabulary), and ``mole_version``. A model built from a config
carries the same fields (``model.mole_adapter_metadata``, set by :func:`mole.build.build_mole_model`);
:func:`load_adapter` refuses a file whose fields differ from the model's, naming the first differing key,
and a file with non-finite weights. A file without these fields (written before they existed) still
loads, with a warning that it cannot be checked.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

import mole
from mole.model.inject import is_trainable_name
from mole.utils.errors import MoleConfigError, io_error

log = logging.getLogger(__name__)

ADAPTER_FILE = "adapter.safetensors"
FORMAT = "mole-adapter-v1"
FULL_FINETUNE_ATTR = "_mole_full_finetune"  # set on a model whose every parameter trains and is saved (full fine-tuning)
#: the metadata fields compared on loading, in the order a mismatch is reported
CHECKED_FIELDS = ("method", "base_model", "base_shape", "adapter", "experts", "router")
_SHAPE_KEYS = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
               "num_key_value_heads", "vocab_size")


def adapter_metadata(cfg, model: nn.Module) -> dict[str, str]:
    """The header metadata of an adapter trained from ``cfg`` (a composed ``train`` config) on ``model``."""
    def group(name: str) -> Any:
        node = cfg.get(name)
        return OmegaConf.to_container(node, resolve=True) if node is not None else None

    hf = getattr(model, "config", None)
    shape = {k: getattr(hf, k, None) for k in _SHAPE_KEYS}
    fields = {"method": cfg.get("method_name"), "base_model": cfg.model.get("name"), "base_shape": shape,
              "adapter": group("adapter"), "experts": group("experts"), "router": group("router")}
    return {"format": FORMAT, "mole_version": mole.__version__,
            **{k: json.dumps(v, sort_keys=True, default=str) for k, v in fields.items()}}


def _flat(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}.{k}"))
        return out
    return {prefix: value}


def _training_only(key: str) -> bool:
    """Keys that change how an adapter trains, not what its weights mean (dropout) or how it is built (_partial_)."""
    last = key.rsplit(".", 1)[-1]
    return "dropout" in last or last == "_partial_"


def metadata_mismatch(stored: dict[str, str], expected: dict[str, str]) -> tuple[str, Any, Any] | None:
    """The first checked key where an adapter file's metadata and a model's differ: ``(key, file's, model's)``."""
    for field in CHECKED_FIELDS:
        if field not in expected:
            continue
        try:
            have = json.loads(stored.get(field, "null"))
        except ValueError:
            return field, stored.get(field), "JSON"
        want = json.loads(expected[field])
        a, b = _flat(have, field), _flat(want, field)
        for key in sorted(set(a) | set(b), key=lambda k: (k.count("."), k)):
            if not _training_only(key) and a.get(key, "<unset>") != b.get(key, "<unset>"):
                return key, a.get(key, "<unset>"), b.get(key, "<unset>")
    return None


def saves_everything(model: nn.Module) -> bool:
    """Whether ``model`` was built for full fine-tuning (its checkpoint holds every parameter)."""
    return bool(getattr(model, FULL_FINETUNE_ATTR, False))


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The saved parameters: the ``mole_`` ones, or every parameter under full fine-tuning.

    ``named_parameters`` lists a shared (tied) parameter once, so no two entries share storage.
    """
    everything = saves_everything(model)
    return {n: p.detach() for n, p in model.named_parameters() if everything or is_trainable_name(n)}


def _metadata_of(model: nn.Module) -> dict[str, str] | None:
    """The metadata a built model carries (also through a DDP / DeepSpeed wrapper's ``module``)."""
    return getattr(model, "mole_adapter_metadata", None) or getattr(getattr(model, "module", None),
                                                                   "mole_adapter_metadata", None)


def save_adapter(model: nn.Module, path: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the trainable weights to ``path`` atomically (a temp file renamed into place).

    ``state``: a full state dict to take them from instead of the model (gathered from a sharded model).
    """
    path = Path(path)
    source = trainable_state_dict(model) if state is None else {n: t for n, t in state.items() if is_trainable_name(n)}
    state = {n: t.detach().contiguous().cpu() for n, t in source.items()}
    metadata = _metadata_of(model) or {"format": FORMAT}
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(state, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    except (OSError, SafetensorError) as err:  # disk full, no permission: no half-written file left behind
        tmp.unlink(missing_ok=True)
        raise io_error(path, err) from None
    return path


def load_adapter(model: nn.Module, path: str | Path) -> None:
    """Load an adapter file into a model built with the same method; every key must match.

    The file's metadata must match the model's (see the module docstring) and its weights be finite.
    """
    path = Path(path)
    if not path.is_file():
        raise MoleConfigError(f"{path}: adapter file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
    except (SafetensorError, OSError, ValueError) as err:
        raise MoleConfigError(f"{path}: not a readable safetensors file ({err})") from None
    expected = _metadata_of(model)
    if "mole_version" not in stored:
        log.warning("%s has no metadata saying what made it (written by an older mole): it cannot be checked "
                    "against the run's config", path)
    elif expected:
        found = metadata_mismatch(stored, expected)
        if found is not None:
            key, have, want = found
            raise MoleConfigError(
                f"{path}: adapter does not match the run's config: made with {key}={have}, the config has "
                f"{key}={want} (was it trained with another method or model?)"
            )
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise MoleConfigError(f"{path}: {name} holds NaN or infinite values; the adapter is unusable "
                                  "(did its run diverge? see its metrics.json)")
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
