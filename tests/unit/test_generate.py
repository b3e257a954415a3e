"""mole-generate: cached generation equals uncached decoding for every preset; the command's prompt,
file and chat modes; its one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_tiny

from mole.build import build_mole_model
from mole.cli.generate import main, split_args
from mole.config import CONF_DIR
from mole.generate import GenerationSettings, generate_texts, generation_config, load_run
from mole.recipes.train import run_train
from mole.routers.context import routing_inputs

PRESETS = sorted(p.stem for p in (Path(CONF_DIR) / "method").glob("*.yaml"))
CASES = [*[(m, ()) for m in PRESETS], ("moa_soft", ("experts.level=instance",))]
PROMPTS = ["Hello there, how", "Question: which is a planet? Answer:"]  # different lengths: left padding
NEW_TOKENS = 4


def _perturbed_model(method: str, extra: tuple[str, ...]):
    """The preset on tiny_llama in float64 with every trainable weight moved off its initialisation
    (zero LoRA B, zero prompt gates would make the adapters invisible)."""
    model, tokenizer, _ = build_mole_model(compose_tiny([f"method={method}", *extra]))
    model.eval().double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.2)
    return model, tokenizer


def _uncached_greedy(model, ids, mask, steps: int):
    """Greedy decoding by full forwards over the whole sequence (no cache); the prompt mask marks the
    prompt, so per-sequence routing reads the same tokens as in a cached generation."""
    prompt_len = ids.shape[1]
    logits = []
    for _ in range(steps):
        pos = (mask.cumsum(-1) - 1).clamp_min(0)  # what generate derives from a left-padded mask
        prompt = torch.zeros_like(mask, dtype=torch.bool)
        prompt[:, :prompt_len] = True
        with routing_inputs(model, prompt):
            last = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, -1]
        logits.append(last)
        nxt = last.argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids, logits


@pytest.mark.parametrize(("method", "extra"), CASES, ids=[m + "".join(f"[{e}]" for e in x) for m, x in CASES])
def test_cached_generation_equals_uncached_greedy_decoding(method, extra):
    model, tokenizer = _perturbed_model(method, extra)
    tokenizer.padding_side = "left"
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    config = generation_config(tokenizer, GenerationSettings(max_new_tokens=NEW_TOKENS))
    config.eos_token_id = None  # always NEW_TOKENS steps
    config.output_logits = config.return_dict_in_generate = True
    with torch.no_grad():
        out = model.generate(**enc, generation_config=config)
        ref_ids, ref_logits = _uncached_greedy(model, enc["input_ids"], enc["attention_mask"], NEW_TOKENS)
    assert torch.equal(out.sequences, ref_ids)
    for step, (cached, full) in enumerate(zip(out.logits, ref_logits, strict=True)):
        # float64 weights; routers compute their softmax in float32, so agreement is to ~1e-7
        torch.testing.assert_close(cached.double(), full, atol=1e-6, rtol=0, msg=lambda m, s=step: f"step {s}: {m}")


# ---- the command ----


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gen_run")
    run_train(compose_tiny(["method=hmora", "trainer.max_steps=1", "data.max_records=8"]), path)
    return path


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_prompt_arguments_are_verbatim_and_repeatable():
    overrides, prompts, run = split_args(["runs/x", "prompt=a, b: [c]", "max_new_tokens=3", "prompt=d=e"])
    assert (overrides, prompts, run) == (["max_new_tokens=3"], ["a, b: [c]", "d=e"], "runs/x")


def test_prompts_file_and_command_line_give_the_same_greedy_completions(run_dir, tmp_path, capsys):
    records = [{"instruction": "Which is a planet?", "input": "", "output": "Mars"},
               {"instruction": "Name a colour, please", "input": "the sky"},
               {"prompt": "raw text without a template"}]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out.jsonl"
    main([str(run_dir), f"input={src}", f"output={out}", "max_new_tokens=5", "batch_size=2"])
    rows = _lines(out)
    assert [r.get("instruction", r.get("prompt")) for r in rows][:2] == ["Which is a planet?", "Name a colour, please"]
    assert rows[0]["output"] == "Mars"  # the record's own fields are kept
    assert rows[0]["prompt"].startswith("Below is an instruction") and "### Input:\nthe sky" in rows[1]["prompt"]
    assert rows[2]["prompt"] == "raw text without a template"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]
    # one prompt at a time (no padding) gives what the left-padded batch gave
    model, tokenizer, _ = load_run(run_dir, "cpu")
    alone = [generate_texts(model, tokenizer, [r["prompt"]], GenerationSettings(max_new_tokens=5))[0] for r in rows]
    assert alone == [r["generation"] for r in rows]
    assert any(a for a in alone)  # something was generated
    capsys.readouterr()
    main([str(run_dir), "prompt=Which is a planet?", "max_new_tokens=5"])
    assert capsys.readouterr().out == rows[0]["generation"] + "\n"


def test_stop_strings_and_seeded_sampling(run_dir, capsys):
    model, tokenizer, _ = load_run(run_dir, "cpu")
    greedy = generate_texts(model, tokenizer, ["hello"], GenerationSettings(max_new_tokens=12))[0]
    assert len(greedy) > 2
    stop = greedy[2:4]
    cut = generate_texts(model, tokenizer, ["hello"], GenerationSettings(max_new_tokens=12, stop=[stop]))[0]
    assert cut == greedy[: greedy.find(stop)]
    sampled = [generate_texts(model, tokenizer, ["hello"] * 3, GenerationSettings(
        max_new_tokens=8, sample=True, temperature=1.5, top_k=50, seed=s)) for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]


def test_chat_answers_each_line(run_dir, monkeypatch, capsys):
    model, tokenizer, _ = load_run(run_dir, "cpu")
    expected = generate_texts(model, tokenizer, [
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nhi there\n\n### Response:\n"], GenerationSettings(max_new_tokens=4))[0]
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("hi there\n\n/quit\nnot read\n"))
    main([str(run_dir), "chat=true", "max_new_tokens=4"])
    assert capsys.readouterr().out == expected + "\n"


BAD = [
    (["{run}"], "give exactly one of prompt=TEXT"),
    (["{run}", "prompt=a", "chat=true"], "prompt and chat=true"),
    (["{tmp}/nowhere", "prompt=a"], "nowhere"),
    (["{run}", "input={tmp}/missing.jsonl", "output={tmp}/o.jsonl"], "input: "),
    (["{run}", "input={tmp}/bad.jsonl", "output={tmp}/o.jsonl"], "bad.jsonl is not valid JSON"),
    (["{run}", "input={tmp}/norec.json", "output={tmp}/o.jsonl"], "record 0 has no text field"),
    (["{run}", "input={tmp}/bad.jsonl"], "needs output=FILE.jsonl"),
    (["{run}", "prompt=a", "output={tmp}/o.txt"], "must be a .jsonl file"),
    (["{run}", "prompt=a", "output={tmp}/no/o.jsonl"], "does not exist"),
    (["{run}", "prompt=a", "temperature=0.5"], "temperature: used only when sampling"),
    (["{run}", "prompt=a", "sample=true", "top_p=2"], "top_p must be"),
    (["{run}", "prompt=a", "max_new_tokens=0"], "max_new_tokens must be a positive integer"),
    (["{run}", "prompt=a", "template=chatml"], "template must be one of"),
    (["{run}", "prompt=a", "nope=1"], "nope"),
]


@pytest.mark.parametrize(("args", "names"), BAD, ids=[b[1][:30] for b in BAD])
def test_bad_input_is_one_line(args, names, run_dir, tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{oops\n')
    (tmp_path / "norec.json").write_text('[{"text": "a"}]')
    before = sorted(p.name for p in tmp_path.iterdir())
    run_files = sorted(p.name for p in run_dir.iterdir())
    with pytest.raises(SystemExit) as exit_info:
        main([a.format(run=run_dir, tmp=tmp_path) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert len(err) == 1 and err[0].startswith("mole-generate: error: ") and names in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    assert sorted(p.name for p in run_dir.iterdir()) == run_files


@pytest.mark.slow
def test_the_installed_command(run_dir, tmp_path):
    done = subprocess.run([sys.executable, "-m", "mole.cli.generate", str(run_dir), "prompt=Which is a planet?",
                           "max_new_tokens=5"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    model, tokenizer, _ = load_run(run_dir, "cpu")
    from mole.generate import render

    expected = generate_texts(model, tokenizer, [render("Which is a planet?")], GenerationSettings(max_new_tokens=5))[0]
    assert done.stdout == expected + "\n"
    bad = subprocess.run([sys.executable, "-m", "mole.cli.generate", str(tmp_path / "none"), "prompt=a"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "mole-generate: error:" in bad.stderr
