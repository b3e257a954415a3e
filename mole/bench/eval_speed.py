"""``mole-eval``'s log-likelihood throughput against plain lm-eval on the same model and tasks."""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from pathlib import Path

from torch import nn

from mole.bench.variants import Setup
from mole.eval.harness import RENDERED_TASKS_SUBDIR, evaluate_model, render_shipped_tasks


def eval_throughput(setup: Setup, base: nn.Module, tokenizer, out_dir: Path, log) -> dict:
    """Seconds per run of the same log-likelihood requests: mole's harness vs plain lm-eval, alternating."""
    # lm-eval is imported here, as mole's harness does: a run with --no-eval does not pay for its import
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = ["mole_mc", "mole_yesno"]
    work = Path(tempfile.mkdtemp(prefix="bench-eval-", dir=out_dir))
    rendered = render_shipped_tasks(work / "lm" / RENDERED_TASKS_SUBDIR)
    base.eval()

    def run_mole() -> dict:
        return evaluate_model(base, tokenizer, tasks, output_dir=work / "mole", batch_size=8, limit=setup.eval_limit)

    def run_lm_eval() -> dict:
        lm = HFLM(pretrained=base, tokenizer=tokenizer, batch_size=8)
        manager = TaskManager(include_path=[str(rendered)], include_defaults=False)
        return simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=setup.eval_limit, log_samples=False)

    quiet = [logging.getLogger(n) for n in ("lm_eval", "mole.eval.harness", "lm-eval")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    try:
        run_mole(), run_lm_eval()  # warm-up: imports, tokenizer caches
        ratios, t_mole, t_lm = [], [], []
        for i in range(setup.eval_repeats):
            pair = [("mole", run_mole), ("lm", run_lm_eval)]
            if i % 2:
                pair.reverse()
            got = {}
            for key, fn in pair:
                t0 = time.perf_counter()
                res = fn()
                got[key] = time.perf_counter() - t0
                n = sum(v["effective"] for v in res["n-samples"].values())
            t_mole.append(got["mole"])
            t_lm.append(got["lm"])
            ratios.append(got["lm"] / got["mole"])  # throughput ratio = inverse time ratio
            log(f"  eval {i + 1}/{setup.eval_repeats}: mole {got['mole']:.2f} s, lm-eval {got['lm']:.2f} s")
    finally:
        for lg, level in zip(quiet, levels, strict=True):
            lg.setLevel(level)
    return {"ratio": statistics.median(ratios), "mole_eval_s": statistics.median(t_mole),
            "lm_eval_s": statistics.median(t_lm), "documents": n, "limit": setup.eval_limit}

