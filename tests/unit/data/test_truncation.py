"""data.cutoff_len: over-long examples are cut (prompt from the left by default), never silently; the counts
reach metrics.json, and a split with nothing left is an error naming the file and the cutoff."""

from __future__ import annotations

import json
import logging

import pytest
from omegaconf import OmegaConf

from mole.config import compose_config
from mole.data import IGNORE_INDEX, encode_datasets, encode_split, format_prompt
from mole.data.collate import encode_record
from mole.data.truncation import DROPPED, FIT, TRUNCATED, TruncationStats, truncate
from mole.model.tokenizer import byte_tokenizer
from mole.utils.errors import MoleConfigError

M = IGNORE_INDEX


# ---- the one function every format's (input_ids, labels) goes through ----


def test_an_example_within_the_cutoff_is_unchanged():
    ids, labels = [1, 2, 3, 4], [M, M, 3, 4]
    assert truncate(ids, labels, 4) == (ids, labels, FIT)


def test_prompt_left_cuts_the_prompt_after_the_kept_tokens_and_keeps_every_answer_token():
    ids, labels = [0, 11, 12, 13, 14, 5, 6], [M, M, M, M, M, 5, 6]
    out_ids, out_labels, status = truncate(ids, labels, 5, "prompt_left", keep=1)
    assert status == TRUNCATED
    assert out_ids == [0, 13, 14, 5, 6]  # BOS kept, the prompt's first two tokens cut
    assert out_labels == [M, M, M, 5, 6]


def test_prompt_left_drops_an_example_whose_answer_is_longer_than_the_cutoff():
    ids, labels = [0, 11, 5, 6, 7, 8], [M, M, 5, 6, 7, 8]
    assert truncate(ids, labels, 4, "prompt_left", keep=1) == (None, None, DROPPED)
    assert truncate(ids, labels, 4, "prompt_left", keep=0)[2] == TRUNCATED  # without a kept BOS it fits exactly


def test_prompt_left_never_cuts_a_learned_token_of_a_multi_turn_example():
    ids, labels = [1, 2, 3, 4, 5, 6], [M, 2, M, M, 5, 6]  # an earlier answer (2) sits in the part to cut
    assert truncate(ids, labels, 5, "prompt_left")[2] == TRUNCATED  # cutting token 1 only
    assert truncate(ids, labels, 4, "prompt_left") == (None, None, DROPPED)


def test_right_cuts_the_end_as_llm_adapters_does():
    ids, labels = [1, 2, 3, 4, 5], [M, M, 3, 4, 5]
    assert truncate(ids, labels, 4, "right") == ([1, 2, 3, 4], [M, M, 3, 4], TRUNCATED)
    assert truncate(ids, labels, 2, "right") == (None, None, DROPPED)  # no answer token left


def test_drop_drops_every_example_over_the_cutoff():
    ids, labels = [1, 2, 3], [M, 2, 3]
    assert truncate(ids, labels, 2, "drop") == (None, None, DROPPED)
    assert truncate(ids, labels, 3, "drop")[2] == FIT


def test_unknown_mode_is_a_config_error():
    with pytest.raises(MoleConfigError, match="data.truncation must be one of"):
        truncate([1, 2, 3], [M, 2, 3], 2, "left")


# ---- records through a tokenizer ----


def _rec(instruction: str, output: str) -> dict[str, str]:
    return {"instruction": instruction, "input": "", "output": output, "answer": ""}


def test_a_long_prompt_keeps_its_whole_answer_by_default():
    tok = byte_tokenizer()
    rec = _rec("x " * 300, "the correct answer is true")
    enc = encode_record(rec, tok, cutoff_len=64)
    assert len(enc["input_ids"]) == 64
    learned = [t for t in enc["labels"] if t != IGNORE_INDEX]
    assert tok.decode(learned[:-1]) == "the correct answer is true" and learned[-1] == tok.eos_token_id
    right = encode_record(rec, tok, cutoff_len=64, truncation="right")
    assert right is None  # right truncation leaves only prompt tokens: nothing to learn


def test_split_counts_truncated_dropped_and_empty_outputs():
    tok = byte_tokenizer()
    records = [_rec("short", "yes"), _rec("x " * 100, "yes"), _rec("q", "y" * 100), _rec("q", "")]
    kept, stats = encode_split(records, tok, cutoff_len=80)
    assert stats == TruncationStats(records=4, kept=3, truncated=1, dropped=1, empty_output=1)
    assert len(kept) == 3 and all(len(e["input_ids"]) <= 80 for e in kept)
    _, dropped = encode_split(records, tok, cutoff_len=80, truncation="drop")
    assert (dropped.kept, dropped.dropped, dropped.truncated) == (2, 2, 0)


@pytest.mark.slow
def test_answers_survive_with_the_real_tokenizer():
    from mole.model.base import build_model
    from mole.model.gguf_file import resolve
    from mole.utils.errors import MoleConfigError

    pytest.importorskip("gguf", reason="the gguf package is needed to read the SmolLM2 GGUF file")
    model_cfg = compose_config(["model=smollm2_135m"]).model
    try:
        resolve(model_cfg.gguf)
    except MoleConfigError as exc:
        pytest.skip(str(exc))
    _, tok = build_model(model_cfg)
    rec = _rec("Please choose the correct answer to the question: " + "which planet? " * 60,
               "the correct answer is answer3")
    full = encode_record(rec, tok, cutoff_len=4096)
    cutoff = sum(lab == IGNORE_INDEX for lab in full["labels"])  # shorter than prompt + answer, longer than the answer
    enc = encode_record(rec, tok, cutoff_len=cutoff)
    learned = [t for t in enc["labels"] if t != IGNORE_INDEX]
    assert tok.decode(learned, skip_special_tokens=True) == "the correct answer is answer3"
    assert len(enc["input_ids"]) == cutoff
    right = encode_record(rec, tok, cutoff_len=cutoff, truncation="right")
    assert right is None  # right truncation keeps only prompt tokens here: the whole answer is lost


# ---- a run's data: counts reported, empty splits refused ----


def _data_cfg(**extra):
    base = {"path": "/data/train.json", "cutoff_len": 80, "truncation": "prompt_left", "val_size": 0.1,
            "template": "alpaca"}
    return OmegaConf.create({**base, **extra})


def test_counts_reach_the_info_and_the_log(caplog):
    tok = byte_tokenizer()
    train = [_rec("short", "yes"), _rec("x " * 100, "yes"), _rec("q", "y" * 100)]
    with caplog.at_level(logging.INFO, logger="mole.data"):
        train_set, val_set, info = encode_datasets(_data_cfg(), tok, train, [_rec("v", "no")])
    assert (len(train_set), len(val_set)) == (2, 1)
    assert info["truncation"]["train"] == {"records": 3, "kept": 2, "truncated": 1, "dropped": 1, "empty_output": 0}
    assert info["truncation"]["val"]["kept"] == 1 and info["truncation"]["mode"] == "prompt_left"
    json.dumps(info)  # goes into metrics.json as it is
    (line,) = [r.getMessage() for r in caplog.records if "data.cutoff_len=80" in r.getMessage()]
    assert "train 2 of 3 kept, 1 truncated, 1 dropped" in line and caplog.records[-1].levelno == logging.WARNING


def test_a_validation_split_that_loses_every_record_is_an_error_naming_the_file():
    tok = byte_tokenizer()
    cfg = _data_cfg(val_path="/data/val.json")
    with pytest.raises(MoleConfigError, match=r"data.val_path=\['/data/val.json'\] is empty.*data.cutoff_len=80"):
        encode_datasets(cfg, tok, [_rec("a", "b")], [_rec("q", "y" * 200)])
    with pytest.raises(MoleConfigError, match=r"validation split of data.path=/data/train.json .*data.cutoff_len=80"):
        encode_datasets(_data_cfg(), tok, [_rec("a", "b")], [_rec("q", "y" * 200)])


def test_a_training_set_with_nothing_to_learn_is_an_error():
    tok = byte_tokenizer()
    with pytest.raises(MoleConfigError, match=r"data.path=/data/train.json: every training record .*empty output"):
        encode_datasets(_data_cfg(), tok, [_rec("a", ""), _rec("b", " ")], [])
    with pytest.raises(MoleConfigError, match=r"data.path=/data/train.json: none of the 1 training records fits "
                                              r"data.cutoff_len=80"):
        encode_datasets(_data_cfg(), tok, [_rec("a", "y" * 200)], [])


def test_prompt_is_still_the_template_prompt_after_cutting():
    tok = byte_tokenizer()
    rec = _rec("x " * 100, "ok")
    enc = encode_record(rec, tok, cutoff_len=50)
    prompt = tok(format_prompt(rec["instruction"]))["input_ids"]
    n_prompt = sum(lab == IGNORE_INDEX for lab in enc["labels"])
    assert enc["input_ids"][:n_prompt] == prompt[len(prompt) - n_prompt:]  # its last tokens: "### Response:\n"
