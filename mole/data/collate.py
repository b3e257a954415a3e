"""Tokenise records into (input_ids, labels) with the prompt masked out of the loss, and pad batches."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mole.data.prompts import format_prompt

IGNORE_INDEX = -100


def encode_record(record: dict[str, str], tokenizer, cutoff_len: int, template: str = "alpaca") -> dict[str, list[int]]:
    """Token ids of ``prompt + output + eos`` with labels ``-100`` on the prompt.

    Prompt and response are tokenised separately and concatenated, so the mask boundary is exact
    whatever the tokenizer merges. The sequence is truncated to ``cutoff_len`` tokens.
    """
    prompt = format_prompt(record["instruction"], record.get("input", ""), template)
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(record["output"], add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    ids = (prompt_ids + response_ids)[:cutoff_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:cutoff_len]
    return {"input_ids": ids, "labels": labels}


def encode_records(records: Sequence[dict[str, str]], tokenizer, cutoff_len: int, template: str = "alpaca") -> list[dict[str, list[int]]]:
    """Encode all records, dropping those whose response is cut off entirely (nothing to learn)."""
    encoded = [encode_record(r, tokenizer, cutoff_len, template) for r in records]
    return [e for e in encoded if any(lab != IGNORE_INDEX for lab in e["labels"])]


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
