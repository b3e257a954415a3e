"""The class or function a ``_target_`` config node names (routers, adapters and losses declare what they need
on it: :mod:`mole.routers.base`, :mod:`mole.adapters.kinds`)."""

from __future__ import annotations

from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig

from mole.utils.errors import MoleConfigError


def target_of(node: Any, key: str, group: str) -> Any:
    """The class or function ``node._target_`` names (``key``: where the node sits, e.g. ``router``; ``group``:
    the config group to choose a file from)."""
    if not isinstance(node, DictConfig) or "_target_" not in node:
        raise MoleConfigError(f"{key}: missing _target_ (choose a file from conf/{group}/)")
    try:
        return get_object(node._target_)
    except Exception as err:  # noqa: BLE001 - import and attribute errors come in many types
        raise MoleConfigError(f"{key}._target_={node._target_!r} cannot be imported: {err}") from None
