"""The benchmark's report: its Markdown table, the speed targets, and ratios between two variants."""

from __future__ import annotations

import statistics

from mole.bench.variants import BASELINE

# the speed targets (measured here, never asserted in tests)
TARGETS = {
    "soft_e8": 1.10,
    "topk_e8": 1.10,
    **{k: 1.15 for k in ("mola", "mola_mor", "hmora", "hmora_lw", "dynmole", "moa_soft", "moa_sparse", "hydralora")},
}



def markdown(result: dict) -> str:
    ratios, mem, ms = result["ratios_vs_peft_lora_r8"], result["peak_memory_mb"], result["step_ms_median"]
    lines = [
        f"Command: `{result['command']}`  ",
        f"Device: {result['device']}; model: {result['model']}; batch {result['batch']} x {result['seq']} tokens; "
        f"{result['rounds']} rounds after {result['warmup']} warm-up steps; threads {result['threads']}; "
        f"compile {result['compile']}{' (' + result['compile_scope'] + ')' if result.get('compile_scope') else ''}; "
        f"autocast {result.get('autocast')}; clock {result['clock']}; allocator {result.get('allocator', 'default')}; "
        f"load average before the run {result['loadavg']}.",
        "",
        "| variant | step ms (median) | ratio vs peft LoRA r=8 (median of paired rounds) | target | trainable params "
        "| peak memory MB | page faults / step |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    faults = result.get("minor_page_faults_per_step_median", {})
    lines.append(f"| peft LoRA r=8 | {ms[BASELINE]:.1f} | 1.000 | | {result['trainable'][BASELINE]:,} | {mem[BASELINE]:.0f} "
                 f"| {faults.get(BASELINE, '')} |")
    for k in ratios:
        tgt = TARGETS.get(k)
        mark = "" if tgt is None else (f"<= {tgt:.2f} " + ("met" if ratios[k] <= tgt else "**missed**"))
        lines.append(f"| {k} | {ms[k]:.1f} | {ratios[k]:.3f} | {mark} | {result['trainable'][k]:,} | {mem[k]:.0f} "
                     f"| {faults.get(k, '')} |")
    d = result.get("derived", {})
    if d:
        lines += ["", "| derived | value | target |", "|---|---:|---:|"]
        for key, (val, tgt, sense) in d.items():
            ok = val >= tgt if sense == ">=" else val <= tgt
            lines.append(f"| {key} | {val:.3f} | {sense} {tgt} {'met' if ok else '**missed**'} |")
    ev = result.get("eval_throughput_vs_lm_eval")
    if ev is not None:
        e = result["eval"]
        lines += ["", f"mole-eval log-likelihood throughput vs lm-eval on the bare base model: **{ev:.3f}x** "
                  f"(target >= 0.9; median of {result['eval_repeats']} alternating runs, {e['documents']} documents, "
                  f"mole {e['mole_eval_s']:.2f} s, lm-eval {e['lm_eval_s']:.2f} s)."]
    if "ops_per_step" in result:
        n, r = result["ops_per_step"], result["ops_ratio_vs_peft_lora_r8"]
        lines += ["", "| variant | kernel-launching aten ops per eager step | ratio vs peft LoRA r=8 (target <= 1.25) |",
                  "|---|---:|---:|", f"| peft LoRA r=8 | {n[BASELINE]:,} | 1.000 |"]
        lines += [f"| {k} | {n[k]:,} | {r[k]:.3f} |" for k in r]
        lines += ["", f"Not counted (no kernel launch): {result['ops_excluded']}."]
    lines += ["", f"Peak memory: {result['memory_method']}"]
    return "\n".join(lines) + "\n"


def derived(times: dict[str, list[float]]) -> dict:
    """Ratios between two variants, each the median over rounds of the paired per-round ratio."""
    pairs = {
        "mola_mor / mola": ("mola_mor", "mola", 1.02, "<="),
        "loop_soft / soft_e8 (speed-up over the loop)": ("loop_soft", "soft_e8", 2.0, ">="),
        "loop_topk / topk_e8 (speed-up over the loop)": ("loop_topk", "topk_e8", 1.25, ">="),
        "loop_soft_loramoe / soft_e8 (speed-up over LoRAMoE's loop form)": ("loop_soft_loramoe", "soft_e8", 2.0, ">="),
    }
    out = {}
    for key, (a, b, target, sense) in pairs.items():
        if a in times and b in times:
            out[key] = (statistics.median(x / y for x, y in zip(times[a], times[b], strict=True)), target, sense)
    return out

