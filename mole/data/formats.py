"""Hugging Face rows -> LLM-Adapters records, one converter per data set (``data.hf_format``).

LLM-Adapters (Hu et al., 2023) writes every data set as ``instruction`` / ``input`` / ``output`` /
``answer`` records, with multiple-choice options inside the instruction and an ``Answer format:``
line naming the answer tokens (``answer1/answer2/...``, ``true/false``, ``solution1/solution2``,
``option1/option2``, ``ending1/...``); the target output is ``"the correct answer is <token>"``. Its
files cover ARC, BoolQ, OpenBookQA, PIQA, SIQA, HellaSwag, WinoGrande and the math sets; the
converters below write the same layout from the Hub versions of those and of the data sets it does
not cover (ScienceQA, CommonsenseQA, GLUE, MMLU, MMLU-Pro, SWAG), so that a model trained on local
LLM-Adapters files and one trained from the Hub see the same prompts.

A converter returns ``None`` for a row to drop (ScienceQA questions with an image, unlabeled rows).
Multiple-choice records of MMLU / MMLU-Pro also carry ``subject`` (for macro accuracy).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from mole.utils.errors import MoleConfigError

Record = dict[str, str]
_LETTERS = "ABCDEFGHIJ"


def mc_record(question: str, options: Sequence[str], gold: int, token: str = "answer",
              lead: str = "Please choose the correct answer to the question: ", sep: str = " ") -> Record:
    """A multiple-choice record in the LLM-Adapters layout (options ``Answer1: ...``, tokens ``answerN``)."""
    if not 0 <= gold < len(options):
        raise ValueError(f"gold index {gold} out of range for {len(options)} options")
    cap = token.capitalize()
    listed = sep.join(f"{cap}{i + 1}: {str(o).strip()}" for i, o in enumerate(options))
    tokens = "/".join(f"{token}{i + 1}" for i in range(len(options)))
    answer = f"{token}{gold + 1}"
    return {
        "instruction": f"{lead}{question.strip()}\n\n{listed}\n\nAnswer format: {tokens}",
        "input": "",
        "output": f"the correct answer is {answer}",
        "answer": answer,
    }


def tf_record(text: str, truth: bool) -> Record:
    """A true/false record (BoolQ layout of LLM-Adapters)."""
    answer = "true" if truth else "false"
    return {"instruction": f"{text.strip()}\n\nAnswer format: true/false", "input": "",
            "output": f"the correct answer is {answer}", "answer": answer}


def _letter_index(key: Any, labels: Sequence[str]) -> int:
    key = str(key).strip()
    return list(map(str, labels)).index(key)


# ---- commonsense / science multiple choice ----


def arc(row: dict) -> Record:
    """allenai/ai2_arc (ARC-Easy / ARC-Challenge): question, choices{text,label}, answerKey."""
    choices = row["choices"]
    return mc_record(row["question"], choices["text"], _letter_index(row["answerKey"], choices["label"]))


def openbookqa(row: dict) -> Record:
    """allenai/openbookqa (main): question_stem, choices{text,label}, answerKey."""
    choices = row["choices"]
    return mc_record(row["question_stem"], choices["text"], _letter_index(row["answerKey"], choices["label"]))


def commonsenseqa(row: dict) -> Record | None:
    """tau/commonsense_qa: question, choices{text,label}, answerKey (empty on the unlabeled test split)."""
    if not str(row.get("answerKey") or "").strip():
        return None
    choices = row["choices"]
    return mc_record(row["question"], choices["text"], _letter_index(row["answerKey"], choices["label"]))


def scienceqa(row: dict) -> Record | None:
    """derek-thomas/ScienceQA: question, choices, answer (index), hint; questions with an image dropped.

    NOTE(deviation): the text-only questions (no image) only: the models are text-only. MoR Table 5's
    6,508 train / 2,224 test match the text-only part of ScienceQA's train / test splits.
    """
    if row.get("image") is not None:
        return None
    hint = str(row.get("hint") or "").strip()
    question = f"{row['question']}\nContext: {hint}" if hint else row["question"]
    return mc_record(question, row["choices"], int(row["answer"]))


def siqa(row: dict) -> Record:
    """lighteval/siqa (Social IQa): context, question, answerA/B/C, label "1".."3"."""
    return mc_record(f"{row['context']} {row['question']}", [row["answerA"], row["answerB"], row["answerC"]],
                     int(row["label"]) - 1)


def piqa(row: dict) -> Record:
    """baber/piqa: goal, sol1, sol2, label (0/1); LLM-Adapters' ``solution1/solution2`` layout."""
    return mc_record(row["goal"], [row["sol1"], row["sol2"]], int(row["label"]), token="solution",
                     lead="Please choose the correct solution to the question: ", sep="\n\n")


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag(row: dict) -> Record | None:
    """Rowan/hellaswag: activity_label, ctx_a, ctx_b, endings, label; ``ending1..4`` tokens."""
    if str(row.get("label", "")).strip() == "":
        return None
    ctx = f"{row['activity_label']}: {row['ctx_a']} {str(row['ctx_b']).capitalize()}"
    return mc_record(_hellaswag_clean(ctx), [_hellaswag_clean(e) for e in row["endings"]], int(row["label"]),
                     token="ending", lead="Please choose the correct ending to complete the given sentence: ")


def swag(row: dict) -> Record | None:
    """allenai/swag (regular): startphrase, ending0..3, label; ``ending1..4`` tokens like HellaSwag."""
    if int(row.get("label", -1)) < 0:
        return None
    return mc_record(row["startphrase"], [row[f"ending{i}"] for i in range(4)], int(row["label"]), token="ending",
                     lead="Please choose the correct ending to complete the given sentence: ")


def winogrande(row: dict) -> Record | None:
    """allenai/winogrande: sentence, option1, option2, answer "1"/"2" (empty on the test split)."""
    if str(row.get("answer") or "").strip() not in ("1", "2"):
        return None
    answer = f"option{row['answer']}"
    return {
        "instruction": "Please choose the correct answer to fill in the blank to complete the given sentence: "
        f"{row['sentence']}\n\nOption1: {row['option1']} Option2: {row['option2']} Answer format: option1/option2",
        "input": "",
        "output": f"the correct answer is {answer}",
        "answer": answer,
    }


def boolq(row: dict) -> Record:
    """google/boolq: question, answer (bool), passage.

    As in LLM-Adapters' boolq files, the passage is not part of the prompt.
    """
    question = str(row["question"]).strip()
    if not question.endswith("?"):
        question += "?"
    return tf_record(f"Please answer the following question with true or false, question: {question}", bool(row["answer"]))


# ---- GLUE (MoR Table 1) ----


def mrpc(row: dict) -> Record | None:
    """nyu-mll/glue mrpc: sentence1, sentence2, label (1 = equivalent; -1 on the unlabeled test split)."""
    if int(row["label"]) < 0:
        return None
    return tf_record("Please answer with true or false: are the following two sentences paraphrases of each other?\n"
                     f"Sentence1: {row['sentence1']}\nSentence2: {row['sentence2']}", int(row["label"]) == 1)


def rte(row: dict) -> Record | None:
    """nyu-mll/glue rte: sentence1 (premise), sentence2 (hypothesis), label (0 = entailment)."""
    if int(row["label"]) < 0:
        return None
    return tf_record("Please answer with true or false: does the premise entail the hypothesis?\n"
                     f"Premise: {row['sentence1']}\nHypothesis: {row['sentence2']}", int(row["label"]) == 0)


def cola(row: dict) -> Record | None:
    """nyu-mll/glue cola: sentence, label (1 = acceptable)."""
    if int(row["label"]) < 0:
        return None
    return tf_record("Please answer with true or false: is the following sentence grammatically acceptable?\n"
                     f"Sentence: {row['sentence']}", int(row["label"]) == 1)


# ---- MMLU / MMLU-Pro (HMoRA) ----


def mmlu(row: dict) -> Record:
    """cais/mmlu (all): question, subject, choices (4), answer (index)."""
    rec = mc_record(row["question"], row["choices"], int(row["answer"]))
    rec["subject"] = str(row["subject"])
    return rec


def mmlu_pro(row: dict) -> Record:
    """TIGER-Lab/MMLU-Pro: question, options (up to 10), answer_index, category (the macro-accuracy group)."""
    rec = mc_record(row["question"], row["options"], int(row["answer_index"]))
    rec["subject"] = str(row["category"])
    return rec


# ---- math word problems (MoA Table 2) ----


def gsm8k(row: dict) -> Record:
    """openai/gsm8k (main): question, answer ("rationale #### number"); calculator marks ``<<...>>`` dropped."""
    rationale, _, number = str(row["answer"]).rpartition("####")
    rationale = re.sub(r"<<[^>]*>>", "", rationale).strip().replace("\n", " ")
    number = number.strip().replace(",", "")
    return {"instruction": str(row["question"]).strip(), "input": "",
            "output": f"\nA: {rationale} The answer is {number}.", "answer": number}


def aqua(row: dict) -> Record:
    """deepmind/aqua_rat (raw): question, options ["A)21", ...], rationale, correct (a letter)."""
    opts = " ".join(f"({str(o)[0]}) {str(o)[2:].strip()}" for o in row["options"])
    letter = str(row["correct"]).strip().upper()
    return {"instruction": f"{str(row['question']).strip()} Answer Choices: {opts}", "input": "",
            "output": f"\nRationale: {str(row['rationale']).strip()} The answer is ({letter}).", "answer": letter}


CONVERTERS: dict[str, Callable[[dict], Record | None]] = {
    "arc": arc,
    "openbookqa": openbookqa,
    "commonsenseqa": commonsenseqa,
    "scienceqa": scienceqa,
    "siqa": siqa,
    "piqa": piqa,
    "hellaswag": hellaswag,
    "swag": swag,
    "winogrande": winogrande,
    "boolq": boolq,
    "mrpc": mrpc,
    "rte": rte,
    "cola": cola,
    "mmlu": mmlu,
    "mmlu_pro": mmlu_pro,
    "gsm8k": gsm8k,
    "aqua": aqua,
}


def converter(name: str, key: str = "data.hf_format") -> Callable[[dict], Record | None]:
    """The converter called ``name``; a MoleConfigError naming ``key`` for an unknown one."""
    try:
        return CONVERTERS[name]
    except KeyError:
        raise MoleConfigError(f"{key}={name!r} is not a known format; expected one of {sorted(CONVERTERS)}") from None
