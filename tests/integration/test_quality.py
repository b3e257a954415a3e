"""Real-data quality tier (``make test-quality``): training on real data makes the real model better.

SmolLM2-135M-Instruct (the shipped default) is trained briefly on real BoolQ training records of
LLM-Adapters (Hu et al., 2023) and scored by ``mole-eval`` on a held-out slice of the real BoolQ test
file (the first ``N_TEST`` records; the training records come from ``boolq/train.json``, a different
file). BoolQ is scored by log-likelihood of the two full responses ``"the correct answer is true|false"``
(``mole.eval.benchmarks``, kind ``mc``): the choice differs in one word, and a brief training run moves it.

What this catches that tiny random models cannot: a wrong prompt mask or label shift (the response
would not be learned), answer scoring that ignores the adapter, an adapter that does not reload.

Margin. An accuracy on n questions has a binomial standard error of at most sqrt(0.25 / n); the
difference of two accuracies, at most sqrt(2 * 0.25 / n) (less when the two are positively correlated,
as scores on the same questions are). The trained model must beat the untrained one by ``MARGIN``, three
of those standard errors: 0.106 at n = ``N_TEST`` = 400, so a gain that passes is not chance at this
sample size. The untrained checkpoint must score *exactly* what plain lm-eval gives the bare base model on
the same rendered task: with LoRA B = 0 every adapter adds an exact zero. Measured accuracies and times:
docs/chat-and-quality.md.

Time. The untrained checkpoint is written first (it converts the SmolLM2 cache if that is missing); then
its evaluation and the two training runs with their evaluations run side by side (``JOBS`` at a time, one
per core, up to 2), while plain lm-eval runs here. With ``pytest -s`` each phase prints its wall and CPU
time.

The data are read from ``$MOLE_LLM_ADAPTERS_DIR`` or ``../shared/data/llm-adapters`` beside the
repository (never copied into it); without them the tier is skipped, saying so.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA_ENV = "MOLE_LLM_ADAPTERS_DIR"
DATA = Path(os.environ.get(DATA_ENV) or REPO / ".." / "shared" / "data" / "llm-adapters").resolve()
BATCH = 8            # training records per optimizer step
STEPS = 25           # optimizer steps: one pass over N_TRAIN records (10 leave the accuracy where it was)
N_TRAIN = STEPS * BATCH
N_TEST = 400         # held-out BoolQ test questions
MARGIN = round(3 * math.sqrt(2 * 0.25 / N_TEST), 3)  # 3 standard errors of a difference: 0.106 (module docstring)
EVAL_BATCH = 16      # mole-eval and plain lm-eval score in the same batches, so their numbers can be equal
CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
JOBS = max(1, min(2, CPUS))
THREADS = int(os.environ.get("OMP_NUM_THREADS") or max(1, CPUS // JOBS))

pytestmark = [
    pytest.mark.quality,
    pytest.mark.skipif(not (DATA / "boolq" / "train.json").is_file() or not (DATA / "boolq" / "test.json").is_file(),
                       reason=f"the LLM-Adapters BoolQ files are not in {DATA} (set ${DATA_ENV} to their folder)"),
]


def _report(name: str, wall: float, cpu: float) -> None:
    print(f"\n[quality] {name}: {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)


def _cli(cmd: str, run_dir: Path, *args: str) -> None:
    """Run ``mole-<cmd>`` and report its wall and CPU time (its own rusage, whatever runs beside it)."""
    log = run_dir.parent / f"{run_dir.name}-{cmd}.log"
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", f"mole.cli.{cmd}", *args], cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": str(THREADS)})
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    _report(f"mole-{cmd} {run_dir.name}", time.perf_counter() - start, usage.ru_utime + usage.ru_stime)
    assert proc.returncode == 0, f"mole-{cmd} failed:\n{log.read_text()[-6000:]}"


def _train(run_dir: Path, method: str, steps: int) -> Path:
    _cli("train", run_dir, f"method={method}", "data=boolq", f"data.root={DATA}", f"data.max_records={N_TRAIN + 4}",
         "data.val_size=4", f"trainer.max_steps={steps}", f"trainer.batch_size={BATCH}",
         "trainer.lr=1e-3", "trainer.eval_every=0", "trainer.warmup_steps=0", "eval=none", "seed=0",
         f"hydra.run.dir={run_dir}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    if steps:
        print(f"[quality]   {run_dir.name}: {steps} steps in {metrics['train_time_s']} s, validation loss "
              f"{metrics['val_loss'][0]['loss']:.3f} -> {metrics['val_loss'][-1]['loss']:.3f}", flush=True)
    return run_dir


def _eval(run_dir: Path) -> float:
    _cli("eval", run_dir, f"checkpoint={run_dir}", "eval.tasks=[]", "eval.benchmarks=[boolq]",
         f"eval.data_root={DATA}", f"eval.limit={N_TEST}", f"eval.batch_size={EVAL_BATCH}")
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert results["n-samples"]["boolq"]["effective"] == N_TEST
    return results["results"]["boolq"]["acc,none"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The futures of ``(run_dir, accuracy)`` for ``untrained``, ``lora`` and ``mola``, run side by side."""
    root = tmp_path_factory.mktemp("quality")
    untrained = _train(root / "untrained", "lora", 0)  # first, alone: a missing SmolLM2 cache is converted once
    with ThreadPoolExecutor(max_workers=JOBS) as pool:
        yield {
            "untrained": pool.submit(lambda: (untrained, _eval(untrained))),
            **{m: pool.submit(lambda m=m: (root / m, _eval(_train(root / m, m, STEPS)))) for m in ("lora", "mola")},
        }


def test_untrained_checkpoint_scores_what_plain_lm_eval_gives_the_base_model(runs):
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from omegaconf import OmegaConf

    from mole.eval.benchmarks import RENDERED_SUBDIR
    from mole.model.base import build_model

    run_dir, acc = runs["untrained"].result()
    cfg = OmegaConf.load(run_dir / "config.yaml")
    torch.set_num_threads(THREADS)
    wall, cpu = time.perf_counter(), time.process_time()
    model, tok = build_model(cfg.model)  # the bare base model: no adapter anywhere
    manager = TaskManager(include_path=str(run_dir / "eval" / RENDERED_SUBDIR), include_defaults=False)
    raw = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=EVAL_BATCH), tasks=["boolq"],
                          task_manager=manager, limit=N_TEST, log_samples=False)
    _report("plain lm-eval, bare base model", time.perf_counter() - wall, time.process_time() - cpu)
    print(f"untrained: BoolQ accuracy {acc:.4f} (mole-eval), {raw['results']['boolq']['acc,none']:.4f} "
          f"(plain lm-eval) on {N_TEST} test questions")
    assert raw["results"]["boolq"]["acc,none"] == acc


@pytest.mark.parametrize("method", ["lora", "mola"])
def test_brief_training_on_real_data_beats_the_untrained_model(runs, method):
    _, before = runs["untrained"].result()
    _, after = runs[method].result()
    print(f"{method}: BoolQ accuracy {before:.4f} -> {after:.4f} (+{after - before:.4f}, margin {MARGIN}) "
          f"on {N_TEST} held-out test questions")
    assert after >= before + MARGIN, (method, before, after)
