"""Real-data quality tier (``make test-quality``): training on real data makes the real model better.

SmolLM2-135M-Instruct (the shipped default) is trained briefly on real BoolQ training records of
LLM-Adapters (Hu et al., 2023) and scored by ``mole-eval`` on a held-out slice of the real BoolQ test
file (the first ``N_TEST`` records; the training records come from ``boolq/train.json``, a different
file). BoolQ is scored by log-likelihood of the two full responses ``"the correct answer is true|false"``
(``mole.eval.benchmarks``, kind ``mc``): the choice differs in one word, and a brief training run moves it.

What this catches that tiny random models cannot: a wrong prompt mask or label shift (the response
would not be learned), answer scoring that ignores the adapter, an adapter that does not reload.

Margin. Accuracy on ``N_TEST`` = 200 questions has a binomial standard error of at most
sqrt(0.25 / 200) = 0.035; two scores on the same questions differ by chance with a standard error of at
most sqrt(2) * 0.035 = 0.05 (less, as they are paired). The trained model must beat the untrained one
by ``MARGIN`` = 0.08; the measured gains are 0.13 (LoRA) and 0.125 (MoLA) over an untrained 0.51
(docs/chat-and-quality.md). The untrained checkpoint must score *exactly* what plain lm-eval gives the bare base model
on the same rendered task: with LoRA B = 0 every adapter adds an exact zero.

The data are read from ``$MOLE_LLM_ADAPTERS_DIR`` or ``../shared/data/llm-adapters`` beside the
repository (never copied into it); without them the tier is skipped, saying so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA_ENV = "MOLE_LLM_ADAPTERS_DIR"
DATA = Path(os.environ.get(DATA_ENV) or REPO / ".." / "shared" / "data" / "llm-adapters").resolve()
N_TRAIN = 200        # training records (+ 4 held out for the validation loss)
STEPS = 25           # optimizer steps of 8 records: one pass over the training records
N_TEST = 200         # held-out BoolQ test questions
MARGIN = 0.08        # required gain in accuracy (see the module docstring)

pytestmark = [
    pytest.mark.quality,
    pytest.mark.skipif(not (DATA / "boolq" / "train.json").is_file() or not (DATA / "boolq" / "test.json").is_file(),
                       reason=f"the LLM-Adapters BoolQ files are not in {DATA} (set ${DATA_ENV} to their folder)"),
]


def _cli(cmd: str, *args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", f"mole.cli.{cmd}", *args], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, f"mole-{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def _train(run_dir: Path, method: str, steps: int) -> Path:
    _cli("train", f"method={method}", "data=boolq", f"data.root={DATA}", f"data.max_records={N_TRAIN + 4}",
         "data.val_size=4", f"trainer.max_steps={steps}", "trainer.batch_size=8",
         "trainer.lr=1e-3", "trainer.eval_every=0", "trainer.warmup_steps=0", "eval=none", "seed=0",
         f"hydra.run.dir={run_dir}")
    return run_dir


def _eval(run_dir: Path) -> float:
    _cli("eval", f"checkpoint={run_dir}", "eval.tasks=[]", "eval.benchmarks=[boolq]", f"eval.data_root={DATA}",
         f"eval.limit={N_TEST}", "eval.batch_size=16")
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert results["n-samples"]["boolq"]["effective"] == N_TEST
    return results["results"]["boolq"]["acc,none"]


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    run_dir = _train(tmp_path_factory.mktemp("quality") / "untrained", "lora", 0)
    return run_dir, _eval(run_dir)


def test_untrained_checkpoint_scores_what_plain_lm_eval_gives_the_base_model(untrained):
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from omegaconf import OmegaConf

    from mole.eval.benchmarks import RENDERED_SUBDIR
    from mole.model.smollm2 import load_smollm2

    run_dir, acc = untrained
    cfg = OmegaConf.load(run_dir / "config.yaml")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model, tok = load_smollm2(cfg.model.cache_dir)  # the bare base model: no adapter anywhere
    manager = TaskManager(include_path=str(run_dir / "eval" / RENDERED_SUBDIR), include_defaults=False)
    raw = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=16), tasks=["boolq"],
                          task_manager=manager, limit=N_TEST, log_samples=False)
    assert raw["results"]["boolq"]["acc,none"] == acc


@pytest.mark.parametrize("method", ["lora", "mola"])
def test_brief_training_on_real_data_beats_the_untrained_model(untrained, method, tmp_path):
    _, before = untrained
    after = _eval(_train(tmp_path / method, method, STEPS))
    print(f"{method}: BoolQ accuracy {before:.3f} -> {after:.3f} on {N_TEST} held-out test questions")
    assert after >= before + MARGIN, (method, before, after)
