"""``python -m mole.bench.gpu_check``: every preset reaches the benchmark, the report's arithmetic, and the
time box (a part with no time left is not started; the parts' subprocesses: tests/integration)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mole.bench import gpu_check


def test_every_preset_but_full_fine_tuning_is_benchmarked_once():
    builtin, added = gpu_check.bench_variants()
    covered = {name for name, variant in gpu_check.BENCH_BUILTIN.items() if variant in builtin}
    covered |= {spec.split("=")[0] for spec in added}
    assert covered == set(gpu_check.presets()) - {"full_ft"} and "full_ft" in gpu_check.EXCLUDED
    assert builtin[:6] == gpu_check.FIRST  # the speed targets' variants come first
    assert len(builtin) == len(set(builtin)) and all(spec == f"{spec.split('=')[0]}=method={spec.split('=')[0]}"
                                                     for spec in added)


def _bench_json(path: Path, step_ms: dict, ratios: dict, **extra) -> None:
    path.mkdir(parents=True)
    result = {"batch": 2, "seq": 512, "step_ms_median": step_ms, "ratios_vs_peft_lora_r8": ratios,
              "peak_memory_mb": {k: 100.0 for k in step_ms}, "warmup_s": {k: 9.0 for k in step_ms}, **extra}
    (path / "latest.json").write_text(json.dumps(result))


def test_the_table_joins_eager_compiled_and_op_counts(tmp_path):
    _bench_json(tmp_path / "eager", {"peft_lora_r8": 100.0, "mola": 125.0}, {"mola": 1.2})
    _bench_json(tmp_path / "compiled-1", {"peft_lora_r8": 50.0, "mola": 64.0}, {"mola": 1.3})
    _bench_json(tmp_path / "ops", {"peft_lora_r8": 1.0}, {}, ops_per_step={"peft_lora_r8": 800, "mola": 1000},
                ops_ratio_vs_peft_lora_r8={"mola": 1.25})
    report = {"parts": {"eager": {}, "compiled-1": {}, "ops": {}}}
    rows = gpu_check.tables(report, tmp_path)["variants"]
    assert rows["mola"]["eager_tokens_per_s"] == 1024 / 0.125 and rows["mola"]["compiled_tokens_per_s"] == 1024 / 0.064
    assert rows["mola"]["eager_ratio"] == 1.2 and rows["mola"]["compiled_ratio"] == 1.3 and rows["peft_lora_r8"]["eager_ratio"] == 1.0
    assert rows["mola"]["ops_per_step"] == 1000 and rows["mola"]["ops_ratio"] == 1.25


def test_no_time_left_means_the_part_is_not_started(tmp_path):
    check = gpu_check.Check(tmp_path, total_s=0, dry_run=True)
    entry = check.run_part("late", [sys.executable, "-c", "open('ran', 'w')"], 30)
    assert entry["status"] == "not run" and entry["reason"] == "out of time"
    assert not (tmp_path / "ran").exists()
