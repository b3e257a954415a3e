"""Things built from a composed config, and nothing else: no training, no evaluation, no files written.

* :func:`build_mole_model` — base model + tokenizer, experts injected per the layout, only adapters train.
* :func:`inject_from_config` — the ``experts``, ``adapter`` and ``router`` config applied to a base model.
* :func:`parameter_report` — trainable / total parameter counts, per layer experts and routers.
* :func:`build_loaders` — the train and validation data loaders.
* :func:`build_aux_losses` — the ``loss`` config's auxiliary losses.

The recipes (:mod:`mole.recipes`) put these together into the commands.
"""

from __future__ import annotations

from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from mole.adapters.baselines import mark_saves_everything
from mole.adapters.kinds import adapter_class, check_quantized_adapter, plan_adapter
from mole.data import Collator, encode_datasets, load_datasets
from mole.data.collate import length_grouped_sampler
from mole.experts.layout import expand_layout
from mole.model.base import adapter_dtype, build_model, build_skeleton
from mole.model.blocks import BlockSpec
from mole.model.inject import InjectionReport, decoder_layers, inject_mole, is_trainable_name
from mole.model.state import adapter_metadata
from mole.routers.base import router_needs
from mole.routers.hybrid import reads_raw_question
from mole.utils.errors import MoleConfigError
from mole.utils.targets import target_of

# ---------------------------------------------------------------------------------------------------
# model


def _config_error_in(err: BaseException) -> MoleConfigError | None:
    """The :class:`MoleConfigError` that Hydra's ``instantiate`` wrapped, if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, MoleConfigError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def run_seed(cfg: DictConfig) -> int:
    """The run's ``seed``, checked."""
    seed = cfg.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise MoleConfigError(f"seed must be an integer, got {seed!r}")
    return seed


def _factory(node: DictConfig, group: str):
    """A ``_partial_`` factory from a config node, with argument errors reported under the group's key."""
    if node is None or "_target_" not in node:
        raise MoleConfigError(f"{group}: missing _target_ (choose a file from conf/{group}/)")
    try:
        made = instantiate(node, _partial_=True)
    except Exception as err:  # noqa: BLE001 - Hydra wraps import/attribute errors in its own types
        inner = _config_error_in(err)
        if inner is not None:
            raise inner from None
        raise MoleConfigError(f"{group}._target_={node._target_!r} cannot be built: {err}") from None

    def call(**kwargs):
        try:
            return made(**kwargs)
        except TypeError as err:
            raise MoleConfigError(f"{group}: {err} (check the keys under `{group}`)") from None
        except MoleConfigError as err:  # adapter classes name their keys `adapter.*`: say where this one sits
            text = str(err)
            if group != "adapter" and group.startswith("adapter.") and text.startswith("adapter."):
                raise MoleConfigError(group + text[len("adapter"):]) from None
            raise

    return call


def _router_factory(model: torch.nn.Module, cfg: DictConfig, tokenizer=None):
    """``(router factory, {model attribute: module})``: the factory :func:`inject_mole` calls, passing the
    router what its class declares it needs (:class:`~mole.routers.base.RouterNeeds`), and the per-model
    modules it declares, built from their ``router.<key>`` nodes and registered on ``model`` first."""
    needs = router_needs(target_of(cfg.router, "router", "router"))
    skip = tuple(m.key for m in needs.model_modules)
    factory = _factory(OmegaConf.masked_copy(cfg.router, [k for k in cfg.router if k not in skip]), "router")
    built = {}
    for need in needs.model_modules:
        if cfg.router.get(need.key) is None:
            continue
        module = need.build(model, cfg.router[need.key], tokenizer=tokenizer, dtype=adapter_dtype(cfg.model))
        setattr(model, need.attr, module)
        built[need.key] = module
    attrs = {need.attr: built[need.key] for need in needs.model_modules if need.key in built}

    def make(in_features: int, num_experts: int, **layer):
        taken = {k: v for k, v in layer.items() if k in needs.layer_inputs}
        return factory(in_features=in_features, num_experts=num_experts, **taken, **built)

    return make, attrs


def _linear_factory(node: DictConfig):
    """The Linear adapter's factory for :func:`inject_mole`: ``base_layer`` goes to the classes that declare
    ``reads_base_weights`` (:class:`~mole.adapters.kinds.LinearAdapter`)."""
    factory = _factory(node, "adapter")
    wants_base = adapter_class(node, "adapter").reads_base_weights

    def make(base_layer=None, **kwargs):
        return factory(**kwargs, **({"base_layer": base_layer} if wants_base else {}))

    return make


def inject_from_config(model: torch.nn.Module, cfg: DictConfig, tokenizer=None) -> InjectionReport:
    """Apply the ``experts``, ``adapter`` and ``router`` config to a base model, in place.

    ``tokenizer`` gives token ids the routers need (HMoRA's ``e_task`` initialisation); ``None`` when
    counting parameters on the meta device. The adapter may be a Linear adapter (LoRA, DoRA, Hydra), block
    experts (parallel adapter, prompt, MixLoRA FFN experts; see :mod:`mole.adapters.kinds`) or both, or a
    whole-model baseline (full fine-tuning, prompt tuning).
    """
    num_layers = len(decoder_layers(model))
    ex = cfg.experts
    targets = [ex.targets] if isinstance(ex.targets, str) else list(ex.targets or [])  # experts.targets=q_proj: one
    single_targets = list(ex.get("single_targets") or [])
    plan = plan_adapter(cfg.adapter, targets, single_targets)
    if plan.kind == "model":  # whole-model baselines: no experts, no routers
        if _factory(plan.model, "adapter")(model=model).saves_everything:
            mark_saves_everything(model)
        return InjectionReport(experts_per_layer=[0] * num_layers, routers_per_layer=[0] * num_layers)
    layout = expand_layout(
        num_layers,
        num_experts=ex.get("num_experts"),
        groups=ex.get("groups"),
        per_layer=ex.get("per_layer"),
    )
    router_factory, per_model = _router_factory(model, cfg, tokenizer)
    share = ex.get("share_groups")
    report = inject_mole(
        model,
        experts_per_layer=layout,
        targets=targets,
        single_targets=single_targets,
        expert_factory=None if plan.linear is None else _linear_factory(plan.linear),
        router_factory=router_factory,
        adapter_dtype=adapter_dtype(cfg.model),
        placement=ex.get("placement", "linear"),
        level=ex.get("level", "token"),
        blocks=[BlockSpec(key, _factory(node, key), layers) for key, node, layers in plan.blocks],
        **({"share_groups": [list(g) for g in share]} if share else {}),
    )
    for attr, module in per_model.items():
        if module.users == 0:  # no layer built a router that reads it
            delattr(model, attr)
    return report


def build_mole_model(cfg: DictConfig, *, meta: bool = False):
    """The base model with MoLE layers injected.

    Args:
        cfg: a composed ``train`` config.
        meta: build on the meta device (shapes only: no weights, no download) for counting parameters.

    Returns:
        ``(model, tokenizer or None, InjectionReport)``.
    """
    check_quantized_adapter(cfg)
    if meta:
        model, tokenizer = build_skeleton(cfg.model), None
        with torch.device("meta"):
            report = inject_from_config(model, cfg)
        return model, tokenizer, report
    seed = run_seed(cfg)
    model, tokenizer = build_model(cfg.model, seed=seed)
    torch.manual_seed(seed)  # adapter and router initialisation
    report = inject_from_config(model, cfg, tokenizer)
    # what the adapter file says about itself; loading an adapter checks it (mole.model.state)
    model.mole_adapter_metadata = adapter_metadata(cfg, model)
    return model, tokenizer, report


def parameter_report(model: torch.nn.Module, report: InjectionReport) -> dict[str, Any]:
    """Trainable and total parameters; ``percent`` is trainable / base-model parameters, as the papers report.

    Shared (tied) parameters are counted once. ``base`` is every parameter that is not an added
    (``mole_``) one, so full fine-tuning reports 100%.
    """
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(_numel(p) for p in model.parameters())
    base = total - sum(_numel(p) for n, p in model.named_parameters() if is_trainable_name(n))
    layers = decoder_layers(model)
    # modules trained once per model, outside the decoder layers (HMoRA's task encoder)
    per_model = {
        name: sum(_numel(p) for p in m.parameters())
        for name, m in model.named_children()
        if name.startswith("mole_")
    }
    return {
        "trainable": trainable,
        "total": total,
        "base": base,
        "percent": round(100.0 * trainable / base, 4),
        **({"per_model": per_model} if per_model else {}),
        "layers": [
            {"layer": i, "experts": e, "routers": r, "adapted": len(report.adapted.get(i, [])),
             **_layer_info(layers[i])}
            for i, (e, r) in enumerate(zip(report.experts_per_layer, report.routers_per_layer, strict=True))
        ],
    }


def _numel(p: torch.Tensor) -> int:
    """A parameter's full size. Under DeepSpeed ZeRO-3 the base model is built partitioned (transformers
    builds it inside ``deepspeed.zero.Init``): each process holds an empty placeholder, the real size is
    ``ds_numel``. A 4-bit quantized weight (bitsandbytes) packs two values per element; its quantization
    state keeps the real shape."""
    shape = getattr(getattr(p, "quant_state", None), "shape", None)
    if shape is not None:
        return int(torch.Size(shape).numel())
    return int(getattr(p, "ds_numel", p.numel()))


def _layer_info(layer: torch.nn.Module) -> dict[str, Any]:
    """What a layer's routers report about themselves (``layer_info()``; HMoRA's ``a_l`` and router kinds)."""
    for m in layer.modules():
        info = getattr(m, "layer_info", None)
        if callable(info):
            return info()
    return {}


# ---------------------------------------------------------------------------------------------------
# data


def build_loaders(cfg: DictConfig, tokenizer, args):
    train_records, val_records = load_datasets(cfg.data, seed=cfg.seed)
    question = reads_raw_question(cfg.router)
    train_set, val_set, data_info = encode_datasets(cfg.data, tokenizer, train_records, val_records, question)
    group, multiple = _batching_options(cfg.data)
    collate = Collator(tokenizer.pad_token_id, multiple)
    gen = torch.Generator().manual_seed(int(cfg.seed))
    sampler = length_grouped_sampler([len(e["input_ids"]) for e in train_set], args.batch_size, gen) if group else None
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=sampler is None, sampler=sampler,
                              generator=gen, collate_fn=collate)
    val_loader = DataLoader(val_set, batch_size=args.eval_batch_size, collate_fn=collate) if val_set else None
    return train_loader, val_loader, data_info


def _batching_options(data: DictConfig) -> tuple[bool, int | None]:
    """``data.group_by_length`` (bool) and ``data.pad_to_multiple_of`` (null or a positive integer), checked."""
    group = data.get("group_by_length", False)
    if not isinstance(group, bool):
        raise MoleConfigError(f"data.group_by_length must be true or false, got {group!r}")
    multiple = data.get("pad_to_multiple_of")
    if multiple is not None and (not isinstance(multiple, int) or isinstance(multiple, bool) or multiple < 1):
        raise MoleConfigError(f"data.pad_to_multiple_of must be null or a positive integer (tokens), got {multiple!r}")
    return group, multiple


def build_aux_losses(cfg: DictConfig) -> dict:
    losses = {}
    for name, node in (cfg.get("loss") or {}).items():
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise MoleConfigError(f"loss.{name}: expected a loss config with _target_ (see conf/loss/)")
        try:
            losses[name] = instantiate(node)
        except MoleConfigError:
            raise
        except Exception as err:  # noqa: BLE001
            inner = _config_error_in(err)
            if inner is not None:
                raise inner from None
            raise MoleConfigError(f"loss.{name} cannot be built: {err}") from None
    return losses
