"""``python -m mole.bench``: the command line; builds the variants, times them, writes the report."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

import mole.bench
from mole.bench.compiling import configure_dynamo
from mole.bench.eval_speed import eval_throughput
from mole.bench.measure import METADATA_ONLY_OPS, count_step_ops, keep_freed_memory, peak_memory_mb, time_variants
from mole.bench.report import TARGETS, derived, markdown
from mole.bench.variants import (
    BASELINE,
    GPU_OPT_IN,
    RATIO_KEYS,
    VARIANTS,
    build_variant,
    compose,
    make_batch,
    make_setup,
)
from mole.model.base import build_model


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m mole.bench", description=mole.bench.__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds, smaller batch (CI: < 5 min on 2 cores)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1: single-threaded; the default with --quick on the CPU)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--clock", default="auto", choices=["auto", "cpu", "wall"],
                   help="CPU timing: process CPU time (auto with --threads 1: robust on a shared machine) or wall time")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 8 quick, 30 full)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per variant")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--variants", default=None, help="comma-separated subset (the peft baseline is always run)")
    p.add_argument("--compile", action="store_true", help="torch.compile the models on the CPU too")
    p.add_argument("--no-compile", action="store_true", help="no torch.compile on a GPU")
    p.add_argument("--compile-scope", default="layer", choices=["layer", "model"],
                   help="compile each decoder layer (default: fast to compile) or the whole forward")
    p.add_argument("--compile-backend", default="inductor", choices=["inductor", "aot_eager", "eager"],
                   help="torch.compile backend (aot_eager: the compiled path without a compiler's wait)")
    p.add_argument("--no-eval", action="store_true", help="skip the mole-eval vs lm-eval throughput")
    p.add_argument("--keep-freed-memory", default="auto", choices=["auto", "on", "off"],
                   help="CPU: keep freed heap memory in the process (glibc mallopt; auto = on for the CPU), so that "
                        "round-robin timing does not add page faults a training run does not have")
    p.add_argument("--model-override", action="append", help="extra model.* override, e.g. model.num_layers=8")
    p.add_argument("--add-variant", action="append", default=[], metavar="NAME=OVERRIDES",
                   help="time one more variant, built from mole-train overrides (space-separated), e.g. "
                        "'hmora_no_router_dropout=method=hmora router.dropout=0'; repeatable")
    p.add_argument("--count-ops", action="store_true",
                   help="also count the kernel-launching aten ops of one eager training step per variant, and their "
                        "ratio to the peft baseline (views and allocations excluded: see METADATA_ONLY_OPS)")
    p.add_argument("--out", default="outputs/bench", help="output directory")
    args = p.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.warmup is not None and args.warmup < 0:
        p.error(f"--warmup must be 0 or more, got {args.warmup}")
    if args.count_ops and args.compile:
        p.error("--count-ops counts eager steps; run it without --compile")
    # the variants are checked before anything is set or written
    names: list[str] = []
    if args.variants:
        names = [BASELINE, *[n for n in args.variants.split(",") if n and n != BASELINE]]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    added: dict[str, list[str]] = {}
    for spec in args.add_variant:
        name, sep, overrides = spec.partition("=")
        if not sep or not name.isidentifier() or not overrides.split():
            p.error(f"--add-variant {spec!r}: expected NAME=OVERRIDES with NAME an identifier, e.g. "
                    "'hmora_no_router_dropout=method=hmora router.dropout=0'")
        if name in VARIANTS or name in added:
            p.error(f"--add-variant {spec!r}: the name {name!r} is already taken; choose another")
        added[name] = overrides.split()
    if args.threads is None and args.quick and args.device != "cuda":
        args.threads = 1  # --quick on the CPU: single-threaded, timed by CPU time (steady on a shared CI runner)
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = make_setup(args)
    malloc = None
    if args.keep_freed_memory == "on" or (args.keep_freed_memory == "auto" and setup.device.type == "cpu"):
        malloc = keep_freed_memory()
        if malloc is None and args.keep_freed_memory == "on":
            p.error("--keep-freed-memory on needs glibc (mallopt)")
    if setup.compile:
        configure_dynamo()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    if not args.variants:
        names = [n for n in VARIANTS if setup.device.type != "cuda" or n not in GPU_OPT_IN]
    names += list(added)
    loadavg = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    cfg = compose(setup, ["method=lora"])
    torch.manual_seed(0)
    base, tokenizer = build_model(cfg.model, seed=0)
    base.to(setup.device)
    vocab = base.config.vocab_size
    batch = make_batch(setup, vocab)
    log(f"base model {sum(p.numel() for p in base.parameters()) / 1e6:.1f} M parameters on {setup.device}")

    variants = []
    for n in names:
        variants.append(build_variant(n, setup, base, tokenizer, added.get(n)))
        log(f"built {n}: {variants[-1].trainable:,} trainable")
    time_variants(variants, batch, setup, log)
    for v in variants:
        v.peak_mb = peak_memory_mb(v, batch, setup)
    ops = {v.name: count_step_ops(v, batch) for v in variants} if args.count_ops else {}
    by = {v.name: v for v in variants}
    base_t = by[BASELINE].times
    ratios = {k: statistics.median(t / b for t, b in zip(by[k].times, base_t, strict=True))
              for k in [*RATIO_KEYS, *added] if k in by}
    result = {
        "command": "python -m mole.bench " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "device": str(setup.device) + ("" if setup.device.type != "cuda" else f" ({torch.cuda.get_device_name()})"),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "model": " ".join(setup.model_overrides),
        "batch": setup.batch,
        "seq": setup.seq,
        "rounds": setup.rounds,
        "warmup": setup.warmup,
        "compile": setup.compile,
        "clock": setup.clock,
        "autocast": None if setup.amp is None else str(setup.amp),
        "loadavg": loadavg,
        "allocator": malloc or "default",
        "ratios_vs_peft_lora_r8": {k: round(v, 4) for k, v in ratios.items()},
        "step_ms_median": {v.name: round(statistics.median(v.times) * 1000, 2) for v in variants},
        "trainable": {v.name: v.trainable for v in variants},
        "peak_memory_mb": {v.name: round(v.peak_mb, 1) for v in variants},
        "warmup_s": {v.name: round(v.warmup_s, 1) for v in variants},
        "minor_page_faults_per_step_median": {v.name: statistics.median(v.faults) for v in variants},
        "compile_scope": setup.compile_scope if setup.compile else None,
        "memory_method": ("torch.cuda.max_memory_allocated over one step (plus the model)" if setup.device.type == "cuda" else
                          "CPU account of one step: parameters + buffers, gradients and two AdamW moments of the "
                          "trainable parameters, and the unique storages autograd saves for backward"),
        "targets": TARGETS,
        "derived": {k: [round(a, 4), b, c] for k, (a, b, c) in derived({v.name: v.times for v in variants}).items()},
        "step_s_per_round": {v.name: [round(t, 5) for t in v.times] for v in variants},
    }
    if ops:
        result["ops_per_step"] = {k: sum(c.values()) for k, c in ops.items()}
        result["ops_ratio_vs_peft_lora_r8"] = {k: round(n / result["ops_per_step"][BASELINE], 4)
                                               for k, n in result["ops_per_step"].items() if k != BASELINE}
        result["ops_by_name"] = {k: dict(c.most_common()) for k, c in ops.items()}
        result["ops_excluded"] = "views (schema is_view) and " + ", ".join(sorted(METADATA_ONLY_OPS))
    result["eval_throughput_vs_lm_eval"] = None

    def write() -> str:
        result["wall_s"] = round(time.perf_counter() - t_start, 1)
        (out / "latest.json").write_text(json.dumps(result, indent=2) + "\n")
        md = markdown({**result, "derived": {k: tuple(v) for k, v in result["derived"].items()}})
        (out / "latest.md").write_text(md)
        return md

    write()  # the step timings are kept even if the evaluation below fails
    if not args.no_eval:
        for v in variants:  # the variants' copies share the base weights; free their adapters and optimizer states
            v.optimizer.state.clear()
        del variants, by
        ev = eval_throughput(setup, base, tokenizer, out, log)
        result["eval_throughput_vs_lm_eval"] = round(ev["ratio"], 4)
        result["eval"] = ev
        result["eval_repeats"] = setup.eval_repeats
    md = write()
    print(md)
    log(f"wrote {out / 'latest.json'} and {out / 'latest.md'}")
    return result
