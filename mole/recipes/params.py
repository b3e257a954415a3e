"""``mole-params`` as a recipe: the model built on the meta device (no weights, no download), its parameters
counted, and optionally the estimated peak memory of a training step (:mod:`mole.memory`)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from mole.build import build_mole_model, parameter_report
from mole.memory import estimate_memory


def count_parameters(cfg: DictConfig, memory: bool = False) -> dict[str, Any]:
    """``model``, ``method`` and :func:`~mole.build.parameter_report`; with ``memory``, :func:`~mole.memory.estimate_memory`."""
    model, _, report = build_mole_model(cfg, meta=True)
    out = {"model": cfg.model.get("name"), "method": cfg.get("method_name"), **parameter_report(model, report)}
    if memory:
        out["memory"] = estimate_memory(cfg)
    return out
