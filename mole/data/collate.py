"""Tokenise records into (input_ids, labels) with the prompt masked out of the loss, and pad batches."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler

from mole.data.prompts import chat_prompt, check_chat_template, format_prompt, record_messages, record_question
from mole.data.truncation import DROPPED, IGNORE_INDEX, TruncationStats, check_truncation, truncate
from mole.utils.errors import MoleConfigError


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


def assistant_segments(messages: Sequence[dict[str, str]], tokenizer) -> list[tuple[str, bool]]:
    """The chat template's rendering of ``messages`` cut into ``(text, learned)`` segments.

    Each assistant turn's span is what the template adds for it: the text between the rendering of the
    turns before it with the generation prompt and the rendering up to and including it, its trailing
    whitespace excepted (that belongs to the next prompt). Everything else (system, user turns, the
    template's own markup and the assistant cue) is prompt. Turns after the last assistant turn teach
    nothing and are left out. A template that does not render earlier turns as a prefix of later ones
    (e.g. one that drops past reasoning) cannot be masked this way and is refused.
    """
    segments: list[tuple[str, bool]] = []
    done = ""
    for k, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prompt = chat_prompt(tokenizer, list(messages[:k]))
        full = tokenizer.apply_chat_template(list(messages[: k + 1]), tokenize=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise MoleConfigError(f"data.template=chat: the chat template does not render turn {k} as a continuation of "
                                  "the turns before it, so the assistant turns cannot be masked exactly")
        answer = full[len(prompt):].rstrip()
        segments += [(prompt[len(done):], False), (answer, True)]
        done = prompt + answer
    return segments


def encode_messages(messages: Sequence[dict[str, str]], tokenizer) -> dict[str, list[int]]:
    """Token ids of a chat rendered by the tokenizer's chat template, labels ``-100`` except on assistant turns.

    Not truncated (the caller cuts at ``data.cutoff_len``). Segments are tokenised separately, without
    added special tokens (the template writes its own), so the mask boundaries are exact.
    """
    ids: list[int] = []
    labels: list[int] = []
    for text, learned in assistant_segments(messages, tokenizer):
        seg = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += seg
        labels += seg if learned else [IGNORE_INDEX] * len(seg)
    return {"input_ids": ids, "labels": labels}


def question_ids(record: dict, tokenizer, cutoff_len: int) -> list[int]:
    """Token ids of the record's raw question (:func:`mole.data.prompts.record_question`), tokenised on its
    own without added special tokens, as HMoRA's released code tokenises its task encoder's input; its first
    ``cutoff_len`` tokens."""
    return tokenizer(record_question(record), add_special_tokens=False)["input_ids"][:cutoff_len]


def encode_example(record: dict, tokenizer, cutoff_len: int, template: str = "alpaca",
                   truncation: str = "prompt_left", question: bool = False) -> tuple[dict[str, list[int]] | None, str]:
    """One record of either format (LLM-Adapters or ``messages``) under ``template``, fitted into
    ``cutoff_len`` by :func:`mole.data.truncation.truncate`: ``(example or None when dropped, status)``.
    ``question``: the example also carries ``question_ids`` (:func:`question_ids`)."""
    enc, status = _encode_example(record, tokenizer, cutoff_len, template, truncation)
    if enc is not None and question:
        enc["question_ids"] = question_ids(record, tokenizer, cutoff_len)
    return enc, status


def _encode_example(record: dict, tokenizer, cutoff_len: int, template: str, truncation: str):
    if template != "chat":
        if "messages" in record:
            raise MoleConfigError(f"data.format=messages needs data.template=chat, got data.template={template}")
        return _encode(record, tokenizer, cutoff_len, template, truncation)
    messages = record["messages"] if "messages" in record else record_messages(record)
    enc = encode_messages(messages, tokenizer)
    ids, labels, status = truncate(enc["input_ids"], enc["labels"], cutoff_len, truncation, keep=0)
    if labels is not None and all(lab == IGNORE_INDEX for lab in labels):
        ids, labels, status = None, None, DROPPED  # nothing to learn
    return ({"input_ids": ids, "labels": labels} if ids is not None else None), status


def encode_split(records: Sequence[dict], tokenizer, cutoff_len: int, template: str = "alpaca",
                 truncation: str = "prompt_left", question: bool = False) -> tuple[list[dict[str, list[int]]], TruncationStats]:
    """Encode all records; the examples kept, and what truncation did (:class:`TruncationStats`).
    ``question``: each example also carries its raw question's ``question_ids``."""
    check_truncation(truncation)
    if template == "chat":
        check_chat_template(tokenizer)
    stats, out = TruncationStats(), []
    for rec in records:
        enc, status = encode_example(rec, tokenizer, cutoff_len, template, truncation, question)
        stats.add(status, empty_output="output" in rec and not str(rec["output"]).strip())
        if enc is not None:
            out.append(enc)
    return out, stats


def encode_records(records: Sequence[dict], tokenizer, cutoff_len: int, template: str = "alpaca",
                   truncation: str = "prompt_left") -> list[dict[str, list[int]]]:
    """Encode all records, dropping those that do not fit (see :func:`encode_split` for the counts)."""
    return encode_split(records, tokenizer, cutoff_len, template, truncation)[0]


class Collator:
    """Right-pad a list of encoded records into a batch of tensors, to the longest record rounded up to a
    multiple of ``pad_to_multiple_of`` (fewer distinct shapes for compiled models and tensor cores).

    Records with ``question_ids`` also give ``question_ids`` ``(B, Q)`` and ``question_mask`` ``(B, Q)``
    (1 for real tokens), right-padded to the longest question (at least one column)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.multiple = pad_to_multiple_of or 1

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = -(-max(len(b["input_ids"]) for b in batch) // self.multiple) * self.multiple
        ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.tensor(b["input_ids"])
            labels[i, :n] = torch.tensor(b["labels"])
            mask[i, :n] = 1
        out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        if "question_ids" in batch[0]:
            width = max(1, *(len(b["question_ids"]) for b in batch))
            q_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
            q_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, b in enumerate(batch):
                n = len(b["question_ids"])
                q_ids[i, :n] = torch.tensor(b["question_ids"], dtype=torch.long)
                q_mask[i, :n] = 1
            out.update(question_ids=q_ids, question_mask=q_mask)
        return out


def length_grouped_sampler(lengths: Sequence[int], batch_size: int, generator: torch.Generator):
    """Batches of similar length in a random order: ``transformers``' ``LengthGroupedSampler`` (a random
    permutation cut into mega-batches of up to 50 batches, each sorted by length). It draws its order from
    ``generator`` when an epoch starts, as a shuffling sampler does, so checkpoints resume it exactly."""
    return LengthGroupedSampler(batch_size, lengths=list(lengths), generator=generator)


def padding_fraction(batches: Sequence[Sequence[int]], multiple: int = 1) -> float:
    """The share of a padded batch's positions that are padding, over ``batches`` of record lengths."""
    real = padded = 0
    for lengths in batches:
        width = -(-max(lengths) // multiple) * multiple
        real += sum(lengths)
        padded += width * len(lengths)
    return 1 - real / padded if padded else 0.0
