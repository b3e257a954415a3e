"""mole.eval.harness: offline lm-eval runs on an in-memory model (CPU, no downloads).

The model is a tiny random LlamaForCausalLM and the tokenizer a byte-level BPE with no merges
(one token per byte), both built in-process. The fixture data are small temporary copies in
the LLM-Adapters JSON format, so these tests do not depend on mole/data/fixtures.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
from torch import nn

pytest.importorskip("lm_eval")

from mole.data.prompts import format_prompt  # noqa: E402
from mole.eval.harness import (  # noqa: E402
    FIXTURES_PLACEHOLDER,
    RESULTS_FILENAME,
    SHIPPED_TASKS,
    TASK_TEMPLATES_DIR,
    evaluate_model,
    format_table,
    render_shipped_tasks,
)

MC_CHOICES = [f"the correct answer is answer{i}" for i in range(1, 5)]
YESNO_CHOICES = ["the correct answer is true", "the correct answer is false"]

# Gold labels are deliberately unbalanced, so that a model that always gives the same answer
# scores differently depending on which answer it was rigged to give.
MC_ANSWERS = ["answer2", "answer3", "answer2", "answer1", "answer2", "answer4"]
YESNO_ANSWERS = ["true", "false", "true", "true", "false", "true"]


# --------------------------------------------------------------------------- fixtures


def _mc_record(question: str, options: list[str], answer: str) -> dict:
    opts = " ".join(f"Answer{i}: {o}" for i, o in enumerate(options, 1))
    return {
        "instruction": (
            f"Please choose the correct answer to the question: {question}\n\n{opts}\n\n"
            "Answer format: answer1/answer2/answer3/answer4"
        ),
        "input": "",
        "output": f"the correct answer is {answer}",
        "answer": answer,
    }


def _yesno_record(question: str, answer: str) -> dict:
    return {
        "instruction": (
            "Please answer the following question with true or false, question: "
            f"{question}\n\nAnswer format: true/false"
        ),
        "input": "",
        "output": f"the correct answer is {answer}",
        "answer": answer,
    }


def _write_fixtures(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    mc_test = [
        _mc_record(f"Which thing number {i} is it?", ["cat", "dog", "cow", "hen"], a)
        for i, a in enumerate(MC_ANSWERS)
    ]
    mc_train = [_mc_record("Which is red?", ["sky", "blood", "grass", "snow"], "answer2")] * 2
    yesno_test = [_yesno_record(f"is fact {i} true?", a) for i, a in enumerate(YESNO_ANSWERS)]
    yesno_train = [_yesno_record("is ice cold?", "true"), _yesno_record("is fire cold?", "false")]
    for name, data in [
        ("mc_test.json", mc_test),
        ("mc_train.json", mc_train),
        ("yesno_test.json", yesno_test),
        ("yesno_train.json", yesno_train),
    ]:
        (root / name).write_text(json.dumps(data, indent=1))
    return root


@pytest.fixture(scope="module")
def fixtures_dir(tmp_path_factory) -> Path:
    return _write_fixtures(tmp_path_factory.mktemp("fixtures"))


def _make_tokenizer(pad: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 byte symbols
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    special = {"bos_token": "<s>", "eos_token": "</s>"}
    if pad:
        special["pad_token"] = "<pad>"
    # No post-processor: like SmolLM2's tokenizer it adds no BOS by itself.
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special)


@pytest.fixture(scope="module")
def tokenizer():
    return _make_tokenizer()


def _make_model(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=1024,
        tie_word_embeddings=True,  # as in SmolLM2
    )
    return LlamaForCausalLM(config)


class BiasedHead(nn.Module):
    """Stands in for mole's in-place Linear replacement: lm_head plus a fixed logit bias."""

    def __init__(self, base: nn.Linear, bias: torch.Tensor):
        super().__init__()
        self.base = base
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.bias


def _rig(model, tokenizer, favoured: str, strength: float = 30.0):
    """Make every token of the characters in ``favoured`` far likelier, everywhere."""
    bias = torch.zeros(model.config.vocab_size)
    for token_id in set(tokenizer(favoured, add_special_tokens=False)["input_ids"]):
        bias[token_id] = strength
    model.lm_head = BiasedHead(model.lm_head, bias)
    return model


# ----------------------------------------------------------- independent scoring


def _independent_scores(model, tokenizer, fixtures: Path, fixture: str, choices, answers):
    """acc / acc_norm from per-choice log-likelihoods computed directly with the model.

    lm-eval moves the context's trailing whitespace (the prompt's final "\\n") into the
    continuation (TemplateLM._encode_pair), so its log-likelihood of a choice also counts the
    "\\n" token. That term is the same for every choice (argmax / acc unaffected) but matters
    for acc_norm, which divides by len(choice); it is included here for the same reason.
    """
    records = json.loads((fixtures / fixture).read_text())
    acc, acc_norm = [], []
    model.eval()
    with torch.no_grad():
        for record in records:
            prompt = format_prompt(record["instruction"], record["input"])
            assert prompt.endswith("\n")
            n_prompt = len(tokenizer(prompt)["input_ids"])
            lls = []
            for choice in choices:
                ids = tokenizer(prompt + choice)["input_ids"]
                logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
                positions = range(n_prompt - 1, len(ids))  # the prompt's "\n" + the choice
                lls.append(sum(logprobs[i - 1, ids[i]].item() for i in positions))
            gold = [c.rsplit(" ", 1)[-1] for c in choices].index(record["answer"])
            scores = torch.tensor(lls, dtype=torch.float64)
            norm = scores / torch.tensor([float(len(c)) for c in choices], dtype=torch.float64)
            acc.append(float(scores.argmax() == gold))
            acc_norm.append(float(norm.argmax() == gold))
    assert [r["answer"] for r in records] == list(answers)
    return sum(acc) / len(acc), sum(acc_norm) / len(acc_norm)


# ------------------------------------------------------------------------ tests


def test_render_substitutes_absolute_fixtures_path(tmp_path, fixtures_dir):
    out = render_shipped_tasks(tmp_path / "tasks", fixtures_dir)
    names = {p.name for p in out.glob("*.yaml")}
    assert names == {p.name for p in TASK_TEMPLATES_DIR.glob("*.yaml")}
    for name in SHIPPED_TASKS:
        text = (out / f"{name}.yaml").read_text()
        assert FIXTURES_PLACEHOLDER not in text
        assert f'"{fixtures_dir.resolve().as_posix()}/' in text
    with pytest.raises(FileNotFoundError, match="mc_test.json"):
        render_shipped_tasks(tmp_path / "none", tmp_path / "empty")


def test_shipped_prompt_is_the_training_prompt(tmp_path, fixtures_dir):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(
        include_path=str(render_shipped_tasks(tmp_path / "t", fixtures_dir)),
        include_defaults=False,
    )
    tasks = manager.load(list(SHIPPED_TASKS))["tasks"]
    for name, choices in [("mole_mc", MC_CHOICES), ("mole_yesno", YESNO_CHOICES)]:
        task = tasks[name]
        doc = next(iter(task.test_docs()))
        for extra_input in ["", "some context"]:
            d = {**doc, "input": extra_input}
            assert task.doc_to_text(d) == format_prompt(d["instruction"], d["input"])
        assert task.doc_to_choice(doc) == choices
        assert choices[task.doc_to_target(doc)] == doc["output"]


def test_shipped_tasks_end_to_end(tmp_path, tokenizer, fixtures_dir):
    model = _make_model(len(tokenizer))
    model.train()
    model.model.layers[0].eval()  # a partly-frozen model must come back exactly as it was
    modes = {name: m.training for name, m in model.named_modules()}
    params = {name: p.clone() for name, p in model.state_dict().items()}
    random.seed(7)
    torch.manual_seed(7)
    expected_next = (random.random(), torch.rand(3))
    random.seed(7)
    torch.manual_seed(7)

    results = evaluate_model(
        model,
        tokenizer,
        ["mole_mc", "mole_yesno"],
        output_dir=tmp_path / "eval",
        fixtures_dir=fixtures_dir,
        batch_size=4,
    )

    on_disk = json.loads((tmp_path / "eval" / RESULTS_FILENAME).read_text())
    assert on_disk == results
    for task in SHIPPED_TASKS:
        metrics = results["results"][task]
        for key in ("acc,none", "acc_norm,none"):
            assert 0.0 <= metrics[key] <= 1.0
        assert results["n-samples"][task] == {"original": 6, "effective": 6}
        assert results["n-shot"][task] == 0
    table = format_table(results)
    assert "mole_mc" in table and "acc_norm" in table
    # The model is unchanged: modes, weights, device, dtype; the global RNGs were not reseeded.
    assert {name: m.training for name, m in model.named_modules()} == modes
    state = model.state_dict()
    assert state.keys() == params.keys()
    assert all(torch.equal(state[k], v) for k, v in params.items())
    assert random.random() == expected_next[0]
    assert torch.equal(torch.rand(3), expected_next[1])


def test_group_limit_and_fewshot(tmp_path, tokenizer, fixtures_dir):
    results = evaluate_model(
        _make_model(len(tokenizer)),
        tokenizer,
        ["mole_fixtures"],
        output_dir=tmp_path,
        fixtures_dir=fixtures_dir,
        limit=3,
        num_fewshot=1,
    )
    assert 0.0 <= results["groups"]["mole_fixtures"]["acc,none"] <= 1.0
    for task in SHIPPED_TASKS:
        assert results["n-samples"][task] == {"original": 6, "effective": 3}
        assert results["n-shot"][task] == 1
    assert "Groups" in format_table(results)


def test_user_include_path_task(tmp_path, fixtures_dir):
    user_dir = tmp_path / "my_tasks"
    user_dir.mkdir()
    data = json.dumps(str((fixtures_dir / "yesno_test.json").resolve()))
    (user_dir / "my_boolq.yaml").write_text(
        "task: my_boolq\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: multiple_choice\n"
        "test_split: test\n"
        'doc_to_text: "Question: {{instruction}}\\nAnswer:"\n'
        'doc_to_choice: ["yes", "no"]\n'
        "doc_to_target: \"{{ 0 if answer == 'true' else 1 }}\"\n"
        "metric_list:\n  - metric: acc\n"
    )
    tokenizer = _make_tokenizer(pad=False)  # HFLM gives it a pad token; it must be undone

    results = evaluate_model(
        _make_model(len(tokenizer)),
        tokenizer,
        ["my_boolq"],
        output_dir=tmp_path / "eval",
        include_path=user_dir,
        fixtures_dir=fixtures_dir,
    )

    assert 0.0 <= results["results"]["my_boolq"]["acc,none"] <= 1.0
    assert results["n-samples"]["my_boolq"] == {"original": 6, "effective": 6}
    assert tokenizer.pad_token is None


@pytest.mark.parametrize(
    ("favoured", "mc_acc", "yesno_acc"),
    [
        (None, None, None),  # unrigged: whatever the random model scores
        ("2" + "true", 3 / 6, 4 / 6),  # always "answer2" / "true"
        ("3" + "false", 1 / 6, 2 / 6),  # always "answer3" / "false"
    ],
)
def test_accuracy_matches_independent_loglikelihoods(
    tmp_path, tokenizer, fixtures_dir, favoured, mc_acc, yesno_acc
):
    model = _make_model(len(tokenizer), seed=1)
    if favoured is not None:
        _rig(model, tokenizer, favoured)
    keys_before = set(model.state_dict())

    results = evaluate_model(
        model,
        tokenizer,
        list(SHIPPED_TASKS),
        output_dir=tmp_path,
        fixtures_dir=fixtures_dir,
        batch_size=3,
    )["results"]

    # lm-eval's scores agree with per-choice log-likelihoods computed here, directly.
    for task, fixture, choices, answers in [
        ("mole_mc", "mc_test.json", MC_CHOICES, MC_ANSWERS),
        ("mole_yesno", "yesno_test.json", YESNO_CHOICES, YESNO_ANSWERS),
    ]:
        acc, acc_norm = _independent_scores(
            model, tokenizer, fixtures_dir, fixture, choices, answers
        )
        assert results[task]["acc,none"] == pytest.approx(acc)
        assert results[task]["acc_norm,none"] == pytest.approx(acc_norm)
    if favoured is not None:
        # ... and the rigged model scores what its rigging dictates.
        assert results["mole_mc"]["acc,none"] == pytest.approx(mc_acc)
        assert results["mole_yesno"]["acc,none"] == pytest.approx(yesno_acc)
    # lm-eval's HFLM calls model.tie_weights(); on the wrapped (tied) lm_head that would add
    # a stray "lm_head.weight" parameter. The harness suppresses the call.
    assert set(model.state_dict()) == keys_before
