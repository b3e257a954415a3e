"""Tokenise records into (input_ids, labels) with the prompt masked out of the loss, and pad batches."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mole.data.prompts import format_prompt
from mole.data.truncation import DROPPED, IGNORE_INDEX, TruncationStats, check_truncation, truncate


def encode_record(record: dict[str, str], tokenizer, cutoff_len: int, template: str = "alpaca",
                  truncation: str = "prompt_left") -> dict[str, list[int]] | None:
    """Token ids of ``prompt + output + eos`` with labels ``-100`` on the prompt, fitted into ``cutoff_len``.

    Prompt and response are tokenised separately and concatenated, so the mask boundary is exact
    whatever the tokenizer merges. An over-long example is cut by :func:`mole.data.truncation.truncate`
    (``data.truncation``); ``None`` when it is dropped.
    """
    return _encode(record, tokenizer, cutoff_len, template, truncation)[0]


def _encode(record: dict[str, str], tokenizer, cutoff_len: int, template: str, truncation: str):
    prompt = format_prompt(record["instruction"], record.get("input", ""), template)
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(record["output"], add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    bos = getattr(tokenizer, "bos_token_id", None)
    keep = 1 if bos is not None and prompt_ids[:1] == [bos] else 0
    ids, labels, status = truncate(prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids,
                                   cutoff_len, truncation, keep=keep)
    if labels is not None and all(lab == IGNORE_INDEX for lab in labels):
        ids, labels, status = None, None, DROPPED  # nothing to learn
    return ({"input_ids": ids, "labels": labels} if ids is not None else None), status


def encode_split(records: Sequence[dict[str, str]], tokenizer, cutoff_len: int, template: str = "alpaca",
                 truncation: str = "prompt_left") -> tuple[list[dict[str, list[int]]], TruncationStats]:
    """Encode all records; the examples kept, and what truncation did (:class:`TruncationStats`)."""
    check_truncation(truncation)
    stats, out = TruncationStats(), []
    for rec in records:
        enc, status = _encode(rec, tokenizer, cutoff_len, template, truncation)
        stats.add(status, empty_output=not rec["output"].strip())
        if enc is not None:
            out.append(enc)
    return out, stats


def encode_records(records: Sequence[dict[str, str]], tokenizer, cutoff_len: int, template: str = "alpaca",
                   truncation: str = "prompt_left") -> list[dict[str, list[int]]]:
    """Encode all records, dropping those that do not fit (see :func:`encode_split` for the counts)."""
    return encode_split(records, tokenizer, cutoff_len, template, truncation)[0]


class Collator:
    """Right-pad a list of encoded records into a batch of tensors."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.tensor(b["input_ids"])
            labels[i, :n] = torch.tensor(b["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
