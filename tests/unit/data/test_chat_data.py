"""``messages`` datasets and the ``chat`` template: assistant turns learned, prompts masked exactly, the same
prompts in training and evaluation."""

from __future__ import annotations

import json
import re

import pytest

from mole.data import IGNORE_INDEX, load_datasets
from mole.data.collate import encode_example, encode_records
from mole.data.prompts import record_prompt
from mole.data.sources import fixture_path, read_message_records, read_records
from mole.model.tokenizer import byte_tokenizer
from mole.utils.errors import MoleConfigError


def _learned_runs(enc: dict) -> list[list[int]]:
    """The maximal runs of token ids whose label is not masked."""
    runs, cur = [], []
    for tok, lab in zip(enc["input_ids"], enc["labels"], strict=True):
        if lab != IGNORE_INDEX:
            assert lab == tok  # a learned label is the token itself (the model shifts)
            cur.append(tok)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def _check_mask_is_the_assistant_spans(tok, messages):
    enc = encode_example({"messages": messages}, tok, 10_000, "chat")[0]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    # every token is the template's rendering (up to the end of the last assistant turn) ...
    assert tok.decode(enc["input_ids"]) == tok.apply_chat_template(messages[: last + 1], tokenize=False).rstrip()
    # ... and the learned tokens are exactly each assistant turn's content and the template's end-of-turn token
    spans = [m["content"] + tok.eos_token for m in messages if m["role"] == "assistant"]
    assert all(span in rendered for span in spans)
    assert [tok.decode(run) for run in _learned_runs(enc)] == spans


def test_mask_is_every_assistant_turn_of_the_rendered_chat():
    tok = byte_tokenizer()
    records = read_message_records(fixture_path("chat_train.json"))
    assert sum(sum(m["role"] == "assistant" for m in r["messages"]) > 1 for r in records) >= 2  # multi-turn ones
    for rec in records:
        _check_mask_is_the_assistant_spans(tok, rec["messages"])


@pytest.mark.slow
def test_mask_is_every_assistant_turn_with_smollm2s_own_template():
    from mole.config import compose_config
    from mole.model.base import build_model

    _, tok = build_model(compose_config(["model=smollm2_135m"]).model)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    for rec in read_message_records(fixture_path("chat_train.json")):
        _check_mask_is_the_assistant_spans(tok, rec["messages"])


def test_llm_adapters_record_under_chat_is_one_user_and_one_assistant_turn():
    tok = byte_tokenizer()
    rec = {"instruction": "Is it so?", "input": "context", "output": "the correct answer is true", "answer": "true"}
    enc = encode_example(rec, tok, 10_000, "chat")[0]
    n_prompt = enc["labels"].index(next(lab for lab in enc["labels"] if lab != IGNORE_INDEX))
    assert tok.decode(enc["input_ids"][:n_prompt]) == record_prompt(rec, "chat", tok)
    assert record_prompt(rec, "chat", tok) == "<|bos|>user\nIs it so?\n\ncontext<|eos|>\n<|bos|>assistant\n"
    assert [tok.decode(r) for r in _learned_runs(enc)] == ["the correct answer is true<|eos|>"]


def test_chat_needs_a_tokenizer_with_a_chat_template():
    tok = byte_tokenizer()
    tok.chat_template = None
    with pytest.raises(MoleConfigError, match="data.template=chat: the model's tokenizer has no chat template"):
        encode_records([{"instruction": "a", "input": "", "output": "b"}], tok, 64, "chat")


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}, "record 1, message 2 has role 'bot'"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}, "record 1 has no assistant turn"),
    ({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]}, "message 1 (user) has empty"),
    ({"messages": []}, "record 1 has no 'messages' list"),
    ({"messages": [{"role": "user", "content": ["q"]}, {"role": "assistant", "content": "a"}]}, "non-text content"),
])
def test_bad_chat_records_are_one_line_naming_file_and_record(tmp_path, record, message):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(MoleConfigError, match=re.escape(message)) as err:
        read_message_records(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_bare_message_lists_and_hugging_face_messages_column(tiny_cfg, tmp_path):
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    path = tmp_path / "bare.json"
    path.write_text(json.dumps([chat, chat]))
    assert read_message_records(path) == [{"messages": chat}] * 2
    # a Hugging Face dataset with a `messages` column, offline through the `json` builder
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"messages": chat, "id": i}) + "\n" for i in range(6)))
    cfg = tiny_cfg("data=chat", "data.path=null", "data.hf_name=json", f"+data.hf_kwargs.data_files={rows}")
    train, val = load_datasets(cfg.data, seed=0)
    assert train + val == [{"messages": chat}] * 6 and len(val) == 2


def test_chat_data_config_loads_the_shipped_chats(tiny_cfg):
    train, val = load_datasets(tiny_cfg("data=chat").data, seed=0)
    assert len(train) + len(val) == 8 and all("messages" in r for r in train + val)
    with pytest.raises(MoleConfigError, match="data.format must be one of"):
        load_datasets(tiny_cfg("data.format=sharegpt").data, seed=0)


@pytest.mark.parametrize("template", ["alpaca", "plain", "chat"])
def test_training_and_evaluation_prompts_are_identical(tmp_path, template):
    """The prompt tokens of a training example are the context tokens lm-eval scores, for the shipped tasks
    and the rendered benchmarks (here BoolQ on its shipped fixture)."""
    from lm_eval.tasks import TaskManager, get_task_dict

    from mole.eval.benchmarks import EvalSettings, render_benchmarks
    from mole.eval.harness import render_shipped_tasks
    from mole.recipes.evaluate import eval_prompt

    tok = byte_tokenizer()
    prompt = eval_prompt(tok, template)
    assert (prompt is None) == (template == "alpaca")
    shipped = render_shipped_tasks(tmp_path / "shipped", prompt=prompt)
    bench = render_benchmarks(["boolq"], EvalSettings(smoke=True), tmp_path / "bench", prompt)
    manager = TaskManager(include_path=[str(shipped), str(bench)], include_defaults=False)
    tasks = get_task_dict(["mole_yesno", "boolq"], manager)
    for name, fixture in (("mole_yesno", "yesno_test.json"), ("boolq", "yesno_test.json")):
        task = tasks[name]
        docs = list(task.test_docs())
        records = read_records(fixture_path(fixture))
        assert len(docs) == len(records)
        for doc, rec in zip(docs, records, strict=True):
            enc = encode_example(rec, tok, 10_000, template)[0]
            n_prompt = sum(lab == IGNORE_INDEX for lab in enc["labels"][: enc["labels"].index(
                next(lab for lab in enc["labels"] if lab != IGNORE_INDEX))])
            context = task.doc_to_text(doc)
            assert tok(context, add_special_tokens=False)["input_ids"] == enc["input_ids"][:n_prompt], (name, template)
            # and the scored choices are the response the model was trained on
            gold = task.doc_to_choice(doc)[task.doc_to_target(doc)]
            assert rec["output"].lower() == gold


def test_chat_run_trains_and_evaluates_with_its_template(tiny_cfg, tmp_path):
    from mole.recipes.train import run_train

    metrics = run_train(tiny_cfg("data=chat", "eval=fixtures", "eval.tasks=[mole_yesno]", "eval.limit=2",
                                 "trainer.max_steps=2"), tmp_path)
    assert metrics["finished"] and metrics["steps"] == 2
    assert 0.0 <= metrics["eval"]["mole_yesno"]["acc,none"] <= 1.0
    docs = json.loads((tmp_path / "eval" / "lm_eval_tasks" / "data" / "yesno_test.json").read_text())
    tok = byte_tokenizer()
    assert docs[0]["prompt"] == record_prompt(docs[0], "chat", tok) and docs[0]["prompt"].startswith("<|bos|>user\n")
