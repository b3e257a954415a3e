#!/usr/bin/env python
"""Estimated against measured peak memory of one training step, for every method preset (docs/memory.md).

    python scripts/memory_table.py                                  # SmolLM2-135M, batch 4 x 128 tokens
    python scripts/memory_table.py --batch 2 --seq 64 -- model=tiny_llama

Each preset runs in a fresh process and reports three numbers in MiB: the estimate of ``mole-params
estimate_memory=true``; the memory account of a real CPU step (:func:`mole.memory.measure_config`:
parameters and buffers, the gradients and AdamW states that exist after the step, the tensors autograd
saved in the forward); and the allocator peak of a second step (parameters, buffers and AdamW states +
the most tensor bytes the step held at once, short-lived ones included, from the profiler's allocation
events: :func:`mole.memory.allocator_peak`). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


def one(preset: str, batch: int, seq: int, overrides: list[str]) -> dict:
    from mole.config import compose_config
    from mole.memory import estimate_memory, measure_config

    cfg = compose_config([*overrides, f"method={preset}", "eval=none"])
    est = estimate_memory(cfg, batch, seq)
    meas = measure_config(cfg, batch, seq, profile=True)
    return {"preset": preset, "estimate": est["peak"], "measured": meas["peak"], "allocator": meas["allocator_peak"],
            "estimate_allocated": est["peak_allocated"]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", default=["model=smollm2_135m"], help="config overrides (after --)")
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one, args.batch, args.seq, args.overrides)))
        return
    presets = sorted(f.stem for f in (ROOT / "conf" / "method").glob("*.yaml"))
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    print(f"Batch {args.batch} x {args.seq} tokens, {' '.join(args.overrides)}; MiB.\n")
    print("| preset | `peak` | measured account | ratio | `peak_allocated` | allocator peak | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for preset in presets:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one", preset, "--batch", str(args.batch),
               "--seq", str(args.seq), "--", *args.overrides]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"| {preset} | {r['estimate'] / MIB:.1f} | {r['measured'] / MIB:.1f} | {r['estimate'] / r['measured']:.3f} "
              f"| {r['estimate_allocated'] / MIB:.1f} | {r['allocator'] / MIB:.1f} "
              f"| {r['estimate_allocated'] / r['allocator']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
