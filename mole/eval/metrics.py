"""Metrics and answer extraction for the benchmarks (:mod:`mole.eval.benchmarks`).

* **Answer extraction** for generation tasks, in the style of LLM-Adapters' ``evaluate.py`` (Hu et al.,
  2023), which MoA (Cao et al., 2025) evaluates its math sets with: the predicted number is the *last*
  number in the generated text (commas removed), correct when it is within 1e-3 of the gold number;
  the predicted AQuA option is a letter A-E.
* **Matthews correlation** (CoLA, MoR Table 1) and **macro accuracy** (MMLU / MMLU-Pro, HMoRA Table 7:
  the mean over subjects of the per-subject accuracy).
* lm-eval hooks: ``process_results`` / aggregation functions that the rendered benchmark task YAMLs
  name with ``!function`` (through a stub module written next to them).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

#: |prediction - gold| below this counts as correct (LLM-Adapters' ``MISS``).
NUMBER_TOLERANCE = 1e-3

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?|-?\.\d+")
_LETTER_AFTER_ANSWER = re.compile(r"answer is[\s:]*\(?([A-E])\)?(?![A-Za-z])", re.IGNORECASE)
_LETTER_ALONE = re.compile(r"(?<![A-Za-z])\(?([A-E])\)?(?![A-Za-z])")


def extract_number(text: str) -> float | None:
    """The last number in ``text`` (thousands commas dropped), or ``None`` when there is none.

    LLM-Adapters takes the last match of ``-?\\d+\\.?\\d*`` after removing commas; so does this.
    """
    matches = _NUMBER.findall(text.replace(",", ""))
    if not matches:
        return None
    try:
        return float(matches[-1])
    except ValueError:  # pragma: no cover - the pattern only matches numbers
        return None


def parse_gold_number(answer: str) -> float | None:
    """The gold number of a math record (``"576.0"``, ``"1,200"``; GSM8K's ``"... #### 72"``)."""
    text = str(answer).strip()
    if "####" in text:
        text = text.split("####")[-1]
    text = text.replace(",", "").strip()
    try:
        return float(text)
    except ValueError:
        return extract_number(text)


def numbers_match(pred: float | None, gold: float | None, tol: float = NUMBER_TOLERANCE) -> bool:
    """``|pred - gold| <= tol`` (both known and finite)."""
    if pred is None or gold is None or not (math.isfinite(pred) and math.isfinite(gold)):
        return False
    return abs(pred - gold) <= tol


def extract_letter(text: str) -> str:
    """The option letter (A-E) a generated text picks, ``""`` when it names none.

    First the letter of "the answer is (X)" (the form AQuA rationales end with), else the first letter
    A-E standing alone (not inside a word).

    NOTE(deviation): LLM-Adapters takes the first capital A-E anywhere, so the "A" of "Answer" counts
    as option A; here a letter must stand alone, and "answer is X" takes precedence.
    """
    found = _LETTER_AFTER_ANSWER.search(text)
    if found:
        return found.group(1).upper()
    found = _LETTER_ALONE.search(text)
    return found.group(1).upper() if found else ""


def matthews_corrcoef(golds: Sequence[Any], preds: Sequence[Any]) -> float:
    """Matthews correlation coefficient of two label sequences (any number of classes).

    Gorodkin's multi-class form: with the confusion matrix C, t_k = row sums (true), p_k = column sums
    (predicted), c = trace, s = total,
    ``MCC = (c*s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2) (s^2 - sum_k t_k^2))``; for two classes
    this is ``(TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))``. 0 when a denominator factor is
    0 (all gold or all predicted labels the same), as scikit-learn does.
    """
    if len(golds) != len(preds):
        raise ValueError(f"{len(golds)} gold labels but {len(preds)} predictions")
    s = len(golds)
    if s == 0:
        return 0.0
    true_counts: dict[Any, int] = defaultdict(int)
    pred_counts: dict[Any, int] = defaultdict(int)
    correct = 0
    for g, p in zip(golds, preds, strict=True):
        true_counts[g] += 1
        pred_counts[p] += 1
        correct += int(g == p)
    labels = set(true_counts) | set(pred_counts)
    cov_tp = correct * s - sum(pred_counts[k] * true_counts[k] for k in labels)
    cov_pp = s * s - sum(v * v for v in pred_counts.values())
    cov_tt = s * s - sum(v * v for v in true_counts.values())
    if cov_pp == 0 or cov_tt == 0:
        return 0.0
    return cov_tp / math.sqrt(cov_pp * cov_tt)


def macro_accuracy(items: Iterable[tuple[str, int | bool]]) -> float:
    """Mean over groups (subjects) of the per-group accuracy; ``items`` are ``(group, correct)`` pairs."""
    per: dict[str, list[int]] = defaultdict(list)
    for group, correct in items:
        per[str(group)].append(int(bool(correct)))
    if not per:
        return 0.0
    return sum(sum(v) / len(v) for v in per.values()) / len(per)


# ---- lm-eval hooks (named by the rendered task YAMLs through ``!function``) ----


def _argmax_loglik(results: Sequence[Any]) -> int:
    """Index of the choice with the largest log-likelihood; ``results`` are ``(loglik, is_greedy)``."""
    lls = [float(r[0]) for r in results]
    return max(range(len(lls)), key=lls.__getitem__)


def _argmax_norm(doc: dict, results: Sequence[Any]) -> int:
    """Like lm-eval's ``acc_norm``: log-likelihood divided by the choice's length in bytes."""
    lls = [float(r[0]) / max(1, len(c.encode("utf-8"))) for r, c in zip(results, doc["choices"], strict=True)]
    return max(range(len(lls)), key=lls.__getitem__)


def process_mc(doc: dict, results: Sequence[Any]) -> dict[str, float]:
    """Multiple choice by log-likelihood: ``acc`` (argmax log-likelihood) and ``acc_norm``."""
    gold = int(doc["label"])
    return {
        "acc": float(_argmax_loglik(results) == gold),
        "acc_norm": float(_argmax_norm(doc, results) == gold),
    }


def process_mc_mcc(doc: dict, results: Sequence[Any]) -> dict[str, Any]:
    """Multiple choice scored by Matthews correlation (CoLA): ``mcc`` pairs ``(gold, pred)`` and ``acc``."""
    gold, pred = int(doc["label"]), _argmax_loglik(results)
    return {"mcc": (gold, pred), "acc": float(pred == gold)}


def process_mc_macro(doc: dict, results: Sequence[Any]) -> dict[str, Any]:
    """Multiple choice scored by macro accuracy over ``doc["subject"]`` (MMLU): ``macro_acc`` and ``acc``."""
    gold, pred = int(doc["label"]), _argmax_loglik(results)
    return {"macro_acc": (str(doc.get("subject") or ""), int(pred == gold)), "acc": float(pred == gold)}


def process_number(doc: dict, results: Sequence[str]) -> dict[str, float]:
    """Generation, numeric answer: correct when the last number generated matches the gold number."""
    return {"acc": float(numbers_match(extract_number(results[0]), parse_gold_number(doc["answer"])))}


def process_letter(doc: dict, results: Sequence[str]) -> dict[str, float]:
    """Generation, option letter (AQuA): correct when the extracted letter is the gold one."""
    return {"acc": float(extract_letter(results[0]) == str(doc["answer"]).strip().upper())}


def aggregate_mcc(items: Sequence[tuple[int, int]]) -> float:
    """lm-eval aggregation over ``(gold, pred)`` pairs."""
    golds = [g for g, _ in items]
    preds = [p for _, p in items]
    return matthews_corrcoef(golds, preds)


def aggregate_macro_acc(items: Sequence[tuple[str, int]]) -> float:
    """lm-eval aggregation over ``(subject, correct)`` pairs."""
    return macro_accuracy(items)
