"""``python -m mole.bench.gpu_check``'s time box over real subprocesses: a part over its budget is stopped
and recorded, a failed part keeps its log's tail, and the next part still runs."""

from __future__ import annotations

import json
import sys

from mole.bench import gpu_check


def test_a_part_over_its_budget_is_stopped_and_recorded_and_the_next_still_runs(tmp_path):
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
