"""mole-export: each format loaded by the client it is for gives the logits of the mole run; a run that
cannot take a format is one error line naming those it can take."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_tiny
from omegaconf import OmegaConf

from mole.build import build_mole_model
from mole.cli.export import main
from mole.config import CONF_DIR
from mole.export import export_run, logit_difference, run_shape
from mole.generate import load_run
from mole.model.base import build_model
from mole.model.state import ADAPTER_FILE, save_adapter
from mole.run_dir import CONFIG_FILE

PRESETS = sorted(p.stem for p in (Path(CONF_DIR) / "method").glob("*.yaml"))
TOL = 1e-5  # float32 logits of magnitude ~1


def make_run(root: Path, method: str, *extra: str) -> Path:
    """A run directory (config.yaml + adapter.safetensors) of ``method`` on tiny_llama whose trainable
    weights are moved off their initialisation (a fresh LoRA B of zeros would hide a wrong export)."""
    cfg = compose_tiny([f"method={method}", *extra])
    model, _, _ = build_mole_model(cfg)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    run = root / "-".join([method, *extra]).replace("=", "_")
    run.mkdir()
    (run / CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg, resolve=True))
    save_adapter(model, run / ADAPTER_FILE)
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_runs")
    cache: dict[str, Path] = {}

    def get(method: str) -> Path:
        if method not in cache:
            cache[method] = make_run(root, method)
        return cache[method]

    return get


def check_export(run: Path, fmt: str, out: Path) -> float:
    """Export, load with the client, and return the largest logit difference to mole's."""
    model, tokenizer, cfg = load_run(run, "cpu")
    base, _ = build_model(cfg.model, seed=cfg.seed)
    assert logit_difference(model, base, tokenizer) > 1e-2  # the adapters change the output: the check can fail
    run_files = sorted(p.name for p in run.iterdir())
    if fmt == "mixlora":
        pytest.importorskip("mixlora")
    _, diff = export_run(run, fmt, out, check=True, trust_remote_code=fmt == "hf")
    assert sorted(p.name for p in run.iterdir()) == run_files  # nothing written into the run
    assert not list(out.parent.glob(".*.tmp"))
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in out.iterdir())  # safetensors only
    assert diff < TOL, f"{fmt}: max logit difference {diff:.2e}"
    return diff


@pytest.mark.parametrize(("method", "fmt"), [("lora", "peft"), ("dora", "peft"),
                                             ("dora", "merged"), ("full_ft", "merged"), ("mixlora", "mixlora"),
                                             ("hmora_lw", "hf"), ("moa_soft", "hf"), ("prompt_tuning", "hf")])
def test_export_loads_in_its_client_with_mole_logits(method, fmt, runs, tmp_path):
    check_export(runs(method), fmt, tmp_path / "out")


def test_peft_and_merged_files(runs, tmp_path):
    from transformers import AutoTokenizer

    export_run(runs("dora"), "peft", tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["use_dora"] and config["r"] == 80 and config["lora_alpha"] == 160  # conf/method/dora.yaml
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "up_proj"]
    export_run(runs("lora"), "merged", tmp_path / "merged")
    _, tokenizer, _ = load_run(runs("lora"), "cpu")
    text = "Below is an instruction: name a planet."
    assert AutoTokenizer.from_pretrained(tmp_path / "merged")(text).input_ids == tokenizer(text).input_ids
    weights = {p.name for p in (tmp_path / "merged").iterdir()}
    assert "model.safetensors" in weights and "modeling_mole.py" not in weights


def test_hf_export_generates_like_the_run(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    from mole.generate import GenerationSettings, generate_texts

    run = runs("hmora_lw")
    export_run(run, "hf", tmp_path / "hf")
    model, tokenizer, _ = load_run(run, "cpu")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    prompts, settings = ["Name a planet.", "What is 2 + 3? Answer briefly"], GenerationSettings(max_new_tokens=6)
    assert generate_texts(loaded, tokenizer, prompts, settings) == generate_texts(model, tokenizer, prompts, settings)


def test_the_command_checks_its_export(runs, tmp_path, capsys):
    main([str(runs("lora")), "format=peft", f"out={tmp_path / 'peft'}", "check=true"])
    line = capsys.readouterr().out.strip()
    assert line.startswith("mole-export: largest logit difference to the run, loaded by peft.PeftModel")
    assert float(line.rsplit(" ", 1)[1]) < TOL
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_formats_follow_the_run():
    shapes = {m: run_shape(build_mole_model(compose_tiny([f"method={m}"]), meta=True)[0]).formats
              for m in ("dora", "full_ft", "mixlora", "llama_adapter")}
    assert shapes == {"dora": ["peft", "merged", "hf"], "full_ft": ["merged", "hf"],
                      "mixlora": ["mixlora", "hf"], "llama_adapter": ["hf"]}


@pytest.mark.parametrize(("method", "args", "names"), [
    ("mola", ("format=peft",), "format=peft: run method=mola cannot be exported as peft"),
    ("lora", ("format=mixlora",), "it exports to peft, merged, hf"),
    ("full_ft", ("format=peft",), "it exports to merged, hf"),
    ("lora", ("format=onnx",), "format must be one of"),
    ("lora", ("format=hf", "out={tmp}/exists"), "already exists"),
    ("lora", ("format=hf", "out={tmp}/no/such"), "does not exist"),
    ("lora", ("format=hf",), "out is required"),
    (None, ("format=hf",), "not a directory"),
])
def test_bad_export_is_one_line(method, args, names, runs, tmp_path, capsys):
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "keep.txt").write_text("mine")
    run = runs(method) if method else tmp_path / "nowhere"
    argv = [str(run), *(a.format(tmp=tmp_path) for a in args)]
    if not any(a.startswith("out=") for a in args) and names != "out is required":
        argv.append(f"out={tmp_path}/out")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert len(err) == 1 and err[0].startswith("mole-export: error: ") and names in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "exists" / "keep.txt").read_text() == "mine"


# ---- slow: every preset in every format it takes; lm-eval on an hf export ----


@pytest.mark.slow
@pytest.mark.parametrize("method", PRESETS)
def test_every_preset_exports_to_each_of_its_formats(method, tmp_path):
    run = make_run(tmp_path, method)
    model, _, _ = load_run(run, "cpu")
    formats = run_shape(model).formats
    assert "hf" in formats
    for fmt in formats:
        check_export(run, fmt, tmp_path / f"out_{fmt}")


@pytest.mark.slow
def test_lm_eval_on_an_hf_export_gives_mole_eval_accuracy(tmp_path):
    from mole.eval.harness import render_shipped_tasks
    from mole.recipes.evaluate import run_eval

    run = make_run(tmp_path, "hmora_lw", "eval=fixtures")
    mole_acc = run_eval(run, {"tasks": ["mole_mc"], "benchmarks": []})["results"]["mole_mc"]["acc,none"]
    export_run(run, "hf", tmp_path / "hf")
    tasks = render_shipped_tasks(tmp_path / "tasks")
    done = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={tmp_path / 'hf'},trust_remote_code=True",
         "--tasks", "mole_mc", "--include_path", str(tasks), "--output_path", str(tmp_path / "lm_eval"), "--batch_size", "4"],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(next((tmp_path / "lm_eval").rglob("results_*.json")).read_text())
    assert result["results"]["mole_mc"]["acc,none"] == mole_acc
