"""Shared fixtures: offline environment, seeded RNG, tiny configs composed like the command line."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from mole.config import compose_config  # noqa: E402

TINY = ["model=tiny_llama", "eval=none", "trainer.max_steps=2", "trainer.batch_size=2", "adapter.dropout=0.0"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_cfg():
    """Compose ``train.yaml`` for tiny_llama with extra overrides, as ``mole-train`` would."""

    def make(*overrides: str):
        return compose_config([*TINY, *overrides])

    return make
