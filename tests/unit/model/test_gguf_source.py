"""``model.source: gguf`` on GGUF files written here: a tiny random Llama and Qwen2, with mole's byte-level
tokenizer, written with the ``gguf`` package's writer the way llama.cpp's converter lays them out (llama.cpp
tensor names, Llama's Q/K rows permuted for its rotary layout, F32 tensors). Loading one back through mole
must give the transformers model the weights came from: every tensor bit-equal, and the same logits; and the
tokenizer the vocabulary came from: the same ids. SmolLM2's real file is checked in
tests/integration/test_smollm2.py.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from mole.model import gguf_file
from mole.model.base import build_model, build_skeleton, hf_config
from mole.model.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, byte_tokenizer
from mole.utils.errors import MoleConfigError

gguf = pytest.importorskip("gguf")

TEXTS = ["### Instruction:\nName a colour.\n\n### Response:\nBlue", "héllo wörld 漢字 🙂\t\n  x", "a"]
SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0)


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's converter's row order for Llama's Q and K (rotary pairs interleaved instead of halves)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_model(arch: str, tied: bool):
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = byte_tokenizer()
    cfg = AutoConfig.for_model(arch, vocab_size=len(tok), tie_word_embeddings=tied, **SHAPE)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # random norms and biases: a wrongly mapped one would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.2)
    return model, tok


def _write_gguf(path, model, tok, arch: str, architecture: str | None = None) -> None:
    cfg = model.config
    w = gguf.GGUFWriter(str(path), architecture or arch)
    w.add_name(f"tiny-{arch}")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    special = set(SPECIAL_TOKENS.values())
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), cfg.num_hidden_layers)
    for key, tensor in model.state_dict().items():
        if cfg.tie_word_embeddings and key == "lm_head.weight":
            continue
        if arch == "llama" and key.endswith("q_proj.weight"):
            tensor = _permute(tensor, cfg.num_attention_heads)
        elif arch == "llama" and key.endswith("k_proj.weight"):
            tensor = _permute(tensor, cfg.num_key_value_heads)
        w.add_tensor(names.get_name(key, try_suffixes=(".weight", ".bias")), tensor.numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _model_cfg(gguf_path, cache_dir, **extra):
    return OmegaConf.create({"name": "x", "source": "gguf", "gguf": str(gguf_path), "cache_dir": str(cache_dir),
                             "dtype": "float32", **extra})


@pytest.fixture(scope="module", params=[("llama", False), ("llama", True), ("qwen2", True)],
                ids=["llama", "llama-tied", "qwen2-tied"])
def written(request, tmp_path_factory):
    arch, tied = request.param
    tmp = tmp_path_factory.mktemp(f"gguf_{arch}")
    model, tok = _hf_model(arch, tied)
    path = tmp / f"Tiny-{arch}.F32.gguf"
    _write_gguf(path, model, tok, arch)
    loaded = build_model(_model_cfg(path, tmp / "cache"))
    return model, tok, path, tmp / "cache", loaded


def test_tensors_and_logits_equal_the_model_the_file_came_from(written):
    ref, ref_tok, _, _, (model, tok) = written
    assert type(model) is type(ref) and getattr(model, "hf_quantizer", None) is None
    got, want = model.state_dict(), ref.state_dict()
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    if ref.config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, ref(**enc).logits)


def test_tokenizer_comes_from_the_file(written):
    _, ref_tok, _, _, (model, tok) = written
    texts = TEXTS + ["<|bos|>user\nhi<|eos|>", "  leading spaces", "x" * 300]
    for text in texts:
        assert tok(text).input_ids == ref_tok(text).input_ids, text
        assert tok.decode(tok(text).input_ids) == text
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (ref_tok.bos_token, ref_tok.eos_token, ref_tok.pad_token)
    assert (model.config.bos_token_id, model.config.eos_token_id) == (ref_tok.bos_token_id, ref_tok.eos_token_id)
    assert model.generation_config.eos_token_id == ref_tok.eos_token_id
    assert tok.model_max_length == model.config.max_position_embeddings
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert tok.apply_chat_template(chat, tokenize=False) == ref_tok.apply_chat_template(chat, tokenize=False)


def test_second_load_reads_the_cache(written, monkeypatch):
    _, _, path, cache_dir, (model, tok) = written
    cache = gguf_file.cache_path(_model_cfg(path, cache_dir))
    assert cache.parent == cache_dir and cache.name.startswith(path.stem.lower() + "-")
    assert json.loads((cache / gguf_file.MARKER).read_text())["size"] == path.stat().st_size
    assert not [p.name for p in cache_dir.iterdir() if p.name.startswith(".")]  # no temp dir left

    def no_reading(path):
        raise AssertionError("the GGUF was read again")

    monkeypatch.setattr(gguf_file, "read_gguf", no_reading)
    again, _ = build_model(_model_cfg(path, cache_dir, dtype="bfloat16"))
    assert again.dtype == torch.bfloat16
    want = model.state_dict()
    assert all(torch.equal(t, want[k].to(torch.bfloat16)) for k, t in again.state_dict().items())
    assert hf_config(_model_cfg(path, cache_dir)).to_dict() == model.config.to_dict()


def test_skeleton_and_config_without_a_cache(written, tmp_path):
    ref, _, path, _, _ = written
    skeleton = build_skeleton(_model_cfg(path, tmp_path / "none"))  # metadata only, nothing written
    assert skeleton.device.type == "meta" and type(skeleton) is type(ref)
    assert sum(p.numel() for p in skeleton.parameters()) == sum(p.numel() for p in ref.parameters())
    assert not (tmp_path / "none").exists()


def _cached_llama(tmp_path, tied: bool):
    """A tiny Llama, its GGUF file ``m.gguf`` and the model config of its cache ``cache/c``, converted once."""
    model, tok = _hf_model("llama", tied)
    path = tmp_path / "m.gguf"
    _write_gguf(path, model, tok, "llama")
    cfg = _model_cfg(path, tmp_path / "cache", cache_name="c")
    build_model(cfg)
    return model, tok, path, cfg


def test_changed_file_rebuilds_the_cache(tmp_path, caplog):
    model, tok, path, cfg = _cached_llama(tmp_path, tied=True)
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    _write_gguf(path, model, tok, "llama")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with caplog.at_level(logging.WARNING, logger=gguf_file.__name__):
        again, _ = build_model(cfg)
    assert "not the current" in caplog.text
    assert torch.equal(again.model.norm.weight, model.model.norm.weight)
    assert (tmp_path / "cache" / "c" / gguf_file.MARKER).is_file()


def test_incomplete_cache_is_rebuilt(tmp_path, caplog):
    model, _, _, cfg = _cached_llama(tmp_path, tied=False)
    (tmp_path / "cache" / "c" / "model.safetensors").write_bytes(b"\0" * 100)  # a truncated weights file
    with caplog.at_level(logging.WARNING, logger=gguf_file.__name__):
        again, _ = build_model(cfg)
    assert "rebuilding" in caplog.text
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)


# ---- bad input: one line naming model.gguf and what is wrong ----


def _error(spec, tmp_path) -> str:
    with pytest.raises(MoleConfigError) as info:
        build_model(_model_cfg(spec, tmp_path / "cache"))
    msg = str(info.value)
    assert "\n" not in msg and "model.gguf" in msg
    assert not (tmp_path / "cache").exists()
    return msg


def test_missing_file(tmp_path):
    assert "no such file" in _error(str(tmp_path / "nope.gguf"), tmp_path)


def test_package_not_installed_or_without_the_file(tmp_path):
    assert "package 'no_such_pkg_x' is not installed" in _error("no_such_pkg_x:m.gguf", tmp_path)
    msg = _error("omegaconf:m.gguf", tmp_path)  # installed, holds no such file
    assert "holds no file 'm.gguf'" in msg and "none" in msg


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    assert "is not a GGUF file" in _error(str(tmp_path / "x.gguf"), tmp_path)


def test_truncated_file(tmp_path):
    model, tok = _hf_model("llama", True)
    _write_gguf(tmp_path / "m.gguf", model, tok, "llama")
    (tmp_path / "cut.gguf").write_bytes((tmp_path / "m.gguf").read_bytes()[:5000])
    assert "cannot be read" in _error(str(tmp_path / "cut.gguf"), tmp_path)


def test_unsupported_architecture(tmp_path):
    model, tok = _hf_model("llama", True)
    path = tmp_path / "m.gguf"
    _write_gguf(path, model, tok, "llama", architecture="gpt2")
    msg = _error(str(path), tmp_path)
    assert "'gpt2'" in msg and "llama, qwen2" in msg


def test_exports_name_the_cache_as_their_base(written):
    from mole.export import _base_name

    _, _, path, cache_dir, _ = written
    cfg = OmegaConf.create({"model": _model_cfg(path, cache_dir)})
    assert _base_name(cfg) == str(gguf_file.cache_path(cfg.model))
    assert (gguf_file.cache_path(cfg.model) / "config.json").is_file()  # a directory from_pretrained can read


def test_the_default_method_trains_on_a_gguf_model(written):
    from mole.build import build_mole_model
    from mole.config import compose_config

    ref, _, path, cache_dir, _ = written
    cfg = compose_config(["model=smollm2_135m", f"model.gguf={path}", "model.cache_name=null",
                          f"model.cache_dir={cache_dir}", "eval=none"])
    model, tok, report = build_mole_model(cfg)
    assert sum(map(len, report.adapted.values())) == 7 * ref.config.num_hidden_layers  # all 7 Linears of each layer
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():  # freshly injected experts start as the identity: the base model's logits
        assert torch.allclose(model(**enc).logits, ref(**enc).logits, atol=1e-5)
    model.train()
    model(**enc, labels=enc.input_ids).loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)  # the base stays frozen
