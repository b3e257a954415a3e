"""Data: LLM-Adapters records, prompt masking, the validation split, and bad files."""

from __future__ import annotations

import json

import pytest

from mole.data import (
    IGNORE_INDEX,
    Collator,
    encode_records,
    fixture_path,
    format_prompt,
    load_datasets,
    read_records,
    split_validation,
)
from mole.data.collate import encode_record
from mole.model.tokenizer import byte_tokenizer
from mole.utils.errors import MoleConfigError


def test_shipped_fixtures_are_llm_adapters_records():
    for name, n in (("mc_train.json", 40), ("mc_test.json", 16), ("yesno_train.json", 40), ("yesno_test.json", 16)):
        recs = read_records(fixture_path(name))
        assert len(recs) == n
        assert all(r["output"] == f"the correct answer is {r['answer']}" for r in recs)


def test_prompt_tokens_are_masked_and_response_is_learned():
    tok = byte_tokenizer()
    rec = {"instruction": "Is ice cold?", "input": "", "output": "the correct answer is true", "answer": "true"}
    enc = encode_record(rec, tok, cutoff_len=512)
    prompt_len = len(tok(format_prompt("Is ice cold?"))["input_ids"])
    assert enc["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    learned = [t for t in enc["labels"] if t != IGNORE_INDEX]
    assert tok.decode(learned[:-1]) == "the correct answer is true" and learned[-1] == tok.eos_token_id
    assert enc["input_ids"][prompt_len:] == learned


def test_records_whose_response_is_cut_off_are_dropped():
    tok = byte_tokenizer()
    rec = {"instruction": "x " * 300, "input": "", "output": "y", "answer": ""}
    assert encode_records([rec], tok, cutoff_len=32, truncation="right") == []  # right truncation leaves no answer


def test_collator_pads_right_and_masks_padding():
    batch = Collator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_validation_split_is_fixed_by_seed_and_disjoint():
    recs = [{"instruction": str(i), "input": "", "output": "o", "answer": ""} for i in range(20)]
    a_train, a_val = split_validation(recs, 0.25, seed=3)
    b_train, b_val = split_validation(recs, 0.25, seed=3)
    assert a_val == b_val and len(a_val) == 5 and len(a_train) == 15
    assert not {r["instruction"] for r in a_val} & {r["instruction"] for r in a_train}
    assert split_validation(recs, 0.25, seed=4)[1] != a_val


def test_default_data_config_loads_the_fixtures(tiny_cfg):
    train, val = load_datasets(tiny_cfg().data, seed=0)
    assert len(train) + len(val) == 80 and len(val) == 12


def test_jsonl_files_are_read(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "input": "d", "output": "e"}\n')
    assert [r["input"] for r in read_records(path)] == ["", "d"]


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        ("", "is empty"),
        ("[]", "no records"),
        ("[{\"instruction\": \"a\",}]", "is not valid JSON"),
        ('{"instruction": "a"}', "holds a JSON dict, expected a list"),
        ('[{"instruction": "a", "input": ""}]', "record 1 lacks the text field 'output'"),
        ('[{"instruction": "a", "output": "b"}, 3]', "record 2 is a int"),
    ],
)
def test_bad_data_files_name_the_file_and_problem(tmp_path, content, message):
    path = tmp_path / "train.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(MoleConfigError, match=message) as err:
        read_records(path)
    assert str(path) in str(err.value) and "data.path" in str(err.value)


def test_no_data_source_is_an_error(tiny_cfg):
    with pytest.raises(MoleConfigError, match="no training data"):
        load_datasets(tiny_cfg("data.path=null").data, seed=0)


def test_hugging_face_datasets_path_maps_fields(tiny_cfg, tmp_path):
    # the `datasets` builder route, offline: hf_name=json with data_files, columns renamed by data.fields
    path = tmp_path / "qa.json"
    path.write_text(json.dumps([{"q": f"question {i}", "a": f"answer {i}"} for i in range(10)]))
    cfg = tiny_cfg("data.path=null", "data.hf_name=json", f"+data.hf_kwargs.data_files={path}",
                   "data.fields={instruction: q, output: a}", "data.val_size=2")
    train, val = load_datasets(cfg.data, seed=0)
    assert len(train) == 8 and len(val) == 2
    assert {r["instruction"] for r in train + val} == {f"question {i}" for i in range(10)}
    assert all(r["output"] == "answer " + r["instruction"].split()[-1] and r["input"] == "" for r in train)


def test_answer_must_be_one_of_the_answer_format_options(tmp_path):
    from mole.data.sources import answer_options

    assert answer_options("Q?\n\nAnswer format: answer1/answer2/answer3/answer4") == ["answer1", "answer2", "answer3", "answer4"]
    assert answer_options("Is it?\n\nAnswer format: True/False") == ["true", "false"]
    assert answer_options("Pick: solution1 / solution2\nAnswer format: solution1 / solution2") == ["solution1", "solution2"]
    assert answer_options("What is 12 * 3?") is None and answer_options("Answer format: number") is None
    ok = [
        {"instruction": "Is it?\n\nAnswer format: true/false", "output": "the correct answer is True", "answer": "True"},
        {"instruction": "What is 12 * 3?", "output": "36", "answer": "36"},  # no options: not checked
        {"instruction": "Is it?\n\nAnswer format: true/false", "output": "x"},  # no answer: not checked
    ]
    path = tmp_path / "ok.json"
    path.write_text(json.dumps(ok))
    assert [r["answer"] for r in read_records(path)] == ["True", "36", ""]
    path.write_text(json.dumps([*ok, {**ok[0], "answer": "maybe"}]))
    with pytest.raises(MoleConfigError, match=r"record 4 has answer 'maybe', which is not one of the options .*\['true', 'false'\]"):
        read_records(path)
