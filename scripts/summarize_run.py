#!/usr/bin/env python3
"""Summarise finished mole runs as a Markdown table (the figures docs/runs.md quotes).

    python scripts/summarize_run.py outputs/runs/default [more run dirs ...]

For each run: method, model, steps, trainable parameters, wall time, time per step, validation loss
before and after training, and lm-eval accuracy per task. Reads only metrics.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def row(run_dir: Path) -> str:
    m = json.loads((run_dir / "metrics.json").read_text())
    val = m.get("val_loss") or []
    first = f"{val[0]['loss']:.3f} (step {val[0]['step']})" if val else "-"
    last = f"{val[-1]['loss']:.3f} (step {val[-1]['step']})" if val else "-"
    accs = ", ".join(f"{task} {r['acc,none']:.4f}" for task, r in sorted((m.get("eval") or {}).items()) if "acc,none" in r)
    per_step = f"{m['time_per_step_s']:.2f} s" if m.get("time_per_step_s") else "-"
    return (
        f"| {run_dir} | {m.get('method')} | {m.get('model')} | {m['steps']} | "
        f"{m['trainable_params']:,} ({m['trainable_percent']:.2f}%) | {m['wall_time_s']:.0f} s | {per_step} | "
        f"{first} | {last} | {accs or '-'} |"
    )


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    print("| run | method | model | steps | trainable | wall time | per step | val loss before | val loss after | lm-eval acc |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for arg in argv:
        print(row(Path(arg)))


if __name__ == "__main__":
    main(sys.argv[1:])
