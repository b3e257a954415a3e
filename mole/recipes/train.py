"""``mole-train`` as a recipe: set up, train, save, evaluate — one run into its run directory.

:func:`run_train` takes the run directory's lock, skips a run that is already finished and records a
failure (:mod:`mole.training.failures`); :func:`train_run` is the run itself, four steps in order:

1. :func:`setup` — check the config, build the accelerator, model, data, optimizer and scheduler
   (:mod:`mole.build`), resume from a checkpoint, write ``config.yaml``;
2. :func:`train_steps` — the training loop, with model selection on validation accuracy when asked;
3. :func:`save` — after a signal, a checkpoint and ``interrupted: true``; else ``adapter.safetensors``;
4. :func:`finish` — lm-eval over the final model (:mod:`mole.recipes.evaluate`) and ``metrics.json``.

In a multi-process run (started by ``accelerate launch``, see :mod:`mole.training.launch`) every process
trains its shard; only the main one writes files.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import resource
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import accelerate
import torch
import transformers
from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf

import mole
from mole.build import build_aux_losses, build_loaders, build_mole_model, parameter_report, run_seed
from mole.config_schema import validate_config
from mole.model.base import enable_gradient_checkpointing, quantization
from mole.model.compile import compile_for_run
from mole.model.state import ADAPTER_FILE, load_adapter, save_adapter
from mole.recipes.evaluate import EvalPlan, check_eval_config, evaluate, has_eval
from mole.report import headline
from mole.run_dir import (
    CONFIG_FILE,
    FINISHED,
    INTERRUPTED,
    METRICS_FILE,
    RUNNING,
    finished_run,
    load_run_config,
    lock_run,
    with_status,
    write_json,
    write_text,
)
from mole.training import TrainArgs, TrainState, train
from mole.training import checkpoint as ckpt
from mole.training.distributed import (
    DistributedArgs,
    build_accelerator,
    check_same_config,
    check_shared_run_dir,
    is_deepspeed,
    release_process_group,
)
from mole.training.failures import clear_failure, record_failure
from mole.training.loop import total_steps
from mole.training.optim import build_optimizer, build_scheduler
from mole.training.selection import BestSelector, Scorer
from mole.training.signals import RunInterrupted, StopRequest, requeued, signal_name
from mole.training.tracking import RoutingMonitor, check_trackers, start_trackers
from mole.utils.errors import MoleConfigError, NonFiniteLossError
from mole.utils.secrets import redacted_yaml

log = logging.getLogger(__name__)


def run_train(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Train one run into ``run_dir`` and return its metrics (see the module docstring).

    A failure leaves ``metrics.json`` with ``failed: true`` and ``error.txt`` (:mod:`mole.training.failures`)
    and is raised again; a non-finite loss keeps the adapter of the last finite step.
    """
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
            write_json(run_dir / METRICS_FILE, with_status({"pid": os.getpid()}, RUNNING))
        metrics: dict[str, Any] = {}  # filled as the run goes, so a failure records what was measured
        try:
            with StopRequest() as stop:  # SIGTERM / SIGINT: stop at the next step boundary (RunInterrupted)
                return train_run(cfg, run_dir, metrics, stop)
        except (Exception, KeyboardInterrupt) as err:
            if main:
                record_failure(run_dir, err, metrics)
            release_process_group()
            raise


def train_run(cfg: DictConfig, run_dir: Path, metrics: dict[str, Any], stop: StopRequest | None = None) -> dict[str, Any]:
    """The run itself: setup -> train -> save -> evaluate. ``metrics`` is filled as the run goes."""
    wall_start = time.perf_counter()
    run = setup(cfg, run_dir, metrics)
    train_steps(run, metrics, stop)
    model, sharded = save(run, metrics, stop)
    if not run.main:
        return {}
    return finish(run, model, sharded, metrics, wall_start)


@dataclass
class TrainRun:
    """What :func:`setup` built, handed down the recipe's steps (the model and the rest as Accelerate prepared them)."""

    cfg: DictConfig
    run_dir: Path
    args: TrainArgs
    accelerator: Any  # accelerate.Accelerator
    model: torch.nn.Module
    tokenizer: Any
    report: Any  # mole.model.inject.InjectionReport
    aux_losses: dict
    final_eval: EvalPlan | None
    optimizer: Any
    scheduler: Any
    train_loader: Any
    val_loader: Any
    stream: ckpt.BatchStream
    state: TrainState
    num_steps: int
    resume_from: Path | None
    config_yaml: str
    checkpointer: ckpt.Checkpointer | None
    compile_clock: Any
    selector: BestSelector | None = None

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def setup(cfg: DictConfig, run_dir: Path, metrics: dict[str, Any]) -> TrainRun:
    """Validate and build (cheap checks first, then the model); resume from a checkpoint; write ``config.yaml``."""
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
        write_text(run_dir / CONFIG_FILE, config_yaml)
    checkpointer = ckpt.Checkpointer(
        run_dir, args.save_every, args.keep_checkpoints, model=accelerator.unwrap_model(model), optimizer=optimizer,
        scheduler=scheduler, stream=stream, config_yaml=config_yaml, is_main_process=main,
    ) if args.save_every else None
    return TrainRun(cfg, run_dir, args, accelerator, model, tokenizer, report, aux_losses, final_eval, optimizer,
                    scheduler, train_loader, val_loader, stream, state, num_steps, resume_from, config_yaml,
                    checkpointer, compile_clock)


def train_steps(run: TrainRun, metrics: dict[str, Any], stop: StopRequest | None) -> None:
    """The training loop; the curve so far goes into ``metrics`` whatever happens."""
    args, accelerator, state = run.args, run.accelerator, run.state
    global_batch = args.batch_size * accelerator.num_processes * args.grad_accum
    log.info("training %d steps (%d train / %d val records; global batch %d = %d x %d processes x %d accumulation)%s",
             run.num_steps, metrics["train_records"], metrics["val_records"], global_batch, args.batch_size,
             accelerator.num_processes, args.grad_accum,
             f", resumed after step {state.step}" if run.resume_from is not None else "")
    monitor = RoutingMonitor(run.report.routers_per_layer)
    run.selector = build_selector(run.cfg, args, run.run_dir, accelerator, state,
                                  lambda val_eval, names: validation_scorer(run, val_eval, names))
    try:
        train(run.model, run.optimizer, run.scheduler, run.train_loader, run.val_loader, run.aux_losses, args,
              accelerator, run.num_steps, state=state, batches=run.stream, on_step=run.checkpointer, monitor=monitor,
              selector=run.selector, stop=stop)
    except NonFiniteLossError as err:
        kept = keep_last_good_adapter(accelerator.unwrap_model(run.model), run.run_dir, state, metrics) if run.main else ""
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
        if run.compile_clock is not None:  # compilation happens inside the first steps' time
            metrics["compile"] = {"backend": args.compile_backend, **run.compile_clock.stop()}
        if run.selector is not None:
            metrics.update({"val_acc": state.val_acc, "best_step": state.best_step, "stopped_early": state.stopped_early})


def save(run: TrainRun, metrics: dict[str, Any], stop: StopRequest | None) -> tuple[torch.nn.Module, bool]:
    """Stop after a signal (:func:`stop_on_signal`), else save ``adapter.safetensors`` (the best one under
    ``trainer.keep_best``) and release the other processes. Returns the unwrapped model and whether
    ZeRO-3 shards it."""
    accelerator, state = run.accelerator, run.state
    signum = state.interrupted or (stop.agreed(accelerator) if stop is not None else None)
    if signum is not None:
        stop_on_signal(signum, run, metrics, stop)
    sharded = is_deepspeed(accelerator) and accelerator.state.deepspeed_plugin.zero_stage == 3
    # ZeRO-3 shards the parameters: gathering them is a collective every process joins
    full_state = accelerator.get_state_dict(run.model) if sharded else None
    model = accelerator.unwrap_model(run.model)
    if run.selector is not None and run.args.keep_best:
        run.selector.restore_best(model)  # the adapter saved and evaluated below is the best one
        full_state = None if full_state is None else accelerator.get_state_dict(model)
    if run.main:
        save_adapter(model, run.run_dir / ADAPTER_FILE, state=full_state)
    # the other processes are done: release them (and flush the trackers) before the main one evaluates
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return model, sharded


def finish(run: TrainRun, model: torch.nn.Module, sharded: bool, metrics: dict[str, Any], wall_start: float) -> dict[str, Any]:
    """On the main process: evaluate the final model through lm-eval and write ``metrics.json`` (finished)."""
    metrics["versions"] = versions()
    if run.final_eval is not None and sharded:
        log.warning("ZeRO-3 shards the base model over the processes: no lm-eval pass here; run mole-eval checkpoint=%s",
                    run.run_dir)
    elif run.final_eval is not None:
        results = evaluate(model, run.tokenizer, run.final_eval, run.run_dir / "eval", run.cfg.data.get("template", "alpaca"))
        metrics["eval"] = results.get("results", {})
    metrics["peak_memory_mb"] = round(peak_memory_mb(), 1)
    metrics["wall_time_s"] = round(time.perf_counter() - wall_start, 3)
    metrics.update(with_status(metrics, FINISHED))
    write_json(run.run_dir / METRICS_FILE, metrics)
    clear_failure(run.run_dir)
    log.info("run finished: %s", run.run_dir)
    return metrics


def stop_on_signal(signum: int, run: TrainRun, metrics: dict[str, Any], stop: StopRequest | None) -> None:
    """After a signal (:mod:`mole.training.signals`): a checkpoint of this step (whatever ``trainer.save_every``),
    ``metrics.json`` with ``interrupted: true``, then :class:`~mole.training.signals.RunInterrupted`."""
    accelerator, state, run_dir = run.accelerator, run.state, run.run_dir
    if accelerator.is_main_process:
        latest = ckpt.list_checkpoints(run_dir)
        if not latest or latest[-1][0] != state.step:  # trainer.save_every may have written this step already
            path = ckpt.save_checkpoint(run_dir, state.step, model=accelerator.unwrap_model(run.model),
                                        optimizer=run.optimizer, scheduler=run.scheduler, state=state,
                                        stream=run.stream, config_yaml=run.config_yaml,
                                        keep=run.args.keep_checkpoints)
            log.info("step %d: checkpoint %s", state.step, path)
        metrics.update(with_status({**metrics, "signal": signal_name(signum), "steps": state.step}, INTERRUPTED))
        write_json(run_dir / METRICS_FILE, metrics)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    log.warning("interrupted by %s at step %d; resume with trainer.resume=true", signal_name(signum), state.step)
    if stop is not None:
        stop.chain()  # submitit: requeue the job now that its checkpoint is written
    raise RunInterrupted(state.step, signum)


def build_selector(cfg: DictConfig, args: TrainArgs, run_dir: Path, accelerator, state: TrainState,
                   make_scorer) -> BestSelector | None:
    """``trainer.val_acc_every``: a :class:`~mole.training.selection.BestSelector` scoring the validation
    benchmarks (``eval.val_benchmarks``, on their validation split and ``eval.subset``) and lm-eval tasks
    (``eval.val_tasks``) on the main process. ``make_scorer(plan, names)`` makes the scoring function of
    the checked validation eval config."""
    if not args.val_acc_every:
        return None
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
    selector = BestSelector(make_scorer(val_eval, [*val_tasks, *val_benchmarks]), args.val_acc_every,
                            args.early_stop_patience, run_dir, is_main_process=accelerator.is_main_process)
    selector.resume(state.val_acc)
    return selector


def validation_scorer(run: TrainRun, val_eval: EvalPlan, names: list[str]) -> Scorer:
    """The model-selection score: lm-eval over ``val_eval``, each task's headline metric."""

    def score(model) -> dict[str, float]:
        unwrapped = run.accelerator.unwrap_model(model)
        results = evaluate(unwrapped, run.tokenizer, val_eval, run.run_dir / "val_eval",
                           run.cfg.data.get("template", "alpaca")).get("results", {})
        out = {t: headline(results.get(t)) for t in names}
        missing = [t for t, v in out.items() if v is None]
        if missing:
            raise MoleConfigError(f"eval.val_tasks/val_benchmarks {missing}: lm-eval returned no score for them")
        return out

    return score


def keep_last_good_adapter(model: torch.nn.Module, run_dir: Path, state: TrainState, metrics: dict[str, Any]) -> str:
    """After a non-finite loss: save the adapter of the last finite step; say where it is."""
    path = run_dir / ADAPTER_FILE
    if ckpt.adapter_is_finite(model):  # the loop stops before applying a non-finite step
        save_adapter(model, path)
        metrics["last_good_step"] = state.step
        return f"the adapter of step {state.step}, the last finite one, is saved in {path}"
    for step, found in reversed(ckpt.list_checkpoints(run_dir)):  # weights overflowed: the newest checkpoint
        tmp = path.with_name(path.name + ".tmp")
        shutil.copyfile(found / ADAPTER_FILE, tmp)
        os.replace(tmp, path)
        metrics["last_good_step"] = step
        return f"the weights overflowed; the adapter of checkpoint step {step} is copied to {path}"
    path.unlink(missing_ok=True)  # not an adapter of an earlier attempt either
    return "the weights overflowed and no checkpoint holds finite ones; no adapter saved"


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


def versions() -> dict[str, str]:
    """The versions of mole and the libraries that shape a run's numbers (``metrics.json``'s ``versions``)."""
    out = {"mole": mole.__version__, "python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "accelerate": accelerate.__version__}
    try:
        import lm_eval  # optional at training time: only its version is recorded

        out["lm_eval"] = getattr(lm_eval, "__version__", "unknown")
    except ImportError:
        pass
    return out


def peak_memory_mb() -> float:
    """Peak memory of this process: allocated CUDA memory, or the resident set on the CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
