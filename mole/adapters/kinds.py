"""What an ``adapter`` config asks for: Linear experts, block experts, or a whole-model baseline.

The class named by ``adapter._target_`` declares its kind in the class attribute ``adapter_kind`` and
follows that kind's protocol (:class:`LinearAdapter`, :class:`BlockAdapter`, :class:`ModelAdapter`;
``tests/unit/conf/test_contracts.py`` checks every ``conf/adapter/*.yaml`` against them):

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
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from mole.config import CONF_DIR
from mole.model.base import quantization
from mole.utils.errors import MoleConfigError
from mole.utils.targets import target_of

EXTRA_KEYS = ("blocks", "linear", "layers")  # read here, never passed to a constructor


@runtime_checkable
class LinearAdapter(Protocol):
    """``adapter_kind = "linear"``: E experts on one adapted Linear ``d_in -> d_out``.

    Built as ``cls(in_features, out_features, num_experts, **config keys)``, plus ``base_layer`` (the frozen
    ``nn.Linear``) when ``reads_base_weights``; called by :class:`~mole.model.layer.MoLELinear` as
    ``experts(x (N, d_in), gates (N, E) or None)`` (plus ``base_out=`` the frozen ``W x + b`` ``(N, d_out)``
    when ``reads_base_output``) and returns the ``(N, d_out)`` update added to the frozen output (with
    ``add_to=`` the frozen output when ``adds_to_output``, that output plus the update). Every
    trainable parameter has one dtype; a fresh set leaves the layer's output unchanged.
    """

    adapter_kind: str  # "linear"
    reads_base_output: bool  # forward gets base_out = W x + b (DoRA), so W x is not computed twice
    reads_base_weights: bool  # needs the frozen weights in floating point (refused on a quantized base)
    adds_to_output: bool  # forward takes add_to = W x + b and returns it plus the update (one product fewer)
    num_experts: int
    in_features: int
    out_features: int

    def __call__(self, x: Tensor, gates: Tensor | None = None, **base_out: Tensor) -> Tensor: ...


@runtime_checkable
class BlockAdapter(Protocol):
    """``adapter_kind = "block"``: E experts on a whole block of one decoder layer (:mod:`mole.model.blocks`).

    Built as ``cls(layer=decoder layer, num_experts=E, **config keys)``; an instance of
    :class:`~mole.model.blocks.BlockExperts` (which gates it by its router or a layer router's columns);
    :meth:`attach` hooks it into the layer under ``attr_name`` on the block at ``position``.
    """

    adapter_kind: str  # "block"
    reads_base_weights: bool
    num_experts: int
    in_features: int  # width of the block's input, what its router reads
    position: str  # "ffn" or "attn"
    attr_name: str  # the mole_* attribute it is registered under

    def attach(self, layer: nn.Module) -> None: ...


@runtime_checkable
class ModelAdapter(Protocol):
    """``adapter_kind = "model"``: applied once to the whole model, built as ``cls(model=model, **config keys)``.

    ``saves_everything``: every parameter trains, so the checkpoint holds the whole model (full fine-tuning);
    otherwise only ``mole_*`` parameters train and are saved.
    """

    adapter_kind: str  # "model"
    reads_base_weights: bool
    saves_everything: bool


PROTOCOLS: dict[str, type] = {"linear": LinearAdapter, "block": BlockAdapter, "model": ModelAdapter}
KINDS = tuple(PROTOCOLS)


@dataclass
class AdapterPlan:
    """The parts of an ``adapter`` config, each ready for ``_factory``."""

    kind: str
    linear: DictConfig | None = None  # the Linear adapter (experts.targets / single_targets)
    blocks: list[tuple[str, DictConfig, Any]] = field(default_factory=list)  # (key, node, layers)
    model: DictConfig | None = None  # a whole-model baseline


def adapter_class(node: Any, key: str) -> Any:
    """The class named by ``node._target_``, checked to declare a known ``adapter_kind``."""
    target = target_of(node, key, "adapter")
    kind = getattr(target, "adapter_kind", None)
    if kind not in KINDS:
        raise MoleConfigError(
            f"{key}._target_={node._target_!r} declares adapter_kind={kind!r}; an adapter class declares one of "
            f"{list(KINDS)} (see mole.adapters.kinds)"
        )
    return target


def adapter_kind(node: Any, key: str) -> str:
    """``linear``, ``block`` or ``model``, as the class named by ``node._target_`` declares."""
    return adapter_class(node, key).adapter_kind


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


def check_quantized_adapter(cfg: DictConfig) -> None:
    """Refuse ``model.quantization`` with an adapter that needs the base weights in floating point (stored as
    integer codes in a quantized base): a class in the ``adapter`` tree that declares ``reads_base_weights``."""
    quant = quantization(cfg.model)
    if quant == "none":
        return
    for key, node in _target_nodes(cfg.get("adapter"), "adapter"):
        target = target_of(node, key, "adapter")
        if getattr(target, "reads_base_weights", False):
            name = node._target_.rsplit(".", 1)[-1]
            raise MoleConfigError(
                f"model.quantization={quant} cannot be used with {_option_of(node._target_, key)} ({name} reads or "
                "trains the base weights, which are stored quantized); use model.quantization=none"
            )


def _target_nodes(node: Any, key: str):
    """``(key, node)`` of every ``_target_`` node in a config tree, the tree itself first."""
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield key, node
        for k in node:
            yield from _target_nodes(node.get(k), f"{key}.{k}")


def _option_of(target: str, key: str) -> str:
    """``adapter=<file>`` when a file of ``conf/adapter/`` builds ``target`` at its top, else ``<key>._target_=...``."""
    for path in sorted((Path(CONF_DIR) / "adapter").glob("*.yaml")):
        if OmegaConf.load(path).get("_target_") == target:
            return f"adapter={path.stem}"
    return f"{key}._target_={target}"
