"""What the commands do, as plain functions of a composed config (tests call these directly).

* :func:`build_mole_model` — base model + tokenizer, experts injected per the layout, only adapters train.
* :func:`parameter_report` — trainable / total parameter counts, per layer experts and routers.
* :func:`run_train` — ``mole-train``: build, train, save ``adapter.safetensors``, evaluate, write
  ``config.yaml`` and ``metrics.json`` into the run directory.
* :func:`run_eval` — ``mole-eval``: rebuild a run's model from its ``config.yaml`` and adapter and
  evaluate it through lm-eval-harness.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import resource
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import mole
from mole.experts.layout import expand_layout
from mole.model.base import adapter_dtype, build_model, build_skeleton, check_quantized_adapter, quantization
from mole.model.inject import InjectionReport, decoder_layers, inject_mole
from mole.model.state import ADAPTER_FILE, adapter_metadata, load_adapter, save_adapter
from mole.run_dir import (  # noqa: F401 - CONFIG_FILE, is_finished, load_run_config: re-exported for callers
    CONFIG_FILE,
    FINISHED,
    INTERRUPTED,
    METRICS_FILE,
    RUNNING,
    finished_run,
    is_finished,
    load_run_config,
    lock_run,
    with_status,
)
from mole.run_dir import write_json as _write_json
from mole.run_dir import write_text as _write_text
from mole.utils.errors import MoleConfigError

log = logging.getLogger(__name__)


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

    encoder = attach_task_encoder(model, cfg.router.task_encoder, tokenizer, dtype=adapter_dtype(cfg.model))

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
    targets = [ex.targets] if isinstance(ex.targets, str) else list(ex.targets or [])  # experts.targets=q_proj: one
    single_targets = list(ex.get("single_targets") or [])
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
        adapter_dtype=adapter_dtype(cfg.model),
        placement=ex.get("placement", "linear"),
        level=ex.get("level", "token"),
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
    from mole.model.inject import is_trainable_name

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
    from torch.utils.data import DataLoader

    from mole.data import Collator, encode_datasets, load_datasets
    from mole.data.collate import length_grouped_sampler

    train_records, val_records = load_datasets(cfg.data, seed=cfg.seed)
    from mole.routers.hybrid import reads_raw_question

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


# ---------------------------------------------------------------------------------------------------
# run directory


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

    A failure leaves ``metrics.json`` with ``failed: true`` and ``error.txt`` (:mod:`mole.training.failures`)
    and is raised again; a non-finite loss keeps the adapter of the last finite step.
    """
    from mole.training.failures import record_failure

    run_dir = Path(run_dir)
    main = int(os.environ.get("RANK", "0")) == 0  # in a multi-process run, only the main process writes
    with ExitStack() as held:
        lock = lock_run(run_dir) if main else None
        if lock is not None:  # before anything is read or written: a second run on the directory stops here
            held.enter_context(lock)
        done = finished_run(run_dir, cfg)
        if done is not None:
            log.info("%s already holds a finished run of this config; skipping (force=true to run it again)", run_dir)
            return done
        run_dir.mkdir(parents=True, exist_ok=True)
        if main and (run_dir / METRICS_FILE).exists():  # an earlier attempt's record no longer describes the directory
            _write_json(run_dir / METRICS_FILE, with_status({"pid": os.getpid()}, RUNNING))
        metrics: dict[str, Any] = {}  # filled as the run goes, so a failure records what was measured
        from mole.training.signals import StopRequest

        try:
            with StopRequest() as stop:  # SIGTERM / SIGINT: stop at the next step boundary (RunInterrupted)
                return _train_run(cfg, run_dir, metrics, stop)
        except (Exception, KeyboardInterrupt) as err:
            if main:
                record_failure(run_dir, err, metrics)
            raise


def _train_run(cfg: DictConfig, run_dir: Path, metrics: dict[str, Any], stop=None) -> dict[str, Any]:
    """The run itself. In one process of a multi-process run (started by ``accelerate launch``, see
    :mod:`mole.training.launch`) every process trains its shard; only the main one writes files."""
    from accelerate.utils import set_seed

    from mole.config_schema import validate_config
    from mole.model.base import enable_gradient_checkpointing
    from mole.model.compile import compile_for_run
    from mole.training import TrainArgs, TrainState, train
    from mole.training import checkpoint as ckpt
    from mole.training.distributed import DistributedArgs, build_accelerator, is_deepspeed
    from mole.training.failures import clear_failure
    from mole.training.loop import total_steps
    from mole.training.optim import build_optimizer, build_scheduler
    from mole.training.tracking import RoutingMonitor, check_trackers, start_trackers
    from mole.utils.errors import NonFiniteLossError
    from mole.utils.secrets import redacted_yaml

    wall_start = time.perf_counter()

    # ---- validate and build (cheap checks first, then the model) ----
    validate_config(cfg)
    args = TrainArgs.from_config(cfg.trainer)
    dist = DistributedArgs.from_config(cfg.get("distributed"))
    check_trackers(args.log_with)
    run_seed(cfg)
    eval_cfg = cfg.get("eval") or {}
    final_eval = check_eval_config(eval_cfg) if eval_cfg.get("at_end") and has_eval(eval_cfg) else None
    aux_losses = build_aux_losses(cfg)
    accelerator = build_accelerator(args, dist, run_dir)
    main = accelerator.is_main_process
    from mole.training.distributed import check_same_config, check_shared_run_dir
    from mole.training.signals import requeued

    check_same_config(accelerator, cfg)  # several machines: the same config, a run directory all of them see
    check_shared_run_dir(accelerator, run_dir)

    # a requeued SLURM job (preemption, time limit) continues from its checkpoint
    resume_from = ckpt.prepare_run_dir(run_dir, resume=args.resume or requeued(), force=bool(cfg.get("force", False)),
                                       is_main_process=main)
    set_seed(int(cfg.seed))
    model, tokenizer, report = build_mole_model(cfg)
    if args.init_from:
        init_from_run(model, cfg, args.init_from)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    compile_clock = compile_for_run(model, cfg.trainer, accelerator.device, quantization(cfg.model) != "none")
    params = parameter_report(model, report)
    log.info("trainable params %d of %d (%.4f%% of the base model)", params["trainable"], params["total"], params["percent"])
    metrics.update({
        "method": cfg.get("method_name"),
        "model": cfg.model.get("name"),
        "seed": int(cfg.seed),
        "trainable_params": params["trainable"],
        "total_params": params["total"],
        "base_params": params["base"],
        "trainable_percent": params["percent"],
        "experts_per_layer": report.experts_per_layer,
    })
    train_loader, val_loader, data_info = build_loaders(cfg, tokenizer, args)
    metrics.update(data_info)
    config_yaml = redacted_yaml(cfg)  # the resolved config, secrets redacted: config.yaml and checkpoints
    start_trackers(accelerator, cfg, args, run_dir)

    optimizer = build_optimizer(model, args)
    # each process walks 1/P of the batches (Accelerate pads the last round): optimizer steps per epoch shrink P-fold
    num_steps = total_steps(args, math.ceil(len(train_loader) / accelerator.num_processes))
    scheduler = build_scheduler(optimizer, args, num_steps)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    if val_loader is not None:
        val_loader = accelerator.prepare(val_loader)
    stream = ckpt.BatchStream(train_loader)
    state = TrainState()
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, config=cfg, model=accelerator.unwrap_model(model),
                                     optimizer=optimizer, scheduler=scheduler, stream=stream)
    if main:  # after the checkpoint accepted this config: a refused resume leaves the run's config.yaml as it was
        _write_text(run_dir / CONFIG_FILE, config_yaml)
    checkpointer = ckpt.Checkpointer(
        run_dir, args.save_every, args.keep_checkpoints, model=accelerator.unwrap_model(model), optimizer=optimizer,
        scheduler=scheduler, stream=stream, config_yaml=config_yaml, is_main_process=main,
    ) if args.save_every else None

    # ---- train ----
    global_batch = args.batch_size * accelerator.num_processes * args.grad_accum
    log.info("training %d steps (%d train / %d val records; global batch %d = %d x %d processes x %d accumulation)%s",
             num_steps, data_info["train_records"], data_info["val_records"], global_batch, args.batch_size,
             accelerator.num_processes, args.grad_accum,
             f", resumed after step {state.step}" if resume_from is not None else "")
    monitor = RoutingMonitor(report.routers_per_layer)
    selector = _build_selector(cfg, args, tokenizer, run_dir, accelerator, state)
    try:
        train(model, optimizer, scheduler, train_loader, val_loader, aux_losses, args, accelerator, num_steps,
              state=state, batches=stream, on_step=checkpointer, monitor=monitor, selector=selector, stop=stop)
    except NonFiniteLossError as err:
        kept = _keep_last_good_adapter(accelerator.unwrap_model(model), run_dir, state, metrics) if main else ""
        raise NonFiniteLossError(f"{err}; {kept}") from None
    finally:  # the curve so far, also for a failure record
        metrics.update({
            "steps": state.step,
            "num_processes": accelerator.num_processes,
            "global_batch_size": global_batch,
            "mixed_precision": args.mixed_precision,
            "train_loss": state.train_loss,
            "val_loss": state.val_loss,
            "train_time_s": round(state.train_time_s, 3),
            "val_time_s": round(state.eval_time_s, 3),
            "time_per_step_s": round(state.train_time_s / state.step, 4) if state.step else None,
            "routing_stats": state.routing_stats,
        })
        if compile_clock is not None:  # compilation happens inside the first steps' time
            metrics["compile"] = {"backend": args.compile_backend, **compile_clock.stop()}
        if selector is not None:
            metrics.update({"val_acc": state.val_acc, "best_step": state.best_step, "stopped_early": state.stopped_early})
    signum = state.interrupted or (stop.agreed(accelerator) if stop is not None else None)
    if signum is not None:
        _stop_on_signal(signum, accelerator, model, optimizer, scheduler, stream, state, run_dir, config_yaml,
                        args, metrics, stop)
    sharded = is_deepspeed(accelerator) and accelerator.state.deepspeed_plugin.zero_stage == 3
    # ZeRO-3 shards the parameters: gathering them is a collective every process joins
    full_state = accelerator.get_state_dict(model) if sharded else None
    model = accelerator.unwrap_model(model)
    if selector is not None and args.keep_best:
        selector.restore_best(model)  # the adapter saved and evaluated below is the best one
        full_state = None if full_state is None else accelerator.get_state_dict(model)
    if main:
        save_adapter(model, run_dir / ADAPTER_FILE, state=full_state)
    # the other processes are done: release them (and flush the trackers) before the main one evaluates
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if not main:
        return {}
    metrics["versions"] = _versions()

    # ---- evaluate the final model through lm-eval ----
    if final_eval is not None and sharded:
        log.warning("ZeRO-3 shards the base model over the processes: no lm-eval pass here; run mole-eval checkpoint=%s", run_dir)
    elif final_eval is not None:
        results = evaluate(model, tokenizer, final_eval, run_dir / "eval", cfg.data.get("template", "alpaca"))
        metrics["eval"] = results.get("results", {})
    metrics["peak_memory_mb"] = round(_peak_memory_mb(), 1)
    metrics["wall_time_s"] = round(time.perf_counter() - wall_start, 3)
    metrics.update(with_status(metrics, FINISHED))
    _write_json(run_dir / METRICS_FILE, metrics)
    clear_failure(run_dir)
    log.info("run finished: %s", run_dir)
    return metrics


def _stop_on_signal(signum: int, accelerator, model, optimizer, scheduler, stream, state, run_dir: Path,
                    config_yaml: str, args, metrics: dict[str, Any], stop) -> None:
    """After a signal (:mod:`mole.training.signals`): a checkpoint of this step (whatever ``trainer.save_every``),
    ``metrics.json`` with ``interrupted: true``, then :class:`~mole.training.signals.RunInterrupted`."""
    from mole.training import checkpoint as ckpt
    from mole.training.signals import RunInterrupted, signal_name

    if accelerator.is_main_process:
        latest = ckpt.list_checkpoints(run_dir)
        if not latest or latest[-1][0] != state.step:  # trainer.save_every may have written this step already
            path = ckpt.save_checkpoint(run_dir, state.step, model=accelerator.unwrap_model(model), optimizer=optimizer,
                                        scheduler=scheduler, state=state, stream=stream, config_yaml=config_yaml,
                                        keep=args.keep_checkpoints)
            log.info("step %d: checkpoint %s", state.step, path)
        metrics.update(with_status({**metrics, "signal": signal_name(signum), "steps": state.step}, INTERRUPTED))
        _write_json(run_dir / METRICS_FILE, metrics)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    log.warning("interrupted by %s at step %d; resume with trainer.resume=true", signal_name(signum), state.step)
    if stop is not None:
        stop.chain()  # submitit: requeue the job now that its checkpoint is written
    raise RunInterrupted(state.step, signum)


def _build_selector(cfg: DictConfig, args, tokenizer, run_dir: Path, accelerator, state):
    """``trainer.val_acc_every``: a :class:`~mole.training.selection.BestSelector` scoring the validation
    benchmarks (``eval.val_benchmarks``, on their validation split and ``eval.subset``) and lm-eval tasks
    (``eval.val_tasks``) on the main process."""
    if not args.val_acc_every:
        return None
    from mole.report import headline
    from mole.training.selection import BestSelector

    eval_cfg = cfg.get("eval") or {}
    val_tasks = list(eval_cfg.get("val_tasks") or [])
    val_benchmarks = list(eval_cfg.get("val_benchmarks") or [])
    if not (val_tasks or val_benchmarks):
        raise MoleConfigError(
            "trainer.val_acc_every needs something to score: set eval.val_benchmarks (paper benchmarks, scored on "
            "their validation split) or eval.val_tasks (lm-eval tasks over validation data), or trainer.val_acc_every=0"
        )
    val_cfg = OmegaConf.merge(eval_cfg, {"tasks": val_tasks, "benchmarks": val_benchmarks, "split": "validation"})
    val_eval = check_eval_config(val_cfg)
    names = [*val_tasks, *val_benchmarks]

    def score(model) -> dict[str, float]:
        unwrapped = accelerator.unwrap_model(model)
        results = evaluate(unwrapped, tokenizer, val_eval, run_dir / "val_eval", cfg.data.get("template", "alpaca")).get("results", {})
        out = {t: headline(results.get(t)) for t in names}
        missing = [t for t, v in out.items() if v is None]
        if missing:
            raise MoleConfigError(f"eval.val_tasks/val_benchmarks {missing}: lm-eval returned no score for them")
        return out

    selector = BestSelector(score, args.val_acc_every, args.early_stop_patience, run_dir,
                            is_main_process=accelerator.is_main_process)
    selector.resume(state.val_acc)
    return selector


def _keep_last_good_adapter(model: torch.nn.Module, run_dir: Path, state, metrics: dict[str, Any]) -> str:
    """After a non-finite loss: save the adapter of the last finite step; say where it is."""
    import shutil

    from mole.training.checkpoint import adapter_is_finite, list_checkpoints

    path = run_dir / ADAPTER_FILE
    if adapter_is_finite(model):  # the loop stops before applying a non-finite step
        save_adapter(model, path)
        metrics["last_good_step"] = state.step
        return f"the adapter of step {state.step}, the last finite one, is saved in {path}"
    for step, found in reversed(list_checkpoints(run_dir)):  # weights overflowed: the newest checkpoint
        tmp = path.with_name(path.name + ".tmp")
        shutil.copyfile(found / ADAPTER_FILE, tmp)
        os.replace(tmp, path)
        metrics["last_good_step"] = step
        return f"the weights overflowed; the adapter of checkpoint step {step} is copied to {path}"
    path.unlink(missing_ok=True)  # not an adapter of an earlier attempt either
    return "the weights overflowed and no checkpoint holds finite ones; no adapter saved"


@dataclass(frozen=True)
class EvalPlan:
    """An ``eval`` config, checked once (:func:`check_eval_config`): what :func:`evaluate` hands lm-eval."""

    tasks: list[str]
    benchmarks: list[str]
    settings: Any  # mole.eval.benchmarks.EvalSettings
    batch_size: int
    limit: int | float | None
    num_fewshot: int | None
    include_path: Any


def check_eval_config(eval_cfg) -> EvalPlan:
    """The ``eval`` keys lm-eval gets, checked (before training, so a typo does not cost a run)."""
    from mole.eval.benchmarks import EvalSettings, check_available
    from mole.eval.harness import _as_path_list

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    tasks = eval_cfg.get("tasks") or []
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)  # eval.tasks=mole_mc: one task
    benchmarks = eval_cfg.get("benchmarks") or []
    benchmarks = [benchmarks] if isinstance(benchmarks, str) else [str(b) for b in benchmarks]
    if not tasks and not benchmarks:
        raise MoleConfigError("eval.tasks and eval.benchmarks are empty; name at least one, e.g. eval.tasks=[mole_mc] "
                              "or eval.benchmarks=[arc_e]")
    clash = sorted(set(map(str, tasks)) & set(benchmarks))
    if clash:
        raise MoleConfigError(f"eval.tasks and eval.benchmarks both name {clash}; name each once")
    settings = EvalSettings.from_config(eval_cfg)
    check_available(benchmarks, settings)
    batch_size = eval_cfg.get("batch_size", 8)
    if not (is_int(batch_size) and batch_size >= 1):
        raise MoleConfigError(f"eval.batch_size must be a positive integer, got {batch_size!r}")
    limit = eval_cfg.get("limit")
    if limit is not None and not ((is_int(limit) and limit >= 1) or (isinstance(limit, float) and 0 < limit <= 1)):
        raise MoleConfigError(f"eval.limit must be null, a positive number of examples or a fraction in (0, 1], got {limit!r}")
    fewshot = eval_cfg.get("num_fewshot")
    if fewshot is not None and not (is_int(fewshot) and fewshot >= 0):
        raise MoleConfigError(f"eval.num_fewshot must be null or a non-negative integer, got {fewshot!r}")
    include_path = eval_cfg.get("include_path")
    _as_path_list(include_path)  # each entry an existing directory (its own one-line error)
    return EvalPlan(tasks, benchmarks, settings, batch_size, limit, fewshot, include_path)


def has_eval(eval_cfg) -> bool:
    """Whether the ``eval`` config names anything to evaluate (lm-eval tasks or benchmarks)."""
    return bool(eval_cfg.get("tasks") or eval_cfg.get("benchmarks"))


def eval_prompt(tokenizer, template: str = "alpaca"):
    """The prompt renderer of the run's ``data.template`` for evaluation, or ``None`` for Alpaca (the tasks' Jinja)."""
    from mole.data.prompts import TEMPLATES, check_chat_template, record_prompt

    if template == "alpaca":
        return None
    if template not in TEMPLATES:
        raise MoleConfigError(f"data.template must be one of {list(TEMPLATES)}, got {template!r}")
    if template == "chat":
        check_chat_template(tokenizer)
    return lambda rec: record_prompt(rec, template, tokenizer)


def evaluate(model, tokenizer, eval_cfg: DictConfig | EvalPlan, output_dir: Path, template: str = "alpaca") -> dict:
    """lm-eval-harness over the in-memory model; writes ``output_dir/results.json``.

    ``eval_cfg``: an ``eval`` config, or the :class:`EvalPlan` that :func:`check_eval_config` made of one
    (the commands check their config before anything runs, and once).

    Prompts use ``template``, the run's ``data.template``, so the model is scored on what it was trained on.

    ``eval.benchmarks`` are rendered into task YAMLs over their records (:mod:`mole.eval.benchmarks`) and
    run next to ``eval.tasks``; their results are under the benchmark's name.
    """
    from mole.eval.benchmarks import RENDERED_SUBDIR, render_benchmarks
    from mole.eval.harness import _as_path_list, evaluate_model

    plan = eval_cfg if isinstance(eval_cfg, EvalPlan) else check_eval_config(eval_cfg)
    prompt = eval_prompt(tokenizer, template)
    output_dir.mkdir(parents=True, exist_ok=True)
    include_path = [str(p) for p in _as_path_list(plan.include_path)]
    if plan.benchmarks:
        rendered = render_benchmarks(plan.benchmarks, plan.settings, output_dir / RENDERED_SUBDIR, prompt)
        include_path = [str(rendered), *include_path]  # the user's own task YAMLs still win
    results = evaluate_model(
        model,
        tokenizer,
        [*plan.tasks, *plan.benchmarks],
        output_dir=output_dir,
        include_path=include_path or None,
        batch_size=plan.batch_size,
        limit=plan.limit,
        num_fewshot=plan.num_fewshot,
        prompt=prompt,
    )
    return results  # the harness logs the results table


def init_from_run(model: torch.nn.Module, cfg: DictConfig, source: str | Path) -> None:
    """Start from a previous run's adapter (``trainer.init_from``; MoR Table 2's second stage).

    The previous run must use the same base model and the same adapter structure (method, layout,
    router); everything else (data, trainer, seed) may differ.
    """
    source = Path(source)
    try:  # remote code only as this run's own config allows it, never as the earlier run's asks
        prev = load_run_config(source, trust_remote_code=cfg.model.get("trust_remote_code", False) is True)
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


def prepare_eval(checkpoint: str | Path, eval_overrides: DictConfig | dict | None = None, *,
                 trust_remote_code: bool = False) -> tuple[DictConfig, EvalPlan]:
    """A run's config and its checked eval settings (``eval_overrides`` over the run's own); nothing is written."""
    cfg = load_run_config(Path(checkpoint), trust_remote_code=trust_remote_code)
    return cfg, check_eval_config(OmegaConf.merge(cfg.get("eval") or {}, eval_overrides or {}))


def run_eval(checkpoint: str | Path, eval_overrides: DictConfig | dict | None = None, *,
             trust_remote_code: bool = False, prepared: tuple[DictConfig, EvalPlan] | None = None) -> dict:
    """Rebuild a run's model from ``config.yaml`` + ``adapter.safetensors`` and evaluate it.

    ``trust_remote_code``: the command line's permission for ``model.hf_id``'s own code (never the run's).
    ``prepared``: what :func:`prepare_eval` returned for this run, when the caller checked it already.
    """
    run_dir = Path(checkpoint)
    cfg, plan = prepared or prepare_eval(run_dir, eval_overrides, trust_remote_code=trust_remote_code)
    from mole.model.compile import compile_for_run

    model, tokenizer, _ = build_mole_model(cfg)
    load_adapter(model, run_dir / ADAPTER_FILE)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    clock = compile_for_run(model, cfg.get("trainer"), next(model.parameters()).device,
                            quantization(cfg.model) != "none")
    try:
        return evaluate(model, tokenizer, plan, run_dir / "eval", cfg.data.get("template", "alpaca"))
    finally:
        if clock is not None:
            clock.stop()

