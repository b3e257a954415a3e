"""The training loop: one readable function, phases fenced with comments (nanochat / torchtune style)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from mole.data.collate import IGNORE_INDEX
from mole.losses.lm import lm_loss
from mole.losses.routing import AuxLoss
from mole.model.routing import collect_routing
from mole.routers.context import routing_inputs
from mole.training.args import TrainArgs
from mole.training.distributed import backward, grad_sync, lm_normalizer, reduce_mean
from mole.utils.errors import NonFiniteLossError

__all__ = ["NonFiniteLossError", "TrainState", "loss_step", "total_steps", "train", "validation_loss"]

log = logging.getLogger(__name__)



@dataclass
class TrainState:
    """What the loop measured; written to ``metrics.json``."""

    step: int = 0
    train_loss: list[dict] = field(default_factory=list)  # every step: loss, lm_loss, aux terms, lr
    val_loss: list[dict] = field(default_factory=list)  # per evaluation: step, loss
    routing_stats: list[dict] = field(default_factory=list)  # every log_every steps: step, per-layer entropies
    train_time_s: float = 0.0  # optimisation steps only (forward, backward, optimizer)
    eval_time_s: float = 0.0  # validation-loss passes
    val_acc: list[dict] = field(default_factory=list)  # per accuracy evaluation: step, mean, per benchmark
    best_step: int | None = None  # the step with the best mean validation accuracy (trainer.val_acc_every)
    stopped_early: bool = False  # trainer.early_stop_patience ended the run before num_steps
    interrupted: int | None = None  # the signal that stopped the run at a step boundary (mole.training.signals)


def loss_step(
    model: nn.Module,
    batch: dict,
    aux_losses: dict[str, AuxLoss],
    *,
    num_tokens: torch.Tensor | None = None,
    on_routing: Callable | None = None,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict]:
    """Forward one micro-batch: LM loss plus the weighted auxiliary routing terms.

    Args:
        num_tokens: divide the LM loss's token sum by this instead of this batch's token count (several
            processes: see :func:`mole.training.distributed.lm_normalizer`).
        on_routing: called with ``(router outputs, token mask)`` after the forward (routing statistics).
        label_smoothing: of the LM loss (``trainer.label_smoothing``).

    Returns ``(total loss, {"lm_loss": ..., "aux/<name>": unweighted value})`` with tensors, no syncs.
    """
    with collect_routing(model) as routing, routing_inputs(model, prompt_mask(batch), question_inputs(batch)):
        # use_cache=False: a training forward has no use for a KV cache (transformers would build one and copy
        # every layer's keys and values into it)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits  # (B, T, V)
    if num_tokens is None:
        lm = lm_loss(logits, batch["labels"], label_smoothing=label_smoothing)
    else:
        lm = lm_loss(logits, batch["labels"], reduction="sum", label_smoothing=label_smoothing) / num_tokens
    parts = {"lm_loss": lm.detach()}
    total = lm
    # router rows are the batch's tokens in (B, T) order; padding is left out of every statistic
    token_mask = batch["attention_mask"].reshape(-1).bool()  # (B*T,)
    if on_routing is not None:
        on_routing(routing, token_mask)
    if aux_losses:
        for name, term in aux_losses.items():
            value = term(routing, token_mask).to(lm.device)
            parts[f"aux/{name}"] = value.detach()
            total = total + term.weight * value
    return total, parts


def prompt_mask(batch: dict) -> torch.Tensor:
    """``(B, T)`` bool: the prompt's real tokens (not scored by the LM loss), HMoRA eq. 6's ``T^in``."""
    return (batch["labels"] == IGNORE_INDEX) & batch["attention_mask"].bool()


def question_inputs(batch: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(B, Q)`` token ids and bool mask of each sequence's raw question, when the data carries them
    (``router.task_encoder.input=raw``; :class:`mole.data.Collator`)."""
    if "question_ids" not in batch:
        return None
    return batch["question_ids"], batch["question_mask"].bool()


def step_losses(model: nn.Module, aux_losses: dict[str, AuxLoss], batches: list[tuple]) -> dict[str, torch.Tensor]:
    """The auxiliary terms computed once per optimizer step over all its micro-batches (a term's
    ``step_loss``; HMoRA's task-router CGJS under ``loss.cgjs.task_scope=optimizer_step``), unweighted, by
    the term's name.

    ``batches`` holds each micro-batch's ``(input_ids, prompt mask, raw-question inputs)``.
    """
    values = {}
    for name, term in aux_losses.items():
        value = term.step_loss(model, batches)  # None for a term computed per micro-batch only (AuxLoss)
        if value is not None:
            values[name] = value
    return values


@torch.no_grad()
def validation_loss(model: nn.Module, loader: DataLoader | None, accelerator=None) -> float | None:
    """Token-weighted mean LM loss over the validation set (``None`` without one).

    With several processes each sees a shard; per-example sums are gathered (``gather_for_metrics``
    drops the examples Accelerate repeats to even out the last batch) so every process gets the mean
    over the whole set.
    """
    if loader is None:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    gather = accelerator is not None and accelerator.num_processes > 1
    for batch in loader:
        with routing_inputs(model, prompt_mask(batch), question_inputs(batch)):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        if gather:
            b = logits.shape[0]
            sums = lm_loss(logits, batch["labels"], reduction="none").view(b, -1).sum(dim=1)  # (B,) per example
            counts = (batch["labels"][:, 1:] != -100).sum(dim=1)  # (B,)
            sums, counts = accelerator.gather_for_metrics((sums, counts))
            total += sums.sum().item()
            count += int(counts.sum())
        else:
            total += lm_loss(logits, batch["labels"], reduction="sum").item()
            count += int((batch["labels"][:, 1:] != -100).sum())
    model.train(was_training)
    return total / max(count, 1)


def _batches(loader: DataLoader) -> Iterator[dict]:
    """Endless batches: epoch after epoch (a seeded sampler reshuffles each epoch)."""
    while True:
        yield from loader


def total_steps(args: TrainArgs, num_batches: int) -> int:
    if args.max_steps is not None:
        return args.max_steps
    return max(1, math.ceil(args.epochs * num_batches / args.grad_accum))


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    train_loader: DataLoader,
    val_loader: DataLoader | None,
    aux_losses: dict[str, AuxLoss],
    args: TrainArgs,
    accelerator,
    num_steps: int,
    state: TrainState | None = None,
    batches: Iterator[dict] | None = None,
    on_step: Callable[[int, TrainState], None] | None = None,
    monitor=None,
    selector=None,
    stop=None,
) -> TrainState:
    """Run optimizer steps up to ``num_steps``; evaluate validation loss at the start, every ``eval_every``
    steps and at the end.

    A resumed run passes its restored ``state`` (the loop continues after ``state.step``) and the
    positioned ``batches`` (:class:`mole.training.checkpoint.BatchStream`); ``on_step(step, state)`` runs
    after each step (checkpoints). Raises :class:`NonFiniteLossError` before applying a step whose loss or
    gradient norm is not finite, so the weights are those of the last finite step.

    Losses are averaged over processes (the global batch's); ``monitor`` (a
    :class:`mole.training.tracking.RoutingMonitor`) collects routing statistics every ``log_every`` steps.
    Scalars go to ``accelerator.log`` (a no-op without trackers). ``selector`` (a
    :class:`mole.training.selection.BestSelector`) measures validation accuracy every
    ``trainer.val_acc_every`` steps, remembers the best adapter and stops the run early after
    ``trainer.early_stop_patience`` evaluations without improvement. ``stop`` (a
    :class:`mole.training.signals.StopRequest`) is read after every step: when a process received a
    signal, the loop ends after that step with ``state.interrupted`` set.
    """
    state = state if state is not None else TrainState()

    def evaluate(step: int) -> None:
        start = time.perf_counter()
        loss = validation_loss(model, val_loader, accelerator)
        state.eval_time_s += time.perf_counter() - start
        if loss is not None:
            state.val_loss.append({"step": step, "loss": loss})
            accelerator.log({"val/loss": loss}, step=step)
            log.info("step %d: val/loss %.4f", step, loss)

    if state.step == 0:  # a resumed run restored its history
        evaluate(0)
    if state.step >= num_steps:
        return state

    model.train()
    per_step = any(term.per_step for term in aux_losses.values())  # a term with a step_loss
    batches = batches if batches is not None else _batches(train_loader)
    progress = tqdm(total=num_steps, initial=state.step, desc="train", unit="step",
                    disable=not accelerator.is_main_process, dynamic_ncols=True)
    # logging_redirect_tqdm: console log lines go above the progress bar instead of through it
    with progress as bar, logging_redirect_tqdm():
        for step in range(state.step + 1, num_steps + 1):
            # ---- single optimisation step: grad_accum micro-batches ----
            step_start = time.perf_counter()
            totals: dict[str, torch.Tensor] = {}
            log_step = step % args.log_every == 0 or step == num_steps
            hook = monitor if (log_step and monitor is not None and monitor.active) else None
            step_inputs: list[tuple] = []  # the micro-batches' task-encoder inputs, for terms computed per step
            for micro in range(args.grad_accum):
                batch = next(batches)
                last = micro == args.grad_accum - 1
                if per_step:
                    step_inputs.append((batch["input_ids"], prompt_mask(batch), question_inputs(batch)))
                with grad_sync(accelerator, model, last):  # DDP all-reduces gradients once per optimizer step
                    loss, parts = loss_step(model, batch, aux_losses,
                                            num_tokens=lm_normalizer(accelerator, batch["labels"]),
                                            on_routing=hook, label_smoothing=args.label_smoothing)
                    if last and per_step:
                        # added to the last micro-batch's loss, so scaled by 1 / grad_accum with it: its weight
                        # against the micro-batches' mean LM loss is weight / grad_accum, as in HMoRA's released
                        # code, which sums the micro-batch losses and adds the step term once
                        for name, value in step_losses(model, aux_losses, step_inputs).items():
                            loss = loss + aux_losses[name].weight * value.to(loss.device)
                            totals[f"aux/{name}_step"] = value.detach().float()
                    # each backward() adds to the gradients; micro-batches are averaged (see backward())
                    backward(accelerator, loss, args.grad_accum)
                for k, v in {"loss": loss.detach(), **parts}.items():  # on the device: no host sync here
                    totals[k] = totals.get(k, 0.0) + v.float() / args.grad_accum
            # averaged over processes (the global batch's values): one collective and one host sync per step
            sums = reduce_mean(accelerator, totals)
            if not math.isfinite(sums["loss"]):
                raise NonFiniteLossError(
                    f"training loss became {sums['loss']} at step {step}; lower trainer.lr or check the data"
                )
            if args.max_grad_norm > 0:
                # a tensor, or under DeepSpeed the engine's global norm as a Python float (None before its first step)
                norm = accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], args.max_grad_norm)
                if norm is not None and not math.isfinite(float(norm)):  # the step would write NaN into the weights
                    raise NonFiniteLossError(
                        f"gradient norm became {float(norm)} at step {step}; lower trainer.lr or check the data"
                    )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step = step
            state.train_time_s += time.perf_counter() - step_start

            # ---- logging (CPU only) ----
            lr = scheduler.get_last_lr()[0]
            state.train_loss.append({"step": step, **{k: round(v, 6) for k, v in sums.items()}, "lr": lr})
            scalars = {**sums, "lr": lr}
            if hook is not None:
                routing = hook.pop(accelerator)
                if routing:
                    state.routing_stats.append({"step": step, **{k: round(v, 6) for k, v in routing.items()}})
                    scalars.update(routing)
            accelerator.log(scalars, step=step)
            bar.update(1)
            if log_step:
                bar.set_postfix(loss=f"{sums['loss']:.4f}", lm=f"{sums['lm_loss']:.4f}", lr=f"{lr:.2e}")
                log.info("step %d/%d: %s", step, num_steps, " ".join(f"{k} {v:.4f}" for k, v in sums.items()))

            # ---- once in a while: validation loss (and always after the last step) ----
            if step == num_steps or (args.eval_every and step % args.eval_every == 0):
                evaluate(step)
            stop_early = selector is not None and selector.due(step, num_steps) and selector.update(model, step, state)
            if on_step is not None:
                on_step(step, state)
            signum = stop.agreed(accelerator) if stop is not None else None  # the same on every process
            if signum is not None and step < num_steps:
                state.interrupted = signum
                log.info("step %d: stopping on a signal", step)
                break
            if stop_early:
                state.stopped_early = True
                log.info("step %d: no better validation accuracy in %d evaluations; stopping early",
                         step, args.early_stop_patience)
                if not state.val_loss or state.val_loss[-1]["step"] != step:
                    evaluate(step)
                break
    return state
