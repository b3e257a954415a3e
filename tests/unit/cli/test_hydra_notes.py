"""Hydra's notes of a run reach ``RUN_DIR/.hydra/`` only through the run directory's owner (mole/cli/hydra_notes.py).

The command end to end (a sweep job refused on a busy directory leaves it byte for byte): tests/unit/test_run_dir.py."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf

from mole.cli import hydra_notes


def _notes(folder: Path, subdir: str) -> None:
    folder.mkdir(parents=True)
    (folder / "overrides.yaml").write_text("- seed=1\n")
    (folder / "config.yaml").write_text("seed: 1\n")
    hydra = {"hydra": {"output_subdir": subdir, "job": {"name": "train"},
                       "overrides": {"hydra": [f"hydra.output_subdir={subdir}", "hydra.verbose=false"],
                                     "task": ["seed=1"]}}}
    OmegaConf.save(OmegaConf.create(hydra), folder / "hydra.yaml")


def test_the_override_names_a_folder_of_the_job_and_task(monkeypatch):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from mole.config import register_resolvers

    register_resolvers()
    parsed = OverridesParser.create().parse_override(hydra_notes.override("abc"))  # as Hydra reads the command line
    assert parsed.key_or_group == "hydra.output_subdir" and not parsed.is_sweep_override()
    cfg = OmegaConf.create({"hydra": {"job": {"num": "???"}}, "x": parsed.value()})
    assert cfg.x == ".hydra-pending-abc-0-0"  # a single run: no job number
    cfg.hydra.job.num = 3
    assert cfg.x == ".hydra-pending-abc-3-0"
    monkeypatch.setenv("SLURM_PROCID", "1")  # a SLURM task other than task 0 of a multi-task job writes no notes
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    assert cfg.x is None
    assert hydra_notes.user_chose_folder(["seed=1", "hydra.output_subdir=null"])
    assert not hydra_notes.user_chose_folder(["seed=1", "hydra.run.dir=x"])


def test_publish_moves_the_notes_into_dot_hydra_as_if_hydra_had_written_them_there(tmp_path):
    run = tmp_path / "run"
    _notes(run / ".hydra", ".hydra")  # an earlier run's notes
    (run / ".hydra" / "overrides.yaml").write_text("- seed=0\n")
    pending = run / ".hydra-pending-abc-0-0"
    _notes(pending, pending.name)
    hydra_cfg = OmegaConf.create({"output_subdir": pending.name, "runtime": {"output_dir": str(run)}})
    assert hydra_notes.pending_folder(hydra_cfg) == pending
    assert hydra_notes.pending_folder(OmegaConf.create({"output_subdir": ".hydra"})) is None
    assert hydra_notes.pending_folder(OmegaConf.create({"output_subdir": None})) is None

    hydra_notes.publish(pending, run)
    assert sorted(p.name for p in run.iterdir()) == [".hydra"]  # the pending folder and the old notes are gone
    assert (run / ".hydra" / "overrides.yaml").read_text() == "- seed=1\n"
    saved = OmegaConf.load(run / ".hydra" / "hydra.yaml").hydra
    assert saved.output_subdir == ".hydra" and list(saved.overrides.hydra) == ["hydra.verbose=false"]
    assert list(saved.overrides.task) == ["seed=1"]


def test_a_refused_job_stops_logging_into_the_directory(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.log").write_text("the owner's log\n")
    mine = logging.FileHandler(run / "train.log")
    elsewhere = logging.FileHandler(tmp_path / "other.log")
    logging.root.addHandler(mine)
    logging.root.addHandler(elsewhere)
    try:
        hydra_notes.stop_logging_into(run)
        logging.getLogger("x").error("job failed")
        assert mine not in logging.root.handlers and elsewhere in logging.root.handlers
        assert (run / "train.log").read_text() == "the owner's log\n"
    finally:
        logging.root.removeHandler(elsewhere)
        elsewhere.close()
        logging.root.removeHandler(mine)
