"""Model selection on validation accuracy: evaluate every N steps, keep the best adapter, stop early.

HMoRA (Sec. 5.1) evaluates on its validation subsets every 200 steps, stops after 10 evaluations without
improvement and reports the checkpoint with the best mean validation accuracy; ``trainer.val_acc_every``,
``trainer.early_stop_patience`` and ``trainer.keep_best`` do that for any run. The best adapter is written to
``RUN_DIR/best/adapter.safetensors`` (safetensors only) whenever the mean improves, so it survives a resume.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable
from pathlib import Path

from torch import nn

from mole.model.state import load_adapter, save_adapter

log = logging.getLogger(__name__)

BEST_DIR = "best"
BEST_ADAPTER = "adapter.safetensors"

Scorer = Callable[[nn.Module], dict[str, float]]  # model -> {validation benchmark: accuracy}


class BestSelector:
    """Score the model every ``every`` steps (and after the last); remember the best; say when to stop.

    Args:
        score: returns ``{benchmark: accuracy}`` for the model as it is (it must leave the model's mode as it found it).
        every: steps between evaluations (``trainer.val_acc_every``).
        patience: evaluations without a better mean before :meth:`update` answers "stop" (0: never).
        run_dir: where ``best/adapter.safetensors`` goes; ``None`` keeps nothing on disk.
        is_main_process: only the main process writes.
    """

    def __init__(self, score: Scorer, every: int, patience: int = 0, run_dir: Path | None = None,
                 is_main_process: bool = True) -> None:
        if every <= 0:
            raise ValueError("every must be > 0")
        self.score, self.every, self.patience = score, every, patience
        self.run_dir, self.main = run_dir, is_main_process
        self.best: float | None = None
        self.since_best = 0

    @property
    def best_path(self) -> Path | None:
        return None if self.run_dir is None else Path(self.run_dir) / BEST_DIR / BEST_ADAPTER

    def due(self, step: int, num_steps: int) -> bool:
        return step % self.every == 0 or step == num_steps

    def resume(self, history: list[dict]) -> None:
        """Continue a resumed run's selection from its recorded evaluations."""
        for entry in history:
            self._record(entry["mean"])

    def _record(self, mean: float) -> bool:
        improved = self.best is None or mean > self.best
        if improved:
            self.best, self.since_best = mean, 0
        else:
            self.since_best += 1
        return improved

    def update(self, model: nn.Module, step: int, state) -> bool:
        """Evaluate now, record it in ``state.val_acc``; return ``True`` when the run should stop."""
        scores = {k: float(v) for k, v in self.score(model).items()}
        if not scores:
            raise ValueError("the validation scorer returned no benchmark")
        mean = statistics.fmean(scores.values())
        state.val_acc.append({"step": step, "mean": round(mean, 6), **{k: round(v, 6) for k, v in scores.items()}})
        if self._record(mean):
            state.best_step = step
            if self.main and self.best_path is not None:
                self.best_path.parent.mkdir(parents=True, exist_ok=True)
                save_adapter(model, self.best_path)
        log.info("step %d: validation accuracy %.4f (best %.4f at step %s) %s", step, mean, self.best,
                 state.best_step, " ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        return bool(self.patience) and self.since_best >= self.patience

    def restore_best(self, model: nn.Module) -> None:
        """Load the best adapter back into ``model`` (``trainer.keep_best``)."""
        if self.best_path is not None and self.best_path.is_file():
            load_adapter(model, self.best_path)
