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
import math
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
from mole.model.base import adapter_dtype, build_model, build_skeleton
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

    return call


def inject_from_config(model: torch.nn.Module, cfg: DictConfig) -> InjectionReport:
    """Apply the ``experts``, ``adapter`` and ``router`` config to a base model, in place."""
    num_layers = len(decoder_layers(model))
    ex = cfg.experts
    layout = expand_layout(
        num_layers,
        num_experts=ex.get("num_experts"),
        groups=ex.get("groups"),
        per_layer=ex.get("per_layer"),
    )
    return inject_mole(
        model,
        experts_per_layer=layout,
        targets=list(ex.targets),
        expert_factory=_factory(cfg.adapter, "adapter"),
        router_factory=_factory(cfg.router, "router"),
        adapter_dtype=adapter_dtype(cfg.model),
    )


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
    report = inject_from_config(model, cfg)
    return model, tokenizer, report


def parameter_report(model: torch.nn.Module, report: InjectionReport) -> dict[str, Any]:
    """Trainable and total parameters; ``percent`` is trainable / base-model parameters, as the papers report.

    Shared (tied) parameters are counted once.
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    base = total - trainable
    return {
        "trainable": trainable,
        "total": total,
        "base": base,
        "percent": round(100.0 * trainable / base, 4),
        "layers": [
            {"layer": i, "experts": e, "routers": r, "adapted": len(report.adapted.get(i, []))}
            for i, (e, r) in enumerate(zip(report.experts_per_layer, report.routers_per_layer, strict=True))
        ],
    }


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
    """Train one run into ``run_dir`` and return its metrics (see the module docstring).

    In one process of a multi-process run (started by ``accelerate launch``, see
    :mod:`mole.training.launch`) every process trains its shard; only the main one writes files.
    """
    from accelerate.utils import set_seed

    from mole.model.base import enable_gradient_checkpointing
    from mole.training import TrainArgs, train
    from mole.training.distributed import DistributedArgs, build_accelerator, is_deepspeed
    from mole.training.loop import total_steps
    from mole.training.optim import build_optimizer, build_scheduler
    from mole.training.tracking import RoutingMonitor, check_trackers, start_trackers
    from mole.utils.secrets import write_config

    run_dir = Path(run_dir)
    if is_finished(run_dir) and not cfg.get("force", False):
        log.info("%s already holds a finished run; skipping (force=true to run it again)", run_dir)
        return json.loads((run_dir / METRICS_FILE).read_text())
    wall_start = time.perf_counter()

    # ---- validate and build (cheap checks first, then the model) ----
    args = TrainArgs.from_config(cfg.trainer)
    dist = DistributedArgs.from_config(cfg.get("distributed"))
    check_trackers(args.log_with)
    aux_losses = build_aux_losses(cfg)
    accelerator = build_accelerator(args, dist, run_dir)
    main = accelerator.is_main_process
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    set_seed(int(cfg.seed))
    model, tokenizer, report = build_mole_model(cfg)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    params = parameter_report(model, report)
    log.info("trainable params %d of %d (%.4f%% of the base model)", params["trainable"], params["total"], params["percent"])
    train_loader, val_loader, data_info = build_loaders(cfg, tokenizer, args)
    if main:
        write_config(cfg, run_dir / CONFIG_FILE)
    start_trackers(accelerator, cfg, args, run_dir)

    optimizer = build_optimizer(model, args)
    # each process walks 1/P of the batches (Accelerate pads the last round): optimizer steps per epoch shrink P-fold
    num_steps = total_steps(args, math.ceil(len(train_loader) / accelerator.num_processes))
    scheduler = build_scheduler(optimizer, args, num_steps)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    if val_loader is not None:
        val_loader = accelerator.prepare(val_loader)

    # ---- train ----
    global_batch = args.batch_size * accelerator.num_processes * args.grad_accum
    log.info("training %d steps (%d train / %d val records; global batch %d = %d x %d processes x %d accumulation)",
             num_steps, data_info["train_records"], data_info["val_records"], global_batch, args.batch_size,
             accelerator.num_processes, args.grad_accum)
    monitor = RoutingMonitor(report.routers_per_layer)
    state = train(model, optimizer, scheduler, train_loader, val_loader, aux_losses, args, accelerator, num_steps, monitor=monitor)
    sharded = is_deepspeed(accelerator) and accelerator.state.deepspeed_plugin.zero_stage == 3
    # ZeRO-3 shards the parameters: gathering them is a collective every process joins
    full_state = accelerator.get_state_dict(model) if sharded else None
    model = accelerator.unwrap_model(model)
    if main:
        save_adapter(model, run_dir / ADAPTER_FILE, state=full_state)
    # the other processes are done: release them (and flush the trackers) before the main one evaluates
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if not main:
        return {}

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
        "num_processes": accelerator.num_processes,
        "global_batch_size": global_batch,
        "mixed_precision": args.mixed_precision,
        **data_info,
        "train_loss": state.train_loss,
        "val_loss": state.val_loss,
        "train_time_s": round(state.train_time_s, 3),
        "val_time_s": round(state.eval_time_s, 3),
        "time_per_step_s": round(state.train_time_s / state.step, 4) if state.step else None,
        "routing_stats": state.routing_stats,
        "versions": _versions(),
    }

    # ---- evaluate the final model through lm-eval ----
    eval_cfg = cfg.get("eval") or {}
    if eval_cfg.get("at_end") and eval_cfg.get("tasks") and sharded:
        log.warning("ZeRO-3 shards the base model over the processes: no lm-eval pass here; run mole-eval checkpoint=%s", run_dir)
    elif eval_cfg.get("at_end") and eval_cfg.get("tasks"):
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


def run_eval(checkpoint: str | Path, eval_overrides: DictConfig | dict | None = None) -> dict:
    """Rebuild a run's model from ``config.yaml`` + ``adapter.safetensors`` and evaluate it."""
    run_dir = Path(checkpoint)
    cfg = load_run_config(run_dir)
    eval_cfg = OmegaConf.merge(cfg.get("eval") or {}, eval_overrides or {})
    model, tokenizer, _ = build_mole_model(cfg)
    load_adapter(model, run_dir / ADAPTER_FILE)
    return evaluate(model, tokenizer, eval_cfg, run_dir / "eval")

