"""Secrets given on the command line never reach a file or a printed line: every secret-looking key pattern,
with a value holding spaces and commas (quoted or not), through each place mole or Hydra writes text to:
the run directory's name, ``.hydra/*.yaml``, ``config.yaml``, the log, and error lines (mole's own, Hydra's
"Could not override ... use +key=VALUE" and "Error executing job with overrides: [...]")."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mole.config import _slug, compose_config
from mole.utils.secrets import REDACTED, RedactFilter, is_secret_key, redact_text, redact_yaml_file, redacted_stderr

PATTERNS = ("api_key", "apikey", "password", "passwd", "secret", "credential", "token", "hf_token", "access_token",
            "private_key", "access_key", "oauth_token", "hf_auth_token", "passphrase", "sas_token")
NOT_SECRETS = ("pad_token", "init_token", "eos_token", "num_virtual_tokens", "max_new_tokens", "tokenizer")


def _value(i: int) -> str:
    return f"S{i}q p,T{i}w"  # a space and a comma: the parts a naive `[^,\s]*` match leaves behind


def _fragments(i: int) -> tuple[str, ...]:
    return (f"S{i}q", f"T{i}w", f"p,T{i}")


def _leaks(text: str) -> list[str]:
    return [f for i in range(len(PATTERNS)) for f in _fragments(i) if f in text]


def _overrides(quote: str) -> list[str]:
    return [f"+sec.{k}={quote}{_value(i)}{quote}" for i, k in enumerate(PATTERNS)]


@pytest.mark.parametrize("key", PATTERNS)
def test_each_pattern_is_a_secret_key(key):
    assert is_secret_key(key) and is_secret_key(f"wandb.{key}") and is_secret_key(key.upper())


@pytest.mark.parametrize("key", NOT_SECRETS)
def test_vocabulary_tokens_are_not_secrets(key):
    assert not is_secret_key(key)


@pytest.mark.parametrize("quote", ['"', "'", ""])
def test_run_directory_name(quote):
    text = ",".join(["model=tiny_llama", *_overrides(quote)])  # Hydra's override_dirname (a long one: shortened)
    name = _slug(text)
    assert _leaks(name) == [] and "model=tiny_llama" in name
    assert len(name.encode()) <= 255


@pytest.mark.parametrize("quote", ['"', "'", ""])
def test_error_lines_and_argv_lists(quote):
    overrides = [*_overrides(quote), "seed=1"]
    for text in (" ".join(overrides), str(overrides), ",".join(overrides),
                 f"Error executing job with overrides: {overrides}"):
        clean = redact_text(text)
        assert _leaks(clean) == [], clean
        assert clean.count(REDACTED) == len(PATTERNS) and "seed=1" in clean


def test_hydra_yaml_files(tmp_path):
    overrides = _overrides('"')
    files = {
        "overrides.yaml": overrides,
        "hydra.yaml": {"hydra": {"job": {"override_dirname": ",".join(overrides)},
                                 "overrides": {"task": overrides}}},
        "config.yaml": {"sec": {k: _value(i) for i, k in enumerate(PATTERNS)}, "seed": 1},
    }
    for name, data in files.items():
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data))
        redact_yaml_file(path)
        text = path.read_text()
        assert _leaks(text) == [], (name, text)
        assert text.count(REDACTED) == len(PATTERNS) * (2 if name == "hydra.yaml" else 1)  # it holds them twice


def test_log_records():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactFilter())
    logger = logging.getLogger("mole.test_secrets")
    logger.addHandler(handler)
    try:
        for quote in ('"', ""):
            logger.warning("overrides: %s", " ".join(_overrides(quote)))
            logger.warning("run directory %s", ",".join(_overrides(quote)))
    finally:
        logger.removeHandler(handler)
    assert _leaks(stream.getvalue()) == [] and stream.getvalue().count(REDACTED) == 4 * len(PATTERNS)


def test_mole_error_lines(capsys):
    from mole.cli.common import fail

    for i, key in enumerate(PATTERNS):
        with pytest.raises(SystemExit) as stop:
            fail("mole-train", f"wandb.{key}={_value(i)} is not allowed here")
        assert stop.value.code == 2
    err = capsys.readouterr().err
    assert _leaks(err) == [] and err.count("mole-train: error: wandb.") == len(PATTERNS)


@pytest.mark.parametrize("key", PATTERNS)
def test_hydra_could_not_override_message(key):
    from hydra.errors import ConfigCompositionException

    from mole.cli.common import hydra_error_line

    with pytest.raises(ConfigCompositionException) as err:
        compose_config([f"wandb.{key}={_value(0)}"])
    assert "S0q" in str(err.value)  # Hydra's own message holds the value
    line = hydra_error_line(err.value)
    assert f"wandb.{key}" in line and _leaks(line) == [], line


def test_hydra_error_executing_job_on_stderr(capsys):
    from hydra.core.utils import JobReturn, JobStatus

    failed = JobReturn(overrides=[*_overrides('"'), "seed=1"], status=JobStatus.FAILED)
    failed.return_value = RuntimeError("boom")
    with redacted_stderr(), pytest.raises(RuntimeError):
        failed.return_value  # noqa: B018 - Hydra prints the overrides when it is read
    err = capsys.readouterr().err
    assert "Error executing job with overrides" in err and _leaks(err) == [], err


@pytest.mark.slow
def test_a_real_run_keeps_every_secret_out_of_its_directory_and_output(tmp_path):
    """mole-train with every pattern on its command line, then one that fails in Hydra: nothing leaks."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MOLE_OUTPUT_DIR": str(tmp_path / "out")}
    base = [sys.executable, "-m", "mole.cli.train", "model=tiny_llama", "trainer.max_steps=1", "trainer.batch_size=2",
            "data.max_records=12", "eval=none", f"paths.output_dir={tmp_path / 'out'}"]
    ok = subprocess.run([*base, *_overrides('"')], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    (run_dir,) = (tmp_path / "out" / "runs").iterdir()
    assert _leaks(run_dir.name) == []
    files = [p for p in run_dir.rglob("*") if p.is_file() and p.suffix in (".yaml", ".log", ".json", ".txt")]
    assert {"config.yaml", "overrides.yaml", "hydra.yaml", "train.log"} <= {p.name for p in files}
    for path in files:
        assert _leaks(path.read_text()) == [], path
    assert _leaks(ok.stdout + ok.stderr) == []
    bad = subprocess.run([*base, f"wandb.api_key={_value(0)}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "wandb.api_key" in bad.stderr and _leaks(bad.stdout + bad.stderr) == []
    assert not Path(tmp_path / "out" / "runs").joinpath("wandb.api_key=redacted").exists()
