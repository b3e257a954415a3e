"""Experiment trackers (TensorBoard, Weights & Biases) through Accelerate, and routing statistics.

Opt-in with ``trainer.log_with=[tensorboard]`` / ``[wandb]``; ``metrics.json`` is written either way.
Logged per step: ``loss``, ``lm_loss``, ``aux/<name>`` (unweighted), ``lr``; per evaluation
``val/loss``; every ``trainer.log_every`` steps the routing statistics below. The hyper-parameters the
trackers store are the resolved config with its secrets redacted (:mod:`mole.utils.secrets`).

W&B runs offline (``WANDB_MODE=offline``, files under ``RUN_DIR/wandb``, no account) unless the user
sets ``WANDB_MODE``; syncing uses ``WANDB_API_KEY`` from the environment, never a config value.

Routing statistics, per decoder layer ``l`` averaged over its routers and over real (non-padding)
tokens (in nats; ``0 <= H <= log E``):

* ``routing/balance_entropy/layer_l`` — ``H(mean_t g_t)``: the entropy of the average gate vector, high
  when the experts share the load evenly (the balance the auxiliary loss aims at).
* ``routing/certainty_entropy/layer_l`` — ``mean_t H(g_t)``: the average per-token gate entropy, low
  when each token's routing is confident (DynMoLE's router-certainty view).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from mole.routers.base import RouterOutput
from mole.routers.select import balance_and_certainty
from mole.utils.errors import MoleConfigError
from mole.utils.secrets import redact

_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


def check_trackers(log_with: list[str]) -> None:
    """Each requested tracker's package is installed, or one line naming the extra to install."""
    for name in log_with:
        module, extra = _PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise MoleConfigError(
                f"trainer.log_with: {name} is not installed; pip install 'mole[{extra}]' (or pip install {module})"
            )


def flat_hparams(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config, secrets redacted, flattened to ``a/b/c: scalar`` (what TensorBoard's hparams take)."""
    clean, _ = redact(OmegaConf.to_container(cfg, resolve=True))
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}/{k}" if prefix else str(k))
        elif isinstance(node, (bool, int, float, str)):
            out[prefix] = node
        else:  # lists, None
            out[prefix] = str(node)

    walk(clean, "")
    return out


def start_trackers(accelerator, cfg: DictConfig, args, run_dir: Path) -> None:
    """``accelerator.init_trackers`` with the redacted config; W&B offline unless ``WANDB_MODE`` is set."""
    if not args.log_with:
        return
    check_trackers(args.log_with)
    init_kwargs: dict[str, dict] = {}
    if "wandb" in args.log_with:
        os.environ.setdefault("WANDB_MODE", "offline")
        # x_disable_meta: no command line, host or git metadata (the command line may carry secrets)
        init_kwargs["wandb"] = {"dir": str(run_dir), "name": Path(run_dir).name, "settings": {"x_disable_meta": True}}
    accelerator.init_trackers(args.tracker_project, config=flat_hparams(cfg), init_kwargs=init_kwargs)


# ---------------------------------------------------------------------------------------------------
# routing statistics


def _entropies(gates: Tensor, mask: Tensor) -> Tensor:
    """``[H(mean_t g_t), mean_t H(g_t)]`` over the masked rows of ``gates`` (N, E); fp32, no grad."""
    g = gates.detach().float()[mask]  # (n, E), real tokens only
    if g.shape[0] == 0:
        return torch.zeros(2)
    return torch.stack(balance_and_certainty(g)).cpu()


class RoutingMonitor:
    """Per-layer routing statistics from the :class:`RouterOutput` list of a forward pass.

    Called as ``loss_step``'s ``on_routing`` hook on logging steps; :meth:`pop` returns the statistics
    averaged over the step's micro-batches and over processes.

    Args:
        routers_per_layer: routed MoLE layers in each decoder layer, in forward order (from the
            injection report); a forward pass yields their outputs layer by layer.
    """

    def __init__(self, routers_per_layer: list[int]):
        self.routers_per_layer = list(routers_per_layer)
        self._sum: Tensor | None = None  # (L, 2)
        self._count = 0

    @property
    def active(self) -> bool:
        return sum(self.routers_per_layer) > 0

    def __call__(self, routing: list[RouterOutput], token_mask: Tensor) -> None:
        if not routing:
            return
        if len(routing) != sum(self.routers_per_layer):  # unexpected order: one pooled "layer"
            groups = [routing]
        else:
            groups, start = [], 0
            for n in self.routers_per_layer:
                groups.append(routing[start : start + n])
                start += n
        rows = [
            torch.stack([_entropies(out.gates, token_mask) for out in group]).mean(dim=0) if group else torch.full((2,), float("nan"))
            for group in groups
        ]
        stats = torch.stack(rows)  # (L, 2)
        self._sum = stats if self._sum is None else self._sum + stats
        self._count += 1

    def pop(self, accelerator) -> dict[str, float]:
        """The accumulated statistics as tracker scalars (empty if nothing was collected); resets."""
        if self._sum is None:
            return {}
        stats = self._sum / self._count  # (L, 2)
        self._sum, self._count = None, 0
        if accelerator is not None and accelerator.num_processes > 1:
            stats = accelerator.reduce(stats.to(accelerator.device), reduction="mean").cpu()
        out: dict[str, float] = {}
        routed = ~torch.isnan(stats[:, 0])
        for kind, col in (("balance_entropy", 0), ("certainty_entropy", 1)):
            for layer in torch.nonzero(routed).flatten().tolist():
                out[f"routing/{kind}/layer_{layer:02d}"] = float(stats[layer, col])
            out[f"routing/{kind}/mean"] = float(stats[routed, col].mean())
        return out
