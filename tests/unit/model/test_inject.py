"""Injection into a Hugging Face Llama: which modules, how many experts, what trains, and its errors."""

from __future__ import annotations

import pytest

from mole.build import build_mole_model, parameter_report
from mole.model.inject import mole_layers
from mole.utils.errors import MoleConfigError


def test_layout_and_targets_follow_the_config(tiny_cfg):
    cfg = tiny_cfg("experts=mola_2468", "experts.targets=[q_proj,v_proj,down_proj]")
    model, _, report = build_mole_model(cfg)
    layers = mole_layers(model)
    assert len(layers) == 4 * 3
    assert report.experts_per_layer == [2, 4, 6, 8]
    for name, layer in layers:
        idx = int(name.split("layers.")[1].split(".")[0])
        assert name.rsplit(".", 1)[-1] in {"q_proj", "v_proj", "down_proj"}
        assert layer.num_experts == [2, 4, 6, 8][idx]


def test_only_adapter_and_router_parameters_train(tiny_cfg):
    model, _, _ = build_mole_model(tiny_cfg())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".mole_experts." in n or ".mole_router." in n for n in trainable)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any("embed_tokens" in n for n in frozen) and any("base_layer" in n for n in frozen)


def test_thirty_layer_model_with_mola_groups(tiny_cfg):
    # the default model has 30 layers; built on the meta device, no weights
    model, _, report = build_mole_model(tiny_cfg("model.num_layers=30", "experts=mola_2468"), meta=True)
    assert report.experts_per_layer == [2] * 8 + [4] * 8 + [6] * 7 + [8] * 7
    rep = parameter_report(model, report)
    assert [layer["routers"] for layer in rep["layers"]] == [7] * 30


def test_lora_r8_on_qwen2_1_5b_is_060_percent():
    # HMoRA Table 3: LoRA r=8 on all seven linears of Qwen2-1.5B trains 0.60% of the parameters
    from mole.config import compose_config

    model, _, report = build_mole_model(compose_config(["model=qwen2_1_5b", "method=lora"]), meta=True)
    rep = parameter_report(model, report)
    per_layer = 8 * ((1536 + 1536) * 2 + (1536 + 256) * 2 + (1536 + 8960) * 3)  # q,o + k,v + gate,up,down
    assert rep["trainable"] == 28 * per_layer == 9_232_384
    assert round(rep["percent"], 2) == 0.60


def test_parameter_report_counts_zero3_partitioned_weights_at_their_full_size(tiny_cfg):
    """Under DeepSpeed ZeRO-3 transformers builds the base model partitioned: each weight is an empty
    placeholder whose real size is ``ds_numel``. The report must count that size (it divided by zero)."""
    import torch

    model, _, report = build_mole_model(tiny_cfg("experts=mola_2468"))
    whole = parameter_report(model, report)
    for p in model.parameters():
        if not p.requires_grad:  # the frozen base, as a ZeRO-3 process of several holds it
            p.ds_numel = p.numel()
            p.data = torch.empty(0, dtype=p.dtype)
    partitioned = parameter_report(model, report)
    assert partitioned["base"] == whole["base"] > 0
    assert (partitioned["total"], partitioned["percent"]) == (whole["total"], whole["percent"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["experts.targets=[q_proj,foo_proj]"], r"experts.targets: \['foo_proj'\] not found"),
        (["experts.targets=[]"], "experts.targets is empty"),
        (["experts=uniform_5", "router=topk", "router.top_k=6"], "router.top_k=6 exceeds the number of experts"),
        (["experts=mola_2468", "router=topk", "router.top_k=3"], r"router.top_k=3 exceeds the number of experts \(2\)"),
        (["adapter.rank=0"], "adapter.rank must be a positive integer"),
        (["experts=uniform_5", "router=none"], "router=none needs exactly 1 expert"),
        (["experts.per_layer=[2,2]", "experts.groups=null"], "experts.per_layer lists 2 layers but the model has 4"),
        (["+router.bogus=1"], "router: .*bogus"),
    ],
)
def test_bad_method_config_is_a_clear_error(tiny_cfg, overrides, message):
    with pytest.raises(MoleConfigError, match=message):
        build_mole_model(tiny_cfg(*overrides), meta=True)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral"])
def test_injection_into_each_supported_family(model_type):
    # tiny random models of each family, built from a config in-process
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from mole.adapters import LoRAExperts
    from mole.model.inject import inject_mole
    from mole.routers import TopKRouter

    cfg = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(cfg)
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    inject_mole(model, experts_per_layer=[2, 4], targets=targets,
                expert_factory=lambda in_features, out_features, num_experts, base_layer: LoRAExperts(
                    in_features, out_features, num_experts, rank=2),
                router_factory=lambda in_features, num_experts, **layer: TopKRouter(in_features, num_experts, top_k=2))
    assert len(mole_layers(model)) == 14
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
