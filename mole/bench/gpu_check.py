"""One-shot GPU check: every measurement a GPU session needs, time-boxed, into one JSON + Markdown.

    make gpu-check                    # one H100/H200: at most 8 minutes (python -m mole.bench.gpu_check)
    make gpu-check ARGS=--dry-run     # the same parts on tiny shapes on the CPU (CI)

Parts (each a subprocess with its own time budget; a part that fails or runs over is recorded as such,
with its log's tail, and the others still run; the report is rewritten after every part):

* ``ops``: the op-count table (``python -m mole.bench --count-ops``, eager, on the CPU, where autograd's
  backward runs in the counting thread): kernel-launching aten ops per step and their ratio to peft
  LoRA r=8. Runs on the CPU beside the GPU parts.
* ``eager`` and ``compiled``: the benchmark (:mod:`mole.bench`) on the Llama-3.2-1B shape (random weights, bf16,
  batch 2 x 512): per preset tokens/s (padded positions per second), ratio to a peft LoRA r=8 step and
  peak memory, eager, then with each decoder layer compiled (inductor). The compiled presets run in
  groups, the speed targets' presets first, so that a budget that runs out still leaves them measured.
* ``test_gpu``: ``pytest -m gpu`` (DeepSpeed ZeRO-2/3 in one process, fp16) when deepspeed is
  importable; recorded as skipped otherwise.
* ``train``: 100 steps of ``mole-train`` on a 1B-shaped model (random weights, bf16 autocast) with
  ``trainer.compile=true``, then ``mole-eval`` on the run.

``--dry-run``: tiny_llama-sized runs of the same parts on the CPU (the compiled part on mole's LoRA and the
peft baseline with the ``aot_eager`` backend, training 4 steps of a two-layer LoRAMoE), to check the script
itself.

Writes ``<out>/gpu_check.json`` and ``<out>/gpu_check.md`` (default ``outputs/gpu-check/``), and each
part's log and bench output under ``<out>/<part>/``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from mole.config import CONF_DIR

# the source checkout: the parts run there (``test_gpu`` runs its tests)
ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable

# the benchmark's built-in variants (the per-expert loop references left out: they are references, not presets)
BENCH_BUILTIN = {"lora": "lora_r8", "mola": "mola", "mola_mor": "mola_mor", "hmora": "hmora", "hmora_lw": "hmora_lw",
                 "dynmole": "dynmole", "moa_soft": "moa_soft", "moa_sparse": "moa_sparse", "hydralora": "hydralora",
                 "mixlora": "mixlora"}
# not benchmarked: full fine-tuning trains the frozen base weights that the benchmark's variants share
EXCLUDED = {"full_ft": "trains every base weight, which the benchmark's variants share"}
# --dry-run: the benchmark's CPU model cut to tiny_llama's width, and a short batch
TINY = [arg for o in ("model.hidden_size=64", "model.config.intermediate_size=128", "model.config.num_attention_heads=4",
                      "model.config.num_key_value_heads=2") for arg in ("--model-override", o)] + ["--batch", "2", "--seq", "32"]
# the speed targets' variants first: they are what a short budget must not lose
FIRST = ["lora_r8", "soft_e8", "topk_e8", "mola", "mola_mor", "hmora"]


def presets() -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / "method").glob("*.yaml"))


def bench_variants() -> tuple[list[str], list[str]]:
    """(bench built-in names, ``--add-variant`` specs) covering every preset, the speed targets' first."""
    builtin = list(FIRST)
    added = []
    for name in presets():
        if name in EXCLUDED:
            continue
        if name in BENCH_BUILTIN:
            if BENCH_BUILTIN[name] not in builtin:
                builtin.append(BENCH_BUILTIN[name])
        else:
            added.append(f"{name}=method={name}")
    return builtin, added


def bench_args(names: list[str], added: list[str]) -> list[str]:
    args = ["--variants", ",".join(n for n in names if n != "peft_lora_r8")]
    for spec in added:
        args += ["--add-variant", spec]
    return args


def groups(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


class Check:
    """Runs the parts under one deadline and keeps the report on disk after each."""

    min_part_s = 5.0  # a part left less than this is not started

    def __init__(self, out: Path, total_s: float, dry_run: bool):
        self.out, self.dry_run = out, dry_run
        self.start = time.perf_counter()
        self.deadline = self.start + total_s
        self.report: dict = {
            "command": "python -m mole.bench.gpu_check " + shlex.join(sys.argv[1:]),
            "dry_run": dry_run,
            "budget_s": total_s,
            "machine": platform.node(),
            "python": platform.python_version(),
            "parts": {},
        }

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def start_part(self, name: str, cmd: list[str], budget_s: float, env: dict | None = None) -> dict:
        """Start ``cmd`` in its own process group, logging to ``<out>/<name>/log.txt``."""
        part_dir = self.out / name
        part_dir.mkdir(parents=True, exist_ok=True)
        log = (part_dir / "log.txt").open("w")
        budget = max(0.0, min(budget_s, self.left()))
        entry = {"command": shlex.join(cmd), "budget_s": round(budget, 1), "status": "running"}
        self.report["parts"][name] = entry
        if budget < self.min_part_s:
            entry.update(status="not run", reason="out of time")
            return {"entry": entry}
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})
        return {"entry": entry, "proc": proc, "t0": time.perf_counter(), "budget": budget, "log": log,
                "path": part_dir / "log.txt"}

    def finish_part(self, job: dict) -> dict:
        entry = job["entry"]
        if "proc" not in job:
            self.write()
            return entry
        proc = job["proc"]
        try:
            rc = proc.wait(timeout=max(0.0, job["budget"] - (time.perf_counter() - job["t0"])))
            entry["status"] = "ok" if rc == 0 else "failed"
            entry["returncode"] = rc
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            entry["status"] = "timed out"
        job["log"].close()
        entry["seconds"] = round(time.perf_counter() - job["t0"], 1)
        if entry["status"] != "ok":
            entry["log_tail"] = job["path"].read_text(errors="replace")[-3000:]
        self.write()
        return entry

    def run_part(self, name: str, cmd: list[str], budget_s: float, env: dict | None = None) -> dict:
        return self.finish_part(self.start_part(name, cmd, budget_s, env))

    def write(self) -> None:
        self.report["wall_s"] = round(time.perf_counter() - self.start, 1)
        self.report["tables"] = tables(self.report, self.out)
        (self.out / "gpu_check.json").write_text(json.dumps(self.report, indent=2) + "\n")
        (self.out / "gpu_check.md").write_text(markdown(self.report))


def _bench_result(path: Path) -> dict | None:
    f = path / "latest.json"
    return json.loads(f.read_text()) if f.is_file() else None


def tables(report: dict, out: Path) -> dict:
    """Per variant: eager and compiled tokens/s, ratio to peft and peak memory; op counts."""
    rows: dict[str, dict] = {}

    def add(result: dict | None, mode: str) -> None:
        if not result:
            return
        tokens = result["batch"] * result["seq"]
        for name, ms in result["step_ms_median"].items():
            row = rows.setdefault(name, {})
            row[f"{mode}_tokens_per_s"] = round(tokens / (ms / 1000), 1)
            row[f"{mode}_ratio"] = 1.0 if name == "peft_lora_r8" else result["ratios_vs_peft_lora_r8"].get(name)
            row[f"{mode}_peak_mb"] = result["peak_memory_mb"].get(name)
            if mode == "compiled":
                row["compiled_warmup_s"] = result["warmup_s"].get(name)

    add(_bench_result(out / "eager"), "eager")
    for part in sorted(p for p in report["parts"] if p.startswith("compiled")):
        add(_bench_result(out / part), "compiled")
    ops = _bench_result(out / "ops")
    if ops and "ops_per_step" in ops:
        for name, n in ops["ops_per_step"].items():
            rows.setdefault(name, {})["ops_per_step"] = n
            rows[name]["ops_ratio"] = 1.0 if name == "peft_lora_r8" else ops["ops_ratio_vs_peft_lora_r8"].get(name)
    return {"variants": rows}


def markdown(report: dict) -> str:
    lines = [f"# GPU check{' (dry run: CPU, tiny shapes)' if report['dry_run'] else ''}", "",
             f"`{report['command']}` — {report['wall_s']} s of a {report['budget_s']} s budget", "",
             "| part | status | seconds | budget s |", "|---|---|---:|---:|"]
    for name, p in report["parts"].items():
        lines.append(f"| {name} | {p['status']}{' (' + p['reason'] + ')' if p.get('reason') else ''} | "
                     f"{p.get('seconds', '')} | {p['budget_s']} |")
    rows = report["tables"]["variants"]
    if rows:
        cols = ["eager_tokens_per_s", "eager_ratio", "eager_peak_mb", "compiled_tokens_per_s", "compiled_ratio",
                "compiled_peak_mb", "compiled_warmup_s", "ops_per_step", "ops_ratio"]
        lines += ["", "Ratios: median of paired per-round step-time ratios to peft LoRA r=8 (lower is faster); "
                  "tokens/s: padded positions per second; ops: kernel-launching aten ops of one eager step (CPU).", "",
                  "| variant | " + " | ".join(c.replace("_", " ") for c in cols) + " |",
                  "|---|" + "---:|" * len(cols)]
        for name, row in rows.items():
            lines.append(f"| {name} | " + " | ".join("" if row.get(c) is None else str(row[c]) for c in cols) + " |")
    train = report["parts"].get("train", {}).get("metrics")
    if train:
        lines += ["", "Training run: " + ", ".join(f"{k} {v}" for k, v in train.items())]
    for name, p in report["parts"].items():
        if p.get("log_tail"):
            lines += ["", f"## {name}: {p['status']}", "", "```", p["log_tail"][-1500:], "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m mole.bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: checks the script, measures nothing")
    p.add_argument("--out", default="outputs/gpu-check", help="output directory")
    p.add_argument("--budget", type=float, default=None, help="seconds in all (default 470; dry run 360)")
    args = p.parse_args(argv)
    out = (ROOT / args.out) if not Path(args.out).is_absolute() else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dry = args.dry_run
    check = Check(out, args.budget or (360 if dry else 470), dry)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if not dry:
        if not torch.cuda.is_available():
            p.error("no CUDA device; run with --dry-run on a machine without one")
        check.report["device"] = torch.cuda.get_device_name()
        check.report["torch"] = torch.__version__
    bench = [PY, "-m", "mole.bench", "--quick", "--no-eval"]
    builtin, added = bench_variants()
    check.report["presets"] = {"benchmarked": [n for n in presets() if n not in EXCLUDED], "excluded": EXCLUDED}

    # the op counts run on the CPU, beside the GPU parts
    ops = check.start_part("ops", [*bench, "--device", "cpu", "--threads", "1", "--rounds", "1", "--warmup", "1",
                                   *(TINY if dry else []), "--count-ops", "--out", str(out / "ops"),
                                   *bench_args(builtin, added)],
                           240 if not dry else 120, env)
    if dry:
        check.finish_part(ops)  # one CPU: the parts take turns
        device, rounds = ["--device", "cpu", "--rounds", "1", "--warmup", "1", *TINY], []
    else:
        device, rounds = ["--device", "cuda"], ["--rounds", "5", "--warmup", "2"]
    check.run_part("eager", [*bench, *device, *rounds, "--no-compile", "--out", str(out / "eager"),
                             *bench_args(builtin, added)], 70 if not dry else 90, env)
    if dry:
        compiled_groups = [(["lora_r8"], [])]
        compile_flags, compile_budget = ["--compile", "--compile-backend", "aot_eager"], 120
    else:
        specs = [*builtin, *added]
        compiled_groups = [([s for s in g if "=" not in s], [s for s in g if "=" in s]) for g in groups(specs, 6)]
        compile_flags, compile_budget = [], 210
    compile_deadline = time.perf_counter() + compile_budget
    for i, (names, extra) in enumerate(compiled_groups):
        check.run_part(f"compiled-{i + 1}", [*bench, *device, *rounds, *compile_flags, "--out",
                                             str(out / f"compiled-{i + 1}"), *bench_args(names, extra)],
                       compile_deadline - time.perf_counter(), env)

    try:
        import deepspeed  # noqa: F401

        has_deepspeed = True
    except Exception:  # noqa: BLE001 - any import failure means the part cannot run
        has_deepspeed = False
    if has_deepspeed:
        check.run_part("test_gpu", [PY, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"], 50, env)
    else:
        check.report["parts"]["test_gpu"] = {"status": "skipped", "reason": "deepspeed is not importable",
                                             "budget_s": 0}
        check.write()

    run_dir = out / "train" / "run"
    if dry:
        model = ["model=tiny_llama", "model.num_layers=2", "method=loramoe", "trainer.max_steps=4",
                 "trainer.compile_backend=aot_eager"]
    else:
        model = ["model=llama3_2_1b", "model.source=config", "model.dtype=bfloat16", "trainer.max_steps=100",
                 "trainer.mixed_precision=bf16"]
    train_cmd = [PY, "-m", "mole.cli.train", *model, "trainer.compile=true", "trainer.eval_every=0",
                 "trainer.log_every=10", "data.pad_to_multiple_of=64", "eval.at_end=false", "force=true",
                 f"hydra.run.dir={run_dir}"]
    eval_cmd = [PY, "-m", "mole.cli.eval", f"checkpoint={run_dir}", "eval.limit=" + ("2" if dry else "32")]
    t_train = time.perf_counter()
    entry = check.run_part("train", [
        "bash", "-c", shlex.join(train_cmd) + " && " + shlex.join(eval_cmd)], 130 if not dry else 150, env)
    metrics_file = run_dir / "metrics.json"
    if metrics_file.is_file():
        m = json.loads(metrics_file.read_text())
        entry["metrics"] = {"steps": m.get("steps"), "time_per_step_s": m.get("time_per_step_s"),
                            "compile": m.get("compile"), "peak_memory_mb": m.get("peak_memory_mb"),
                            "final_loss": (m.get("train_loss") or [{}])[-1].get("loss")}
    results = run_dir / "eval" / "results.json"
    if results.is_file():
        entry["eval_results"] = json.loads(results.read_text()).get("results")
    entry["seconds_with_eval"] = round(time.perf_counter() - t_train, 1)

    if not dry:
        check.finish_part(ops)
    check.write()
    print((out / "gpu_check.md").read_text())
    return check.report


if __name__ == "__main__":
    report = main()
    # the rehearsal must prove every part runs; on the GPU a failed part is recorded and the rest still measured
    bad = [name for name, part in report["parts"].items() if part.get("status") not in ("ok", "skipped")]
    if report["dry_run"] and bad:
        print(f"gpu_check: error: the dry run's part(s) {', '.join(bad)} did not finish ok", file=sys.stderr)
        sys.exit(1)
