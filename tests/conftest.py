"""Shared fixtures: offline environment, seeded RNG, tiny configs composed like the command line.

Every test under ``tests/integration/`` carries the ``integration`` marker (``make test-integration``);
the default tier (``make test``) leaves it out.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tiny models are dominated by per-op overhead: one thread is faster than two fighting, here and in the
# subprocesses the tests start
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from mole.config import compose_config  # noqa: E402

NO_DROPOUT = "adapter.dropout=0.0"
TINY = ["model=tiny_llama", "eval=none", "trainer.max_steps=2", "trainer.batch_size=2", NO_DROPOUT]


def compose_tiny(overrides, base=TINY):
    """``base`` + overrides; adapters without a dropout key (prompt, full fine-tuning) skip ``NO_DROPOUT``."""
    from hydra.errors import ConfigCompositionException

    full = [*base, *overrides]
    try:
        return compose_config(full)
    except ConfigCompositionException as err:
        if "adapter.dropout" not in str(err):
            raise
        return compose_config([o for o in full if o != NO_DROPOUT])


# options that need a partner choice to compose and build on their own (block and whole-model adapters are
# handled by partners(): they adapt no Linear unless told to)
PARTNERS = {("router", "none"): ["experts=single"], ("experts", "single"): ["router=none"],
            ("data", "local"): ["data.path=${mole_fixture:mc_train.json}"],
            ("adapter", "dora"): ["experts=single", "router=none"]}


def partners(group: str, option: str) -> list[str]:
    """The overrides ``group=option`` needs beside it to build a model: :data:`PARTNERS`, ``experts.targets=[]``
    for block and whole-model adapters, ``data.smoke=true`` for the papers' data sets (their shipped fixtures)."""
    from omegaconf import OmegaConf

    from mole import CONF_DIR
    from mole.adapters.kinds import adapter_kind

    if (group, option) in PARTNERS:
        return list(PARTNERS[(group, option)])
    if group == "adapter" and adapter_kind(OmegaConf.load(Path(CONF_DIR) / "adapter" / f"{option}.yaml"), "adapter") != "linear":
        return ["experts.targets=[]"]
    if group == "data" and option != "fixtures":
        return ["data.smoke=true"]
    return []


INTEGRATION = Path(__file__).resolve().parent / "integration"


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.is_relative_to(INTEGRATION):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_cfg():
    """Compose ``train.yaml`` for tiny_llama with extra overrides, as ``mole-train`` would."""

    def make(*overrides: str):
        return compose_tiny(overrides)

    return make


def assert_same_outputs_and_grads(out: torch.Tensor, ref: torch.Tensor, params: list) -> None:
    """``out`` equals ``ref``, and so do the gradients of ``sum(out**2)`` and ``sum(ref**2)`` w.r.t. ``params``."""
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad(out.square().sum(), params)
    ref_grads = torch.autograd.grad(ref.square().sum(), params)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b)
