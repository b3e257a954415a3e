"""``mole-export``: a trained run in the formats other tools load.

* ``peft`` — runs whose experts are one plain LoRA or DoRA per Linear (``lora``, ``dora``, any run with
  one expert and no router): a peft adapter directory (``adapter_config.json`` written by peft's own
  ``LoraConfig``, ``adapter_model.safetensors``) for ``PeftModel.from_pretrained`` (base, DIR).
* ``merged`` — the same runs and ``full_ft``: a plain Transformers model directory, the adapters merged
  into the base weights (``W + s B A``; DoRA ``m (W + s B A) / ||W + s B A||_c``), tokenizer included,
  for ``AutoModelForCausalLM.from_pretrained`` on DIR.
* ``mixlora`` — ``method=mixlora`` runs in the layout of the ``mixlora`` package (Li et al. 2024, its
  ``MixLoraConfig`` and ``inject_adapter_in_model``): ``adapter_config.json`` with ``peft_type: MIXLORA``
  and the weights under ``mixlora.layers.{l}.self_attn.{proj}.lora_{A,B}.weight``,
  ``mixlora.layers.{l}.mlp.moe_gate.weight`` and ``mixlora.layers.{l}.mlp.{proj}.experts.{e}.lora_{A,B}.weight``.
  NOTE(deviation): written as ``adapter_model.safetensors``; the package's own ``from_pretrained`` reads
  only a pickled ``adapter_model.bin``, so its weights are loaded with ``safetensors`` and handed to
  ``mixlora.inject_adapter_in_model`` (docs/generate-export.md).
* ``hf`` — any run: a Transformers model directory whose ``modeling_mole.py`` subclasses the base
  architecture and builds the mixture through mole in its constructor; the weights are the mole model's
  own state dict (base and adapters). ``AutoModelForCausalLM.from_pretrained`` on DIR with ``trust_remote_code`` turned on by the user
  loads it where mole is installed, and so does ``lm_eval --model hf --model_args
  pretrained=DIR`` plus the user's ``trust_remote_code`` model argument. The export never loads remote code itself.

Everything is written into a temporary directory beside ``out`` and renamed into place: an export that
fails leaves nothing behind. safetensors only.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

from mole.adapters.ffn import FFNLoRAExperts
from mole.build import build_mole_model, inject_from_config
from mole.config_schema import current_model_node
from mole.data.prompts import format_prompt
from mole.generate import load_run
from mole.model.base import build_model
from mole.model.gguf_file import cache_path
from mole.model.inject import decoder_layers, is_trainable_name, mole_layers
from mole.model.layer import MoLELinear
from mole.model.state import saves_everything
from mole.routers.topk import TopKRouter
from mole.run_dir import load_run_config
from mole.utils.errors import MoleConfigError

FORMATS = ("peft", "merged", "mixlora", "hf")
REMOTE_MODULE = "modeling_mole"
REMOTE_CLASS = "MoleForCausalLM"
RUN_KEY = "mole_run"  # the run's structure keys in config.json (what the modeling file injects)
STRUCTURE_KEYS = ("method_name", "seed", "model", "experts", "adapter", "router")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN = ("gate_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------------------------------------------
# what a run exports to


@dataclass
class RunShape:
    """What an exporter needs to know about a built run."""

    single: bool  # every adapted Linear has one LoRA/DoRA expert and no router; nothing else trains
    full: bool  # full fine-tuning: the checkpoint is the whole model
    mixlora: str | None  # why not the mixlora layout (None: it fits)

    @property
    def formats(self) -> list[str]:
        out = []
        if self.single:
            out.append("peft")
        if self.single or self.full:
            out.append("merged")
        if self.mixlora is None:
            out.append("mixlora")
        out.append("hf")
        return out


def _is_plain_lora(layer: MoLELinear) -> bool:
    ex = layer.mole_experts
    return (layer.mole_router is None and layer.gate_source is None and getattr(ex, "num_experts", 0) == 1
            and isinstance(getattr(ex, "lora_A", None), torch.Tensor) and ex.lora_A.shape[0] == ex.rank
            and isinstance(getattr(ex, "lora_B", None), torch.Tensor) and ex.lora_B.shape[1] == ex.rank)


def run_shape(model: nn.Module) -> RunShape:
    if saves_everything(model):
        return RunShape(single=False, full=True, mixlora="MixLoRA FFN experts in every decoder layer, not full fine-tuning")
    linears = mole_layers(model)
    inside = {f"{name}.mole_experts.{p}" for name, layer in linears for p, _ in layer.mole_experts.named_parameters()}
    trained = {n for n, _ in model.named_parameters() if is_trainable_name(n)}
    single = bool(linears) and trained == inside and all(_is_plain_lora(m) for _, m in linears)
    return RunShape(single=single, full=False, mixlora=_mixlora_misfit(model, linears))


def _mixlora_misfit(model: nn.Module, linears) -> str | None:
    """Why the run does not fit MixLoRA's layout (``None`` when it does)."""
    layers = decoder_layers(model)
    experts = [getattr(getattr(layer, "mlp", None), "mole_experts", None) for layer in layers]
    if not all(isinstance(e, FFNLoRAExperts) for e in experts):
        return "MixLoRA FFN experts in every decoder layer"
    if len({e.num_experts for e in experts}) != 1 or len({(e.rank, e.scaling) for e in experts}) != 1:
        return "the same number of FFN experts, rank and alpha in every layer"
    router = experts[0].router
    if not all(isinstance(e.router, TopKRouter) and e.router.renorm == "sum" for e in experts):
        return "a top-k router with renorm=sum on every FFN (MixLoRA's routing)"
    if router.top_k is None:
        return "a top-k router"
    if not all(_is_plain_lora(m) and name.rsplit(".", 1)[-1] in ATTENTION for name, m in linears):
        return "single LoRAs on the attention projections only"
    per_layer = [sorted(n.rsplit(".", 1)[-1] for n, _ in linears if n.startswith(_layer_prefix(model, i)))
                 for i in range(len(layers))]
    if len({tuple(t) for t in per_layer}) != 1 or len({(m.mole_experts.rank, m.mole_experts.scaling) for _, m in linears}) > 1:
        return "the same attention LoRAs (targets, rank, alpha) in every layer"
    expected = {n for n, _ in model.named_parameters() if is_trainable_name(n)}
    known = {f"{n}.mole_experts.{p}" for n, _ in linears for p in ("lora_A", "lora_B")}
    known |= {f"{_layer_prefix(model, i)}mlp.mole_experts.{p}" for i in range(len(layers))
              for p in ("gate_A", "gate_B", "up_A", "up_B", "down_A", "down_B", "router.gate.weight")}
    if expected != known:
        return "nothing trained beside the attention LoRAs, the FFN experts and their routers"
    return None


def _layer_prefix(model: nn.Module, i: int) -> str:
    layers = decoder_layers(model)
    for name, m in model.named_modules():
        if m is layers:
            return f"{name}.{i}."
    raise RuntimeError("decoder layers not found by name")


def check_format(fmt: str, shape: RunShape, method: str | None) -> None:
    if fmt not in FORMATS:
        raise MoleConfigError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
    if fmt not in shape.formats:
        why = {
            "peft": "peft takes runs with one LoRA or DoRA per Linear and no router",
            "merged": "merged takes runs with one LoRA or DoRA per Linear and no router, and full_ft",
            "mixlora": f"the mixlora layout needs {shape.mixlora}",
        }[fmt]
        raise MoleConfigError(f"format={fmt}: run method={method} cannot be exported as {fmt} ({why}); "
                              f"it exports to {', '.join(shape.formats)}")


# ---------------------------------------------------------------------------------------------------
# the writers


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def _base_name(cfg: DictConfig) -> str:
    """What ``base_model_name_or_path`` can name: the Hub id, a GGUF model's converted directory, else mole's
    model name (a model built from its config: the loader is handed the base model itself)."""
    src = cfg.model.get("source")
    if src == "hub":
        return str(cfg.model.get("hf_id"))
    if src in ("gguf", "smollm2") and cfg.model.get("cache_dir"):
        return str(cache_path(current_model_node(cfg.model)))
    return str(cfg.model.get("name"))


def _alpha(rank: int, scaling: float) -> float | int:
    alpha = rank * scaling
    return int(round(alpha)) if abs(alpha - round(alpha)) < 1e-9 else alpha


def write_peft(model: nn.Module, cfg: DictConfig, out: Path) -> None:
    from peft import LoraConfig

    linears = mole_layers(model)
    dora = any(hasattr(m.mole_experts, "magnitude") for _, m in linears)
    ranks = {n.rsplit(".", 1)[-1]: (m.mole_experts.rank, _alpha(m.mole_experts.rank, m.mole_experts.scaling))
             for n, m in linears}
    r, alpha = next(iter(ranks.values()))
    state = {}
    for name, m in linears:
        ex = m.mole_experts
        state[f"base_model.model.{name}.lora_A.weight"] = ex.lora_A
        state[f"base_model.model.{name}.lora_B.weight"] = ex.lora_B
        if dora:
            state[f"base_model.model.{name}.lora_magnitude_vector"] = ex.magnitude
    config = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=sorted(ranks), use_dora=dora, bias="none", task_type="CAUSAL_LM",
        lora_dropout=float(cfg.adapter.get("dropout") or 0.0), base_model_name_or_path=_base_name(cfg),
        rank_pattern={k: v[0] for k, v in ranks.items() if v[0] != r},
        alpha_pattern={k: v[1] for k, v in ranks.items() if v[1] != alpha},
    )
    config.save_pretrained(str(out))
    save_file(_tensors(state), str(out / "adapter_model.safetensors"), metadata={"format": "pt"})


def merge_into_base(model: nn.Module) -> nn.Module:
    """Replace every single-expert :class:`MoLELinear` by its base Linear with the update merged in (in place)."""
    with torch.no_grad():
        for name, m in mole_layers(model):
            ex, base = m.mole_experts, m.base_layer
            if hasattr(ex, "merged_weight"):  # DoRA
                weight = ex.merged_weight()
            else:
                weight = base.weight + (ex.lora_B @ ex.lora_A).to(base.weight.dtype) * ex.scaling
            base.weight.copy_(weight.to(base.weight.dtype))
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, base)
    return model


def write_merged(model: nn.Module, tokenizer, out: Path) -> None:
    merge_into_base(model)
    left = [n for n, _ in model.named_parameters() if is_trainable_name(n)]
    if left:
        raise RuntimeError(f"merged export: adapter parameters remain after merging, e.g. {left[:2]}")
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))


def write_mixlora(model: nn.Module, cfg: DictConfig, out: Path) -> None:
    layers = decoder_layers(model)
    state: dict[str, torch.Tensor] = {}
    attn = []
    for i, layer in enumerate(layers):
        for proj in ATTENTION:
            m = getattr(layer.self_attn, proj, None)
            if isinstance(m, MoLELinear):
                state[f"mixlora.layers.{i}.self_attn.{proj}.lora_A.weight"] = m.mole_experts.lora_A
                state[f"mixlora.layers.{i}.self_attn.{proj}.lora_B.weight"] = m.mole_experts.lora_B
                if i == 0:
                    attn.append((proj, m.mole_experts))
        ex = layer.mlp.mole_experts
        state[f"mixlora.layers.{i}.mlp.moe_gate.weight"] = ex.router.gate.weight
        r = ex.rank
        for proj, (a, b) in {"gate_proj": (ex.gate_A, ex.gate_B), "up_proj": (ex.up_A, ex.up_B),
                             "down_proj": (ex.down_A, ex.down_B)}.items():
            for e in range(ex.num_experts):  # expert e owns rows / columns e*r .. (e+1)*r of the stacks
                state[f"mixlora.layers.{i}.mlp.{proj}.experts.{e}.lora_A.weight"] = a[e * r:(e + 1) * r]
                state[f"mixlora.layers.{i}.mlp.{proj}.experts.{e}.lora_B.weight"] = b[:, e * r:(e + 1) * r]
    ffn = layers[0].mlp.mole_experts
    # NOTE(deviation): the package asserts lora_dropout > 0; a run trained without dropout records the
    # smallest value it accepts in practice (inference applies no dropout either way)
    dropout = float(cfg.adapter.get("dropout") or 0.0) or 1e-6
    config: dict[str, Any] = {
        "base_model_name_or_path": _base_name(cfg),
        "task_type": "CAUSAL_LM",
        "peft_type": "MIXLORA",
        "routing_strategy": "mixlora",
        "bias": "none",
        "r": ffn.rank,
        "lora_alpha": _alpha(ffn.rank, ffn.scaling),
        "lora_dropout": dropout,
        "target_modules": [p for p, _ in attn] + list(FFN),
        "num_experts": ffn.num_experts,
        "top_k": int(ffn.router.top_k),
        "act_fn": str(model.config.hidden_act),  # mixlora 0.2.3 needs it named (it does not read the FFN's)
        "router_aux_loss_coef": 0.0,
        "jitter_noise": 0.0,
    }
    if attn:
        a_ex = attn[0][1]
        if (a_ex.rank, a_ex.scaling) != (ffn.rank, ffn.scaling):  # the attention LoRA is the top level,
            config["r"], config["lora_alpha"] = a_ex.rank, _alpha(a_ex.rank, a_ex.scaling)
            config["expert_lora"] = {"r": ffn.rank, "lora_alpha": _alpha(ffn.rank, ffn.scaling), "lora_dropout": dropout}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(_tensors(state), str(out / "adapter_model.safetensors"), metadata={"format": "pt"})


MODELING = '''"""A mole run as a Transformers model: {base_class} with the run's mixture injected by mole.

Written by mole-export (format=hf). Loading runs this file, so it needs
``AutoModelForCausalLM.from_pretrained`` on DIR with ``trust_remote_code`` turned on by the user and mole installed
(``pip install mole``): the mixture ({method}) is built by ``mole.export.inject_run`` from the
``{run_key}`` entry of config.json, then the weights (base and adapters) are loaded as usual.
"""

from transformers import {base_class}

from mole.export import inject_run


class {cls}({base_class}):
    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        inject_run(self, config.{run_key})
'''


def inject_run(model: nn.Module, run: dict) -> None:
    """Build the run's mixture into a freshly constructed base model (the ``hf`` format's modeling file).

    The adapters' initial values do not matter: ``from_pretrained`` loads the saved ones right after.
    ``from_pretrained`` builds the model on the meta device and loads only what the checkpoint holds, so
    the mixture's buffers that a state dict leaves out (constants computed from the config, e.g. HMoRA's
    ``a_l``) are made persistent here and saved by :func:`write_hf`.
    """
    cfg = OmegaConf.create(dict(run))
    inject_from_config(model, cfg, tokenizer=None)
    for name, module in model.named_modules():
        if is_trainable_name(name):
            module._non_persistent_buffers_set.clear()
    model.eval()


def write_hf(model: nn.Module, tokenizer, cfg: DictConfig, out: Path) -> None:
    base = type(model)
    base_class = base.__name__
    if getattr(transformers, base_class, None) is not base:
        raise MoleConfigError(f"format=hf: the base model class {base_class} is not importable from transformers")
    run = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in STRUCTURE_KEYS if k in cfg]), resolve=True)
    config = model.config
    config.auto_map = {"AutoModelForCausalLM": f"{REMOTE_MODULE}.{REMOTE_CLASS}"}
    config.architectures = [REMOTE_CLASS]
    setattr(config, RUN_KEY, run)
    try:
        state = model.state_dict()
        state.update({n: b for n, b in model.named_buffers() if is_trainable_name(n) and n not in state})
        state = _tensors(state)
        model.save_pretrained(str(out), safe_serialization=True, state_dict=state)
    finally:
        del config.auto_map
        delattr(config, RUN_KEY)
    tokenizer.save_pretrained(str(out))
    (out / f"{REMOTE_MODULE}.py").write_text(MODELING.format(base_class=base_class, cls=REMOTE_CLASS, run_key=RUN_KEY,
                                                             method=cfg.get("method_name")))


# ---------------------------------------------------------------------------------------------------
# loading an export back, with the client of its format

CLIENTS = {
    "peft": "peft.PeftModel.from_pretrained on (base, DIR)",
    "merged": "AutoModelForCausalLM.from_pretrained on DIR",
    "mixlora": "mixlora.inject_adapter_in_model(base, MixLoraConfig, weights)",
    "hf": "AutoModelForCausalLM.from_pretrained, on DIR, with trust_remote_code turned on (it runs modeling_mole.py)",
}


def load_export(fmt: str, out: str | Path, cfg: DictConfig, trust_remote_code: bool = False) -> nn.Module:
    """The exported model as the client of ``fmt`` loads it (in eval mode); ``cfg`` is the run's config,
    for the base model that ``peft`` and ``mixlora`` adapters go on (built as mole builds it).

    ``hf`` runs the directory's modeling file, so it loads only with ``trust_remote_code`` (what the user typed).
    """
    out = str(out)
    if fmt == "merged":
        return AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    if fmt == "hf":
        trust = trust_remote_code
        return AutoModelForCausalLM.from_pretrained(out, trust_remote_code=trust).eval()
    base, _ = build_model(cfg.model, seed=cfg.get("seed"))
    if fmt == "peft":
        from peft import PeftModel

        return PeftModel.from_pretrained(base, out, local_files_only=True).eval()
    try:
        import mixlora
    except ImportError:
        raise MoleConfigError("check=true for format=mixlora needs the mixlora package (pip install --no-deps mixlora==0.2.3)") from None

    config = mixlora.MixLoraConfig.from_config(json.loads(Path(out, "adapter_config.json").read_text()))
    config.adapter_name_, config.dtype_ = "default", next(base.parameters()).dtype
    config.check()
    mixlora.inject_adapter_in_model(base, config, load_file(str(Path(out, "adapter_model.safetensors"))))
    for layer in base.model.layers:  # the package keeps the FFN experts in a plain dict, out of reach of eval()
        for moe in layer.mlp.mixlora_moes.values():
            for expert in moe.experts_.values():
                expert.eval()
    return base.eval()


def logit_difference(model: nn.Module, loaded: nn.Module, tokenizer) -> float:
    """The largest ``|logit|`` difference between two models on a fixed left-padded batch of two prompts."""
    texts = [format_prompt("Name a planet."), format_prompt("Which is larger, 7 or 12?", "Answer in one word.")]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    with torch.no_grad():
        a = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()
    return (a - b)[real].abs().max().item()


# ---------------------------------------------------------------------------------------------------
# the command


def check_out(out: str | Path) -> Path:
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MoleConfigError(f"out={str(out)!r} already exists; name a new (or empty) directory")
    if not out.parent.is_dir():
        raise MoleConfigError(f"out={str(out)!r}: its folder {str(out.parent)!r} does not exist")
    return out


def export_run(checkpoint: str | Path, fmt: str, out: str | Path, check: bool = False,
               trust_remote_code: bool = False) -> tuple[Path, float | None]:
    """Export the run in ``checkpoint`` as ``fmt`` into the new directory ``out``.

    Returns ``(out, difference)``: with ``check``, the largest logit difference between the run and the
    export loaded by its client (:func:`load_export`), else ``None``.
    """
    if check and fmt == "hf" and not trust_remote_code:
        raise MoleConfigError("check=true with format=hf loads the export's modeling_mole.py, which runs code: "
                              "add trust_remote_code=true to allow it")
    out = check_out(out)
    if fmt not in FORMATS:
        raise MoleConfigError(f"format must be one of {list(FORMATS)}, got {fmt!r}")

    cfg = load_run_config(checkpoint)
    skeleton, _, _ = build_mole_model(cfg, meta=True)  # the run's structure, no weights: a wrong format costs no load
    check_format(fmt, run_shape(skeleton), cfg.get("method_name"))
    model, tokenizer, cfg = load_run(checkpoint, "cpu")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if fmt == "peft":
            write_peft(model, cfg, tmp)
        elif fmt == "merged":
            write_merged(model, tokenizer, tmp)
        elif fmt == "mixlora":
            write_mixlora(model, cfg, tmp)
        else:
            write_hf(model, tokenizer, cfg, tmp)
        if out.exists():
            out.rmdir()  # empty (checked)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not check:
        return out, None
    model, tokenizer, _ = load_run(checkpoint, "cpu")  # again: peft and merged exports change the model
    return out, logit_difference(model, load_export(fmt, out, cfg, trust_remote_code), tokenizer)
