"""``trainer.compile=true`` in a two-process DDP run (CPU, gloo): the eager run's losses and adapter, with
gradient checkpointing on, and a resume from a compiled run's checkpoint that continues its curve exactly.

MoLA (top-2 over 2-4-6-8 experts, its balance loss): four distinct layer graphs, routed top-k with a side
effect (router outputs published for the loss), the hardest preset for the compiler. Backend ``aot_eager``
(Dynamo plus AOTAutograd's joint forward-backward graph, each compiled layer one autograd function whose
gradients DDP's reducer must still see); ``inductor`` adds C++ compilation, minutes on a 2-core CPU.
Dropout 0: eager and compiled code draw their masks differently.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY
from safetensors.torch import load_file

from mole.training import checkpoint as ckpt

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
# padded to 64: two sequence lengths in three steps; no validation set: no graphs under no_grad. Each
# layer's graphs are few, and compile time is most of this test's
COMMON = [*TINY, "method=mola", "trainer.max_steps=3", "trainer.lr=1e-2", "trainer.eval_every=0",
          "data.pad_to_multiple_of=64", "data.val_size=0", "distributed=ddp", "distributed.cpu=true", "distributed.num_processes=2"]
COMPILED = ["trainer.compile=true", "trainer.compile_backend=aot_eager", "trainer.gradient_checkpointing=true",
            "trainer.save_every=1", "trainer.keep_checkpoints=3"]
# a compiled graph may reorder float sums: per-step loss and adapter tolerances (measured differences are
# far smaller; see docs/speed.md)
LOSS_RTOL, ADAPTER_ATOL = 1e-5, 1e-5


def _train(run_dir: Path, *overrides: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "mole.cli.train", *COMMON, *overrides, f"hydra.run.dir={run_dir}"],
                          cwd=run_dir.parent, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((run_dir / "metrics.json").read_text())


def _losses(metrics: dict) -> list[float]:
    return [row["loss"] for row in metrics["train_loss"]]


def _max_adapter_difference(a: Path, b: Path) -> float:
    x, y = load_file(a / "adapter.safetensors"), load_file(b / "adapter.safetensors")
    assert x.keys() == y.keys() and x
    return max((x[k] - y[k]).abs().max().item() for k in x)


@pytest.mark.slow
def test_compiled_mola_under_ddp_matches_eager_and_resumes_exactly(tmp_path):
    eager = _train(tmp_path / "eager", "trainer.compile=false")
    compiled = _train(tmp_path / "compiled", *COMPILED)
    assert eager["num_processes"] == compiled["num_processes"] == 2
    assert "compile" not in eager and compiled["compile"]["compilations"] >= 4  # four distinct layers at least
    curve = _losses(compiled)
    print("\nstep | eager | compiled\n" + "\n".join(f"{i + 1} | {a:.6f} | {b:.6f}" for i, (a, b)
                                                   in enumerate(zip(_losses(eager), curve, strict=True))))
    assert len(curve) == 3 and curve[-1] < curve[0]
    assert curve == pytest.approx(_losses(eager), rel=LOSS_RTOL)
    difference = _max_adapter_difference(tmp_path / "eager", tmp_path / "compiled")
    print(f"adapter: largest difference {difference:.2e}")
    assert difference < ADAPTER_ATOL

    # the run directory as it stood after step 2's checkpoint (step 3's checkpoint, the adapter and metrics not
    # yet written), resumed compiled on two processes: the uninterrupted compiled run's curve and adapter, bit
    # for bit. From step 2, not 1: the resumed processes compile every layer afresh, once per sequence length
    resumed_dir = tmp_path / "resumed"
    later = {"step-1", "step-3", "adapter.safetensors", "metrics.json"}
    shutil.copytree(tmp_path / "compiled", resumed_dir,
                    ignore=lambda folder, names: [] if Path(folder).name == "step-2" else later & set(names))
    assert [s for s, _ in ckpt.list_checkpoints(resumed_dir)] == [2]
    resumed = _train(resumed_dir, *COMPILED, "trainer.resume=true")
    assert "resumed after step 2" in (resumed_dir / "train.log").read_text()
    assert resumed["compile"]["compilations"] >= 4
    assert _losses(resumed) == curve
    assert _max_adapter_difference(tmp_path / "compiled", resumed_dir) == 0.0
