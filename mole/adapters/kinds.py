"""What an ``adapter`` config asks for: Linear experts, block experts, or a whole-model baseline.

The class named by ``adapter._target_`` says its kind through ``adapter_kind`` (default ``"linear"``):

* ``linear`` (``lora``, ``dora``, ...): one expert set per adapted Linear (``experts.targets``,
  ``experts.single_targets``). May add block experts under ``blocks`` — a mapping name -> block adapter
  config, ``null`` to drop one (MoA: LoRA on q/k/v/o/up + ``blocks.parallel_adapter`` + ``blocks.prompt``).
* ``block`` (``parallel_adapter``, ``prompt``, ``ffn_expert``): experts on whole blocks of each layer. May
  adapt Linears too through ``linear`` (a Linear adapter config; MixLoRA's attention LoRA) and add more
  blocks under ``blocks``; without ``linear``, ``experts.targets`` and ``experts.single_targets`` must be
  empty. ``layers`` (block adapters only) restricts the layers, see :mod:`mole.model.blocks`.
* ``model`` (``full_finetune``, ``prompt_tuning``): applied once to the whole model; nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from mole.utils.errors import MoleConfigError

KINDS = ("linear", "block", "model")
EXTRA_KEYS = ("blocks", "linear", "layers")  # read here, never passed to a constructor


@dataclass
class AdapterPlan:
    """The parts of an ``adapter`` config, each ready for ``_factory``."""

    kind: str
    linear: DictConfig | None = None  # the Linear adapter (experts.targets / single_targets)
    blocks: list[tuple[str, DictConfig, Any]] = field(default_factory=list)  # (key, node, layers)
    model: DictConfig | None = None  # a whole-model baseline


def adapter_kind(node: Any, key: str) -> str:
    """``linear``, ``block`` or ``model``, from the class or function named by ``node._target_``."""
    if not isinstance(node, DictConfig) or "_target_" not in node:
        raise MoleConfigError(f"{key}: missing _target_ (choose a file from conf/adapter/)")
    try:
        target = get_object(node._target_)
    except Exception as err:  # noqa: BLE001 - import and attribute errors come in many types
        raise MoleConfigError(f"{key}._target_={node._target_!r} cannot be imported: {err}") from None
    kind = getattr(target, "adapter_kind", "linear")
    if kind not in KINDS:
        raise MoleConfigError(f"{key}._target_={node._target_!r} has an unknown adapter_kind {kind!r}")
    return kind


def _strip(node: DictConfig) -> DictConfig:
    """The node without the keys read here, interpolations resolved where the node stands."""
    data = OmegaConf.to_container(node, resolve=True)
    return OmegaConf.create({k: v for k, v in data.items() if k not in EXTRA_KEYS})


def plan_adapter(node: DictConfig, targets: list[str], single_targets: list[str]) -> AdapterPlan:
    """Split the ``adapter`` node into its Linear, block and whole-model parts (see the module docstring)."""
    kind = adapter_kind(node, "adapter")
    extra = [k for k in EXTRA_KEYS if node.get(k) is not None]
    if kind == "model":
        if extra:
            raise MoleConfigError(f"adapter._target_={node._target_!r} adapts the whole model; it takes no {extra}")
        if targets or single_targets:
            raise MoleConfigError(
                f"adapter._target_={node._target_!r} adapts the whole model, but experts.targets={targets} / "
                f"experts.single_targets={single_targets} name Linear modules; set them to []"
            )
        return AdapterPlan("model", model=_strip(node))
    plan = AdapterPlan(kind)
    if kind == "linear":
        if node.get("layers") is not None:
            raise MoleConfigError("adapter.layers applies to block adapters (parallel_adapter, prompt, ffn_expert)")
        if node.get("linear") is not None:
            raise MoleConfigError("adapter.linear belongs to block adapters; this adapter is already a Linear one")
        plan.linear = _strip(node)
    else:
        plan.blocks.append(("adapter", _strip(node), node.get("layers")))
        linear = node.get("linear")
        if linear is not None:
            if adapter_kind(linear, "adapter.linear") != "linear":
                raise MoleConfigError("adapter.linear must be a Linear adapter config (e.g. mole.adapters.LoRAExperts)")
            plan.linear = _strip(linear)
        elif targets or single_targets:
            raise MoleConfigError(
                f"adapter._target_={node._target_!r} adapts blocks, not Linears, but experts.targets={targets} / "
                f"experts.single_targets={single_targets} name Linear modules; set them to [] or give "
                "adapter.linear (a Linear adapter config) to adapt them too"
            )
    blocks = node.get("blocks")
    if blocks is not None:
        if not isinstance(blocks, DictConfig):
            raise MoleConfigError("adapter.blocks must map names to block adapter configs (null drops one)")
        for name, sub in blocks.items():
            if sub is None:
                continue
            key = f"adapter.blocks.{name}"
            if adapter_kind(sub, key) != "block":
                raise MoleConfigError(f"{key}: _target_ must be a block adapter (parallel_adapter, prompt, ffn_expert)")
            plan.blocks.append((key, _strip(sub), sub.get("layers")))
    return plan
