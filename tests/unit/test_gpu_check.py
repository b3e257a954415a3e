"""``scripts/gpu_check.py``: every preset reaches the benchmark, the report's arithmetic, and the time box."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_preset_but_full_fine_tuning_is_benchmarked_once(gpu_check):
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


def test_the_table_joins_eager_compiled_and_op_counts(gpu_check, tmp_path):
    _bench_json(tmp_path / "eager", {"peft_lora_r8": 100.0, "mola": 125.0}, {"mola": 1.2})
    _bench_json(tmp_path / "compiled-1", {"peft_lora_r8": 50.0, "mola": 64.0}, {"mola": 1.3})
    _bench_json(tmp_path / "ops", {"peft_lora_r8": 1.0}, {}, ops_per_step={"peft_lora_r8": 800, "mola": 1000},
                ops_ratio_vs_peft_lora_r8={"mola": 1.25})
    report = {"parts": {"eager": {}, "compiled-1": {}, "ops": {}}}
    rows = gpu_check.tables(report, tmp_path)["variants"]
    assert rows["mola"]["eager_tokens_per_s"] == 1024 / 0.125 and rows["mola"]["compiled_tokens_per_s"] == 1024 / 0.064
    assert rows["mola"]["eager_ratio"] == 1.2 and rows["mola"]["compiled_ratio"] == 1.3 and rows["peft_lora_r8"]["eager_ratio"] == 1.0
    assert rows["mola"]["ops_per_step"] == 1000 and rows["mola"]["ops_ratio"] == 1.25


def test_a_part_over_its_budget_is_stopped_and_recorded_and_the_next_still_runs(gpu_check, tmp_path):
    check = gpu_check.Check(tmp_path, total_s=60, dry_run=True)
    check.min_part_s = 1
    slow = check.run_part("slow", [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"], 2)
    bad = check.run_part("bad", [sys.executable, "-c", "raise SystemExit('broken part')"], 20)
    good = check.run_part("good", [sys.executable, "-c", "print('fine')"], 20)
    assert slow["status"] == "timed out" and slow["seconds"] < 10 and "started" in slow["log_tail"]
    assert bad["status"] == "failed" and bad["returncode"] == 1 and "broken part" in bad["log_tail"]
    assert good["status"] == "ok" and "log_tail" not in good
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {k: v["status"] for k, v in saved["parts"].items()} == {"slow": "timed out", "bad": "failed", "good": "ok"}
    assert "| slow | timed out |" in (tmp_path / "gpu_check.md").read_text()


def test_no_time_left_means_the_part_is_not_started(gpu_check, tmp_path):
    check = gpu_check.Check(tmp_path, total_s=0, dry_run=True)
    entry = check.run_part("late", [sys.executable, "-c", "open('ran', 'w')"], 30)
    assert entry["status"] == "not run" and entry["reason"] == "out of time"
    assert not (tmp_path / "ran").exists()
