"""Text generation from a trained run (``mole-generate``), through ``transformers``' ``generate``.

:func:`load_run` rebuilds a run's model as ``mole-eval`` does (``config.yaml`` + ``adapter.safetensors``);
:func:`generate_texts` completes prompts in batches, left-padded, with the KV cache.

Every preset generates the same tokens with the cache as without it (``tests/unit/test_generate.py``): the
values a router computes once per sequence — HMoRA's task representation (eq. 6) and instance-level
routing — are computed from the prompt on the first forward and reused for the new tokens
(:mod:`mole.routers.context`), LLaMA-Adapter / MoA prompts attend from each new query token, and prompt
tuning's virtual tokens are prepended once, on the first forward.

Only one sequence per prompt (greedy or sampled); beam search would reorder the cache but not the
per-sequence routing state, so it is not offered.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm
from transformers import GenerationConfig

from mole.build import build_mole_model
from mole.data.prompts import TEMPLATES, format_prompt
from mole.data.sources import load_json_list
from mole.model.state import ADAPTER_FILE, load_adapter
from mole.run_dir import load_run_config
from mole.utils.errors import MoleConfigError

RAW_TEMPLATE = "none"  # template=none: the prompt text as given, no template around it


@dataclass
class GenerationSettings:
    """How to decode (the ``mole-generate`` keys; see ``conf/generate.yaml``)."""

    max_new_tokens: int = 128
    sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    batch_size: int = 8

    @classmethod
    def from_config(cls, cfg: DictConfig | dict) -> GenerationSettings:
        """Checked settings from a config (keys absent or null keep the defaults)."""

        def get(key: str, default: Any) -> Any:
            value = cfg.get(key, default)
            return default if value is None else value

        def positive_int(key: str, default: int) -> int:
            value = get(key, default)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise MoleConfigError(f"{key} must be a positive integer, got {value!r}")
            return value

        sample = get("sample", False)
        if not isinstance(sample, bool):
            raise MoleConfigError(f"sample must be true (sampling) or false (greedy), got {sample!r}")
        seed = get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise MoleConfigError(f"seed must be an integer, got {seed!r}")
        temperature, top_p, top_k = cfg.get("temperature"), cfg.get("top_p"), cfg.get("top_k")
        if not sample:
            given = [k for k, v in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k)) if v is not None]
            if given:
                raise MoleConfigError(f"{', '.join(given)}: used only when sampling; add sample=true (greedy decoding is the default)")
        if temperature is not None and not (_is_number(temperature) and temperature > 0 and math.isfinite(temperature)):
            raise MoleConfigError(f"temperature must be a positive number, got {temperature!r}")
        if top_p is not None and not (_is_number(top_p) and 0 < top_p <= 1):
            raise MoleConfigError(f"top_p must be a number in (0, 1], got {top_p!r}")
        if top_k is not None and not (isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 1):
            raise MoleConfigError(f"top_k must be a positive integer, got {top_k!r}")
        stop = cfg.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        if not all(isinstance(s, str) and s for s in stop):
            raise MoleConfigError(f"stop must be a string or a list of non-empty strings, got {stop!r}")
        return cls(
            max_new_tokens=positive_int("max_new_tokens", cls.max_new_tokens),
            sample=sample,
            temperature=None if temperature is None else float(temperature),
            top_p=None if top_p is None else float(top_p),
            top_k=top_k,
            seed=seed,
            stop=[unescape(s) for s in stop],
            batch_size=positive_int("batch_size", cls.batch_size),
        )


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def unescape(text: str) -> str:
    r"""``\n``, ``\t`` and ``\\`` typed on a command line as the characters they stand for."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in "nt\\":
            out.append({"n": "\n", "t": "\t", "\\": "\\"}[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


# ---------------------------------------------------------------------------------------------------
# the run


def load_run(checkpoint: str | Path, device: str = "auto"):
    """A run's model (its adapter loaded, in eval mode), tokenizer and config; nothing is written.

    Returns:
        ``(model, tokenizer, cfg)``.
    """
    run_dir = Path(checkpoint)
    cfg = load_run_config(run_dir)
    if not (run_dir / ADAPTER_FILE).is_file():
        raise MoleConfigError(f"checkpoint: {run_dir / ADAPTER_FILE} not found (is the run finished? see its metrics.json)")
    model, tokenizer, _ = build_mole_model(cfg)
    load_adapter(model, run_dir / ADAPTER_FILE)
    model.eval()  # the injected modules too (built after the base model's eval())
    model.to(resolve_device(device))
    return model, tokenizer, cfg


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise MoleConfigError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MoleConfigError(f"device={device}: no CUDA device is available here (use device=cpu)")
    return dev


def run_template(cfg: DictConfig, template: str | None) -> str:
    """The template prompts are wrapped in: ``template`` if given, else the one the run was trained with."""
    name = template if template is not None else (cfg.get("data") or {}).get("template", "alpaca")
    if name != RAW_TEMPLATE and name not in TEMPLATES:
        raise MoleConfigError(f"template must be one of {[*TEMPLATES, RAW_TEMPLATE]} (or null: the run's own), got {name!r}")
    return name


def render(instruction: str, input: str = "", template: str = "alpaca") -> str:  # noqa: A002
    """The text the model is conditioned on: the record's prompt in ``template`` (``none``: the text itself)."""
    if template == RAW_TEMPLATE:
        return f"{instruction}\n{input}" if input else instruction
    return format_prompt(instruction, input, template)


# ---------------------------------------------------------------------------------------------------
# input files


def read_prompt_records(path: str | Path, key: str = "input") -> list[dict[str, Any]]:
    """Records of a ``.json`` list or ``.jsonl`` file: LLM-Adapters ones (``instruction``, optional
    ``input``) or ``{"prompt": ...}`` (used as given, no template). Other fields are kept for the output."""
    path = Path(path).expanduser()
    where = f"{key}: {path}"
    if not path.is_file():
        raise MoleConfigError(f"{where} " + ("is not a file" if path.exists() else "does not exist"))
    if path.suffix not in (".json", ".jsonl"):
        raise MoleConfigError(f"{where}: expected a .json (a list of records) or .jsonl file (one record a line)")
    records = load_json_list(path, where)
    if not records:
        raise MoleConfigError(f"{where}: no records")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise MoleConfigError(f"{where}: record {i} is a {type(rec).__name__}, expected an object")
        text_key = "prompt" if "prompt" in rec else "instruction"
        if not isinstance(rec.get(text_key), str):
            raise MoleConfigError(f"{where}: record {i} has no text field 'prompt' or 'instruction' "
                                  "(LLM-Adapters records: instruction, input; or {\"prompt\": ...})")
        if text_key == "instruction" and not isinstance(rec.get("input") or "", str):
            raise MoleConfigError(f"{where}: record {i} has a non-text 'input' field")
    return records


def record_prompt(rec: dict[str, Any], template: str) -> str:
    """A record's model input: ``prompt`` as given, or ``instruction`` / ``input`` in the template."""
    if "prompt" in rec:
        return rec["prompt"]
    return render(rec["instruction"], rec.get("input") or "", template)


# ---------------------------------------------------------------------------------------------------
# generation


def _batches(items: Sequence[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def generation_config(tokenizer, settings: GenerationSettings):
    """A complete ``GenerationConfig`` (nothing inherited from the base model's defaults)."""
    sampling = {}
    if settings.sample:
        sampling = {"temperature": settings.temperature if settings.temperature is not None else 1.0,
                    "top_p": settings.top_p if settings.top_p is not None else 1.0,
                    "top_k": settings.top_k if settings.top_k is not None else 0}
    return GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=settings.sample,
        num_beams=1,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        stop_strings=list(settings.stop) or None,
        use_cache=True,
        **sampling,
    )


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (without) the first stop string."""
    ends = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(ends)] if ends else text


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: Sequence[str], settings: GenerationSettings,
                   progress: bool = False) -> list[str]:
    """The completion of each prompt (without the prompt), cut at the first stop string.

    Prompts are tokenised as in training (special tokens added), left-padded in batches of
    ``settings.batch_size``, and decoded with ``model.generate`` and its KV cache.
    """
    config = generation_config(tokenizer, settings)
    device = next(model.parameters()).device
    torch.manual_seed(settings.seed)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out: list[str] = []
    try:
        bar = tqdm(total=len(prompts), desc="generating", unit="prompt", disable=not progress)
        for batch in _batches(prompts, settings.batch_size):
            enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=True).to(device)
            ids = model.generate(**enc, generation_config=config, tokenizer=tokenizer if settings.stop else None)
            new = ids[:, enc["input_ids"].shape[1]:]
            out.extend(cut_at_stop(t, settings.stop) for t in tokenizer.batch_decode(new, skip_special_tokens=True))
            bar.update(len(batch))
        bar.close()
    finally:
        tokenizer.padding_side = side
    return out
