"""The published code's side of ``scripts/peers_bench.py``: MoE-PEFT and the ``mixlora`` package, timed
against a peft LoRA r=8 step in this process.

Run by ``scripts/peers_bench.py`` with ``.venv-peers/bin/python`` (``make peers``), which pins the
transformers these packages need (< 4.47). It never imports mole: it reads the base model's shape
(``shape.json``), its weights and the batch (``weights.safetensors``, ``batch.safetensors``) from the
directory given on the command line, and answers one JSON line on stdout per command line on stdin:

* ``{"cmd": "build", "variants": [...], "warmup": N}`` -> trainable parameters, peak memory and the
  losses of the warm-up steps, per variant;
* ``{"cmd": "round", "seed": S}`` -> one step of each variant (order shuffled by ``S``), seconds each;
* ``{"cmd": "quit"}``.

Only torch is imported at module level, so that the mole side can reuse :func:`step_memory` (one account
for both sides).
"""

from __future__ import annotations

import copy
import json
import random
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F

LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
E, TOP_K = 8, 2
LR = 1e-4


def _storage(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr() or None
    except (RuntimeError, NotImplementedError):
        return None


def _unique_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        key = _storage(t)
        if key is not None:
            seen[key] = t.untyped_storage().nbytes()
    return sum(seen.values())


def step_memory(frozen: list[torch.Tensor], trainable: list[torch.Tensor], forward_loss: Callable[[], torch.Tensor],
                zero_grad: Callable[[], None]) -> int:
    """Bytes of one training step by the same account for every framework: the unique storages of the
    frozen base (``frozen``: its parameters and buffers) and of the trainable parameters, the trainable
    parameters' gradients and two AdamW moments (3 x their bytes), and the unique storages autograd saves
    for backward during ``forward_loss()`` (parameters' own storages excluded). The account of
    ``mole.bench`` on the CPU (``mole/bench/measure.py``), written without mole so that both venvs run it.
    Transient tensors that autograd does not save (a product freed right after use) are not counted."""
    exclude = {k for t in [*frozen, *trainable] if (k := _storage(t)) is not None}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage(t)
        if key is not None and key not in exclude:
            saved[key] = max(saved.get(key, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward_loss()
    loss.backward()
    zero_grad()
    trainable_bytes = _unique_bytes(trainable)
    return _unique_bytes(frozen) + trainable_bytes + 3 * trainable_bytes + sum(saved.values())


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over the positions not labelled -100 (as ``mole.losses.lm.lm_loss``)."""
    return F.cross_entropy(logits[:, :-1, :].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


def adamw(params: list[torch.Tensor]) -> torch.optim.AdamW:
    """Every variant's optimizer, the peft baseline's included: torch's fused AdamW, as mole's trainer and
    ``mole.bench`` use, so that the ratios compare the adapters and not two optimizer implementations."""
    return torch.optim.AdamW(params, lr=LR, fused=True)


class Variant:
    def __init__(self, name: str, trainable: list[torch.Tensor], forward_loss: Callable[[], torch.Tensor]):
        self.name, self.trainable, self.forward_loss = name, trainable, forward_loss
        self.optimizer = adamw(trainable)

    def step(self) -> torch.Tensor:
        loss = self.forward_loss()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def load_base(workdir: Path):
    """The random base model that the mole side built, in this venv's transformers (same weights)."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = json.loads((workdir / "shape.json").read_text())
    config = LlamaConfig(**shape)
    model = LlamaForCausalLM(config)  # its own initialisation, then every weight replaced by the mole side's
    missing, unexpected = model.load_state_dict(load_file(workdir / "weights.safetensors"), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"weights.safetensors: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.requires_grad_(False)
    return model, load_file(workdir / "batch.safetensors")


def _copy(base):
    """A copy of the module tree that shares the frozen weights (as ``mole.bench``'s variants do)."""
    return copy.deepcopy(base, memo={id(t): t for t in [*base.parameters(), *base.buffers()]})


def build_peft(base, batch) -> Variant:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_copy(base), LoraConfig(**LORA, bias="none", target_modules=TARGETS, task_type="CAUSAL_LM"))
    model.train()

    def forward_loss() -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        return lm_loss(logits, batch["labels"])

    return Variant("peft_lora_r8", [p for p in model.parameters() if p.requires_grad], forward_loss)


# MoE-PEFT adapter configurations (moe_peft.adapters.*.config from_config keys). Its MoLA puts a router on
# every target (all 7 linears); its LoRAMoE routes the FFN's linears and gives the attention's plain LoRA
# (moe_peft/model.py, init_lora_layer_weight: "plugin" on mlp_state_dict for LoRAMoE, all_state_dict for
# MoLA); its MixLoRA makes the FFN 8 experts and gives the attention plain LoRA.
MOE_PEFT = {
    "moe_peft_lora": {"peft_type": "LORA"},
    "moe_peft_mola": {"peft_type": "MOLA", "num_experts": E, "top_k": TOP_K, "router_loss": True},
    "moe_peft_loramoe": {"peft_type": "LORAMOE", "num_experts": E},
    "moe_peft_mixlora": {"peft_type": "MIXLORA", "routing_strategy": "mixlora", "num_experts": E, "top_k": TOP_K},
}


def build_moe_peft(name: str, base, batch) -> Variant:
    import moe_peft
    from moe_peft.models import from_pretrained

    model = moe_peft.LLMModel(from_pretrained(_copy(base), attn_impl="eager", use_sliding_window=False, device="cpu"))
    config = moe_peft.adapters.lora_config_factory({"name": name, "task_name": "casual", **LORA,
                                                    "target_modules": TARGETS, **MOE_PEFT[name]})
    config.adapter_name = name
    model.init_adapter(config)
    trainable = [t for t in model.get_adapter_weight_dict(name).values() if t.requires_grad]
    n = batch["input_ids"].shape[0]

    def forward_loss() -> torch.Tensor:
        # the trainer's step (moe_peft/trainer.py _compute_loss): the LM loss plus the router loss where the
        # method has one; the model clears the input's tensors, so each step builds its input anew
        inp = moe_peft.LLMModelInput(
            batch_configs_=[moe_peft.LLMBatchConfig(adapter_name_=name, batch_start_idx_=0, batch_end_idx_=n)],
            batch_tokens_=batch["input_ids"], batch_labels_=batch["labels"], batch_masks_=batch["attention_mask"])
        out = model(inp)[0]
        return out.loss + out.aux_loss if out.aux_loss is not None else out.loss

    return Variant(name, trainable, forward_loss)


def build_mixlora_package(base, batch) -> Variant:
    """The ``mixlora`` package (TUDB-Labs/MixLoRA 0.2.3): an inference package that injects given weights.
    Given fresh ones (LoRA A Kaiming-uniform as its LoraLinear initialises, B zero, the router normal 0.02,
    its ``router_init_range``), with ``requires_grad``, it trains; its forward keeps no router logits, so
    there is no balance loss."""
    from mixlora import MixLoraConfig, inject_adapter_in_model

    model = _copy(base)
    cfg = model.config
    config = MixLoraConfig.from_config({"base_model_name_or_path": "random", "task_type": "CAUSAL_LM",
                                        "peft_type": "MIXLORA", "routing_strategy": "mixlora", **LORA,
                                        "target_modules": TARGETS, "num_experts": E, "top_k": TOP_K})
    config.adapter_name_ = "default"
    config.dtype_ = torch.float32
    config.act_fn_ = cfg.hidden_act  # what MixLoraModelForCausalLM.from_pretrained fills in
    config.check()

    def lora(out_f: int, in_f: int, prefix: str, weights: dict) -> None:
        a = torch.empty(LORA["r"], in_f)
        torch.nn.init.kaiming_uniform_(a, a=5 ** 0.5)
        weights[f"{prefix}.lora_A.weight"], weights[f"{prefix}.lora_B.weight"] = a, torch.zeros(out_f, LORA["r"])

    h, ffn = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    weights: dict[str, torch.Tensor] = {}
    for i in range(cfg.num_hidden_layers):
        for proj, (o, n_in) in {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h)}.items():
            lora(o, n_in, f"mixlora.layers.{i}.self_attn.{proj}", weights)
        weights[f"mixlora.layers.{i}.mlp.moe_gate.weight"] = torch.randn(E, h) * 0.02
        for proj, (o, n_in) in {"gate_proj": (ffn, h), "up_proj": (ffn, h), "down_proj": (h, ffn)}.items():
            for e in range(E):
                lora(o, n_in, f"mixlora.layers.{i}.mlp.{proj}.experts.{e}", weights)
    inject_adapter_in_model(model, config, weights)
    trainable = []
    for layer in model.model.layers:
        moe = layer.mlp.mixlora_moes["default"]
        moe.gate_ = torch.nn.Parameter(moe.gate_)
        trainable.append(moe.gate_)
        for expert in moe.experts_.values():  # a plain dict: not registered as submodules
            expert.train()
            trainable += [expert.lora_A.weight, expert.lora_B.weight]
    trainable += [p for n, p in model.named_parameters() if "lora_" in n]
    for t in trainable:
        t.requires_grad_(True)
    model.train()

    def forward_loss() -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        return lm_loss(logits, batch["labels"])

    return Variant("mixlora_package", trainable, forward_loss)


def build(name: str, base, batch) -> Variant:
    torch.manual_seed(0)
    if name == "peft_lora_r8":
        return build_peft(base, batch)
    if name in MOE_PEFT:
        return build_moe_peft(name, base, batch)
    if name == "mixlora_package":
        return build_mixlora_package(base, batch)
    raise SystemExit(f"peers_worker: unknown variant {name!r}")


NAMES = ["peft_lora_r8", *MOE_PEFT, "mixlora_package"]


def main() -> None:
    torch.set_num_threads(1)
    workdir = Path(sys.argv[1])
    base, batch = load_base(workdir)
    frozen = [*base.parameters(), *base.buffers()]
    variants: list[Variant] = []

    def reply(obj) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    for line in sys.stdin:
        msg = json.loads(line)
        if msg["cmd"] == "build":
            out = {}
            for name in msg["variants"]:
                v = build(name, base, batch)
                losses = [float(v.step()) for _ in range(msg["warmup"])]
                peak = step_memory(frozen, v.trainable, v.forward_loss,
                                   lambda v=v: v.optimizer.zero_grad(set_to_none=True))
                variants.append(v)
                out[name] = {"trainable": sum(t.numel() for t in v.trainable), "peak_bytes": peak,
                             "warmup_losses": losses}
            versions = {d: metadata.version(d) for d in ("transformers", "peft", "moe-peft", "mixlora")}
            reply({"variants": out, "versions": {"torch": torch.__version__, **versions}})
        elif msg["cmd"] == "round":
            order = list(variants)
            random.Random(msg["seed"]).shuffle(order)
            times = {}
            for v in order:
                t0 = time.process_time()
                v.step()
                times[v.name] = time.process_time() - t0
            reply({"times": times})
        else:
            reply({"bye": True})
            return


if __name__ == "__main__":
    main()
