"""``python -m mole.bench``: see :mod:`mole.bench`."""

import os

# the benchmark builds its models from config and reads the shipped fixture tasks: nothing to download
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from mole.bench.cli import main  # noqa: E402  (after the environment that transformers reads at import)

main()
