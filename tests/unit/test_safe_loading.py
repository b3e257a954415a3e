"""Only safetensors / JSON / YAML are read from run directories, and remote code runs only when the config
says so: scans of mole/ and scripts/, and model loading with a stand-in for the Hub."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import TINY

from mole.config import compose_config

ROOT = Path(__file__).resolve().parents[2]


def _sources() -> list[Path]:
    return [p for d in ("mole", "scripts") for p in (ROOT / d).rglob("*.py")]


def test_no_pickle_or_torch_load_in_the_package():
    offending = [
        f"{p.relative_to(ROOT)}: {ln.strip()}"
        for p in _sources()
        for ln in p.read_text().splitlines()
        if re.search(r"torch\.(load|save)\(|\bpickle\b|\bdill\b|joblib\.load|import joblib", ln)
    ]
    assert offending == []


def test_remote_code_runs_only_when_the_config_says_so(monkeypatch):
    # every trust_remote_code in the package passes the config's value; the shipped configs say false
    text = "\n".join(p.read_text() for p in _sources())
    assert re.findall(r"trust_remote_code\s*=\s*(?!trust\b)[A-Z1]\w*", text) == []  # never True / a constant
    # from a name or directory the user gives: only with the config's value; otherwise local files only
    # (the SmolLM2 GGUF shipped in a PyPI package and its converted cache: no code in them)
    # calls, not docstrings; torch's Embedding.from_pretrained takes a tensor, not a name or directory
    loads = re.findall(r"(?<!Embedding)\.from_pretrained\([^)]*\)", text)
    assert loads and all("trust_remote_code=trust" in c or "local_files_only=True" in c for c in loads), loads
    assert len([c for c in loads if "trust_remote_code=trust" in c]) == 3
    for cfg_file in (ROOT / "conf" / "model").glob("*.yaml"):
        text = cfg_file.read_text()
        if "source: hub" in text:
            assert re.search(r"^trust_remote_code: false\b", text, re.M), cfg_file.name

    import mole.model.base as base
    from mole.model.tokenizer import byte_tokenizer
    from mole.utils.errors import MoleConfigError

    seen = {}
    tiny = base.AutoModelForCausalLM.from_config(base.hf_config(compose_config(TINY).model))
    monkeypatch.setattr(base.AutoTokenizer, "from_pretrained", lambda *a, **k: seen.setdefault("tok", k) and byte_tokenizer())
    monkeypatch.setattr(base.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: seen.setdefault("model", k) and tiny)
    base.build_model(compose_config(["model=qwen2_1_5b"]).model)
    assert seen["tok"]["trust_remote_code"] is False and seen["model"]["trust_remote_code"] is False
    seen.clear()
    base.build_model(compose_config(["model=qwen2_1_5b", "model.trust_remote_code=true"]).model)
    assert seen["tok"]["trust_remote_code"] is True and seen["model"]["trust_remote_code"] is True
    with pytest.raises(MoleConfigError, match="model.trust_remote_code must be true or false, got 'yes'"):
        base.build_model(compose_config(["model=qwen2_1_5b", "model.trust_remote_code=yes"]).model)
