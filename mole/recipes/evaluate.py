"""``mole-eval`` as a recipe: check the eval config, rebuild the run's model, load its adapter, evaluate.

* :func:`check_eval_config` — the ``eval`` keys lm-eval gets, checked once into an :class:`EvalPlan`.
* :func:`evaluate` — lm-eval-harness over an in-memory model (also the last step of :mod:`mole.recipes.train`).
* :func:`prepare_eval` / :func:`run_eval` — a finished run's config checked, then its model rebuilt from
  ``config.yaml`` + ``adapter.safetensors`` and evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from mole.build import build_mole_model
from mole.data.prompts import TEMPLATES, check_chat_template, record_prompt
from mole.eval.benchmarks import RENDERED_SUBDIR, EvalSettings, check_available, render_benchmarks
from mole.eval.harness import evaluate_model, include_paths
from mole.model.base import quantization
from mole.model.compile import compile_for_run
from mole.model.state import ADAPTER_FILE, load_adapter
from mole.run_dir import load_run_config
from mole.utils.errors import MoleConfigError


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
    include_paths(include_path)  # each entry an existing directory (its own one-line error)
    return EvalPlan(tasks, benchmarks, settings, batch_size, limit, fewshot, include_path)


def has_eval(eval_cfg) -> bool:
    """Whether the ``eval`` config names anything to evaluate (lm-eval tasks or benchmarks)."""
    return bool(eval_cfg.get("tasks") or eval_cfg.get("benchmarks"))


def eval_prompt(tokenizer, template: str = "alpaca"):
    """The prompt renderer of the run's ``data.template`` for evaluation, or ``None`` for Alpaca (the tasks' Jinja)."""
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
    plan = eval_cfg if isinstance(eval_cfg, EvalPlan) else check_eval_config(eval_cfg)
    prompt = eval_prompt(tokenizer, template)
    output_dir.mkdir(parents=True, exist_ok=True)
    include_path = [str(p) for p in include_paths(plan.include_path)]
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
