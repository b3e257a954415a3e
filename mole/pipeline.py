"""What the commands do, as plain functions of a composed config (tests call these directly).

* :func:`build_mole_model` — base model + tokenizer, experts injected per the layout, only adapters train.
* :func:`parameter_report` — trainable / total parameter counts, per layer experts and routers.
* :func:`run_train` — ``mole-train``: build, train, save ``adapter.safetensors``, evaluate, write
  ``config.yaml`` and ``metrics.json`` into the run directory.
* :func:`run_eval` — ``mole-eval``: rebuild a run's model from its ``config.yaml`` and adapter and
  evaluate it through lm-eval-harness.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import mole
from mole.experts.layout import expand_layout
from mole.model.base import build_model, build_skeleton
from mole.model.inject import InjectionReport, decoder_layers, inject_mole
from mole.model.state import ADAPTER_FILE, load_adapter, save_adapter
from mole.utils.errors import MoleConfigError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"


# ---------------------------------------------------------------------------------------------------
# model


def _factory(node: DictConfig, group: str):
    """A ``_partial_`` factory from a config node, with argument errors reported under the group's key."""
    if node is None or "_target_" not in node:
        raise MoleConfigError(f"{group}: missing _target_ (choose a file from conf/{group}/)")
    try:
        made = instantiate(node, _partial_=True)
    except Exception as err:  # noqa: BLE001 - Hydra wraps import/attribute errors in its own types
        raise MoleConfigError(f"{group}._target_={node._target_!r} cannot be built: {err}") from None

    def call(**kwargs):
        try:
            return made(**kwargs)
        except TypeError as err:
            raise MoleConfigError(f"{group}: {err} (check the keys under `{group}`)") from None

    call.accepts = _keyword_names(made)  # type: ignore[attr-defined]
    return call


def _keyword_names(fn) -> tuple[str, ...]:
    import inspect

    try:
        return tuple(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return ()


PLACEMENT_KEYS = ("placement", "level")  # read by the injector, not passed to the router's constructor
MODEL_KEYS = ("task_encoder",)  # build one module per model (HMoRA's task encoder), handed to every router


def _router_factory(model: torch.nn.Module, cfg: DictConfig, tokenizer=None):
    """The router factory; a ``router.task_encoder`` node first builds ``model.mole_task_encoder`` (router=hybrid)."""
    skip = (*PLACEMENT_KEYS, *MODEL_KEYS)
    node = OmegaConf.masked_copy(cfg.router, [k for k in cfg.router if k not in skip])
    factory = _factory(node, "router")
    if cfg.router.get("task_encoder") is None:
        return factory
    if "task_encoder" not in factory.accepts:
        raise MoleConfigError(f"router.task_encoder is set but router._target_={node._target_!r} takes no task encoder")
    from mole.routers.hybrid import attach_task_encoder

    encoder = attach_task_encoder(model, cfg.router.task_encoder, tokenizer)

    def bound(**kwargs):
        return factory(task_encoder=encoder, **kwargs)

    bound.accepts = factory.accepts  # type: ignore[attr-defined]
    return bound


def inject_from_config(model: torch.nn.Module, cfg: DictConfig, tokenizer=None) -> InjectionReport:
    """Apply the ``experts``, ``adapter`` and ``router`` config to a base model, in place.

    ``tokenizer`` gives token ids the routers need (HMoRA's ``e_task`` initialisation); ``None`` when
    counting parameters on the meta device. The adapter may be a Linear adapter (LoRA, DoRA, Hydra), block
    experts (parallel adapter, prompt, MixLoRA FFN experts; see :mod:`mole.adapters.kinds`) or both, or a
    whole-model baseline (full fine-tuning, prompt tuning).
    """
    from mole.adapters.kinds import plan_adapter
    from mole.model.blocks import BlockSpec

    num_layers = len(decoder_layers(model))
    ex = cfg.experts
    targets, single_targets = list(ex.targets or []), list(ex.get("single_targets") or [])
    plan = plan_adapter(cfg.adapter, targets, single_targets)
    if plan.kind == "model":  # whole-model baselines: no experts, no routers
        _factory(plan.model, "adapter")(model=model)
        return InjectionReport(experts_per_layer=[0] * num_layers, routers_per_layer=[0] * num_layers)
    layout = expand_layout(
        num_layers,
        num_experts=ex.get("num_experts"),
        groups=ex.get("groups"),
        per_layer=ex.get("per_layer"),
    )
    router_factory = _router_factory(model, cfg, tokenizer)
    share = ex.get("share_groups")
    report = inject_mole(
        model,
        experts_per_layer=layout,
        targets=targets,
        single_targets=single_targets,
        expert_factory=None if plan.linear is None else _factory(plan.linear, "adapter"),
        router_factory=router_factory,
        placement=cfg.router.get("placement", "linear"),
        level=cfg.router.get("level", "token"),
        blocks=[BlockSpec(key, _factory(node, key), layers) for key, node, layers in plan.blocks],
        **({"share_groups": [list(g) for g in share]} if share else {}),
    )
    if cfg.router.get("task_encoder") is not None:
        from mole.routers.hybrid import drop_unused_task_encoder

        drop_unused_task_encoder(model)
    return report


def build_mole_model(cfg: DictConfig, *, meta: bool = False):
    """The base model with MoLE layers injected.

    Args:
        cfg: a composed ``train`` config.
        meta: build on the meta device (shapes only: no weights, no download) for counting parameters.

    Returns:
        ``(model, tokenizer or None, InjectionReport)``.
    """
    if meta:
        model, tokenizer = build_skeleton(cfg.model), None
        with torch.device("meta"):
            report = inject_from_config(model, cfg)
        return model, tokenizer, report
    model, tokenizer = build_model(cfg.model, seed=cfg.get("seed"))
    torch.manual_seed(cfg.get("seed", 0))  # adapter and router initialisation
    report = inject_from_config(model, cfg, tokenizer)
    return model, tokenizer, report


def parameter_report(model: torch.nn.Module, report: InjectionReport) -> dict[str, Any]:
    """Trainable and total parameters; ``percent`` is trainable / base-model parameters, as the papers report.

    Shared (tied) parameters are counted once. ``base`` is every parameter that is not an added
    (``mole_``) one, so full fine-tuning reports 100%.
    """
    from mole.model.inject import is_trainable_name

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    base = total - sum(p.numel() for n, p in model.named_parameters() if is_trainable_name(n))
    layers = decoder_layers(model)
    # modules trained once per model, outside the decoder layers (HMoRA's task encoder)
    per_model = {
        name: sum(p.numel() for p in m.parameters())
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
    from torch.utils.data import DataLoader

    from mole.data import Collator, encode_records, load_datasets

    train_records, val_records = load_datasets(cfg.data, seed=cfg.seed)
    cutoff = int(cfg.data.get("cutoff_len", 256))
    template = cfg.data.get("template", "alpaca")
    train_set = encode_records(train_records, tokenizer, cutoff, template)
    if not train_set:
        raise MoleConfigError(f"data: no training example keeps a response within data.cutoff_len={cutoff} tokens")
    val_set = encode_records(val_records, tokenizer, cutoff, template)
    collate = Collator(tokenizer.pad_token_id)
    gen = torch.Generator().manual_seed(int(cfg.seed))
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, generator=gen, collate_fn=collate)
    val_loader = DataLoader(val_set, batch_size=args.eval_batch_size, collate_fn=collate) if val_set else None
    return train_loader, val_loader, {"train_records": len(train_set), "val_records": len(val_set)}


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
            raise MoleConfigError(f"loss.{name} cannot be built: {err}") from None
    return losses


# ---------------------------------------------------------------------------------------------------
# run directory


def is_finished(run_dir: Path) -> bool:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return False
    try:
        return bool(json.loads(path.read_text()).get("finished"))
    except json.JSONDecodeError:
        return False


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def _versions() -> dict[str, str]:
    import accelerate
    import transformers

    out = {"mole": mole.__version__, "python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "accelerate": accelerate.__version__}
    try:
        import lm_eval

        out["lm_eval"] = getattr(lm_eval, "__version__", "unknown")
    except ImportError:
        pass
    return out


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ---------------------------------------------------------------------------------------------------
# commands


def run_train(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Train one run into ``run_dir`` and return its metrics (see the module docstring)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from mole.training import TrainArgs, train
    from mole.training.loop import total_steps
    from mole.training.optim import build_optimizer, build_scheduler

    run_dir = Path(run_dir)
    if is_finished(run_dir) and not cfg.get("force", False):
        log.info("%s already holds a finished run; skipping (force=true to run it again)", run_dir)
        return json.loads((run_dir / METRICS_FILE).read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    wall_start = time.perf_counter()

    # ---- validate and build (cheap checks first, then the model) ----
    args = TrainArgs.from_config(cfg.trainer)
    aux_losses = build_aux_losses(cfg)
    accelerator = Accelerator()
    set_seed(int(cfg.seed))
    model, tokenizer, report = build_mole_model(cfg)
    if args.init_from:
        init_from_run(model, cfg, args.init_from)
    params = parameter_report(model, report)
    log.info("trainable params %d of %d (%.4f%% of the base model)", params["trainable"], params["total"], params["percent"])
    train_loader, val_loader, data_info = build_loaders(cfg, tokenizer, args)
    (run_dir / CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg, resolve=True))

    optimizer = build_optimizer(model, args)
    num_steps = total_steps(args, len(train_loader))
    scheduler = build_scheduler(optimizer, args, num_steps)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    if val_loader is not None:
        val_loader = accelerator.prepare(val_loader)

    # ---- train ----
    log.info("training %d steps (%d train / %d val records)", num_steps, data_info["train_records"], data_info["val_records"])
    state = train(model, optimizer, scheduler, train_loader, val_loader, aux_losses, args, accelerator, num_steps)
    model = accelerator.unwrap_model(model)
    save_adapter(model, run_dir / ADAPTER_FILE)

    metrics: dict[str, Any] = {
        "method": cfg.get("method_name"),
        "model": cfg.model.get("name"),
        "seed": int(cfg.seed),
        "trainable_params": params["trainable"],
        "total_params": params["total"],
        "base_params": params["base"],
        "trainable_percent": params["percent"],
        "experts_per_layer": report.experts_per_layer,
        "steps": state.step,
        **data_info,
        "train_loss": state.train_loss,
        "val_loss": state.val_loss,
        "train_time_s": round(state.train_time_s, 3),
        "val_time_s": round(state.eval_time_s, 3),
        "time_per_step_s": round(state.train_time_s / state.step, 4) if state.step else None,
        "versions": _versions(),
    }

    # ---- evaluate the final model through lm-eval ----
    eval_cfg = cfg.get("eval") or {}
    if eval_cfg.get("at_end") and eval_cfg.get("tasks"):
        results = evaluate(model, tokenizer, eval_cfg, run_dir / "eval")
        metrics["eval"] = results.get("results", {})
    metrics["peak_memory_mb"] = round(_peak_memory_mb(), 1)
    metrics["wall_time_s"] = round(time.perf_counter() - wall_start, 3)
    metrics["finished"] = True
    _write_json(run_dir / METRICS_FILE, metrics)
    log.info("run finished: %s", run_dir)
    return metrics


def evaluate(model, tokenizer, eval_cfg: DictConfig, output_dir: Path) -> dict:
    """lm-eval-harness over the in-memory model; writes ``output_dir/results.json``."""
    from mole.eval.harness import evaluate_model

    tasks = list(eval_cfg.get("tasks") or [])
    if not tasks:
        raise MoleConfigError("eval.tasks is empty; name at least one task, e.g. eval.tasks=[mole_mc]")
    output_dir.mkdir(parents=True, exist_ok=True)
    results = evaluate_model(
        model,
        tokenizer,
        tasks,
        output_dir=output_dir,
        include_path=eval_cfg.get("include_path"),
        batch_size=int(eval_cfg.get("batch_size", 8)),
        limit=eval_cfg.get("limit"),
        num_fewshot=eval_cfg.get("num_fewshot"),
    )
    return results  # the harness logs the results table


def load_run_config(checkpoint: str | Path) -> DictConfig:
    run_dir = Path(checkpoint)
    path = run_dir / CONFIG_FILE
    if not run_dir.is_dir():
        raise MoleConfigError(f"checkpoint={str(run_dir)!r} is not a directory (expected a mole-train run directory)")
    if not path.is_file():
        raise MoleConfigError(f"checkpoint: {path} not found (expected a run directory written by mole-train)")
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:  # noqa: BLE001 - yaml errors come in many types
        raise MoleConfigError(f"checkpoint: {path} is not valid YAML ({err})") from None
    if not isinstance(cfg, DictConfig) or "model" not in cfg:
        raise MoleConfigError(f"checkpoint: {path} is not a mole run config (no `model` key)")
    return cfg


def init_from_run(model: torch.nn.Module, cfg: DictConfig, source: str | Path) -> None:
    """Start from a previous run's adapter (``trainer.init_from``; MoR Table 2's second stage).

    The previous run must use the same base model and the same adapter structure (method, layout,
    router); everything else (data, trainer, seed) may differ.
    """
    source = Path(source)
    try:
        prev = load_run_config(source)
    except MoleConfigError as err:
        raise MoleConfigError(f"trainer.init_from: {err}") from None
    if prev.model.get("name") != cfg.model.get("name"):
        raise MoleConfigError(
            f"trainer.init_from={str(source)!r} was trained on model={prev.model.get('name')}, "
            f"this run uses model={cfg.model.get('name')}; the adapters do not transfer"
        )
    try:
        load_adapter(model, source / ADAPTER_FILE)
    except MoleConfigError as err:
        raise MoleConfigError(
            f"trainer.init_from: {err} (run {source} used method={prev.get('method_name')}; "
            f"this run uses method={cfg.get('method_name')})"
        ) from None
    log.info("initialised the adapters from %s", source / ADAPTER_FILE)


def run_eval(checkpoint: str | Path, eval_overrides: DictConfig | dict | None = None) -> dict:
    """Rebuild a run's model from ``config.yaml`` + ``adapter.safetensors`` and evaluate it."""
    run_dir = Path(checkpoint)
    cfg = load_run_config(run_dir)
    eval_cfg = OmegaConf.merge(cfg.get("eval") or {}, eval_overrides or {})
    model, tokenizer, _ = build_mole_model(cfg)
    load_adapter(model, run_dir / ADAPTER_FILE)
    return evaluate(model, tokenizer, eval_cfg, run_dir / "eval")

