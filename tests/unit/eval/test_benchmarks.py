"""Benchmarks of the papers' tables: metrics, answer extraction, subsets, converters, smoke evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mole.eval import benchmarks as B
from mole.eval.metrics import (
    extract_letter,
    extract_number,
    macro_accuracy,
    matthews_corrcoef,
    numbers_match,
    parse_gold_number,
)
from mole.utils.errors import MoleConfigError

SHARED = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "llm-adapters"
SHARED = SHARED if SHARED.is_dir() else Path("/work/shared/data/llm-adapters")

# ---- answer extraction (hand-made generations) ----


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\nA: 7 + 5 = 12 apples. The answer is 12.", 12.0),
        ("He pays 1,250 dollars in total. The answer is 1,250", 1250.0),
        ("4 - 10 gives -6 degrees", -6.0),
        ("so 25 / 2 = 12.5 liters", 12.5),
        ("The answer is 3. Then 4 more.", 4.0),  # the last number, as LLM-Adapters takes it
        ("I do not know", None),
    ],
)
def test_extract_number_takes_the_last_number(text, expected):
    assert extract_number(text) == expected


def test_gold_numbers_and_tolerance():
    assert parse_gold_number("576.0") == 576.0
    assert parse_gold_number("Natalia sold 48/2 = 24 clips.\n#### 1,072") == 1072.0
    assert parse_gold_number(" 8 ") == 8.0
    assert numbers_match(576.0004, 576.0) and not numbers_match(576.01, 576.0)
    assert not numbers_match(None, 3.0) and not numbers_match(float("inf"), 3.0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\nRationale: 0.2 * 50 = 10. The answer is (D).", "D"),
        ("Answer: B", "B"),  # the A of "Answer" is part of a word, not an option
        ("I think (C) fits best, not (A)", "C"),
        ("the answer is e", "E"),
        ("Because nothing matches", ""),
    ],
)
def test_extract_letter(text, expected):
    assert extract_letter(text) == expected


# ---- metrics (hand-computed values) ----


def test_mcc_binary_hand_computed():
    golds = [1, 1, 1, 0, 0, 0, 1, 0]
    preds = [1, 1, 0, 0, 0, 1, 1, 0]
    # TP=3 (0,1,6), FN=1 (2), FP=1 (5), TN=3 (3,4,7): (3*3 - 1*1) / sqrt(4*4*4*4) = 8/16
    assert matthews_corrcoef(golds, preds) == pytest.approx(0.5)
    assert matthews_corrcoef(golds, golds) == pytest.approx(1.0)
    assert matthews_corrcoef(golds, [1 - p for p in golds]) == pytest.approx(-1.0)
    assert matthews_corrcoef(golds, [1] * 8) == 0.0  # constant prediction: 0, as scikit-learn


def test_mcc_multiclass_hand_computed():
    # s=4, c=3, t=(2,1,1), p=(2,2,0): (3*4 - (4+2+0)) / sqrt((16-8) * (16-6)) = 6 / sqrt(80)
    assert matthews_corrcoef([0, 1, 2, 0], [0, 1, 1, 0]) == pytest.approx(6 / math.sqrt(80))


def test_macro_accuracy_averages_subjects_not_questions():
    items = [("algebra", 1), ("algebra", 0), ("algebra", 0), ("algebra", 1), ("botany", 1)]
    assert macro_accuracy(items) == pytest.approx((0.5 + 1.0) / 2)  # micro accuracy would be 3/5


def test_lm_eval_hooks_score_like_the_metrics():
    from mole.eval.metrics import aggregate_macro_acc, aggregate_mcc, process_letter, process_mc, process_number

    doc = {"label": 2, "choices": ["the correct answer is answer1", "the correct answer is answer2", "x"]}
    # log-likelihoods: choice 2 wins on raw log-likelihood; per byte choice 2 (-3/1) loses to choice 0 (-4/29)
    assert process_mc(doc, [(-4.0, False), (-5.0, False), (-3.0, False)]) == {"acc": 1.0, "acc_norm": 0.0}
    assert process_number({"answer": "18.0"}, ["16 - 3 - 4 = 9 eggs, 9 * 2 = 18. The answer is 18."]) == {"acc": 1.0}
    assert process_number({"answer": "18"}, ["The answer is 17."]) == {"acc": 0.0}
    assert process_letter({"answer": "B"}, [" The answer is (B)."]) == {"acc": 1.0}
    # TP=1, TN=2, FN=1, FP=0: (1*2 - 0*1) / sqrt((1+0)(1+1)(2+0)(2+1))
    assert aggregate_mcc([(1, 1), (0, 0), (1, 0), (0, 0)]) == pytest.approx(2 / math.sqrt(12))
    assert aggregate_macro_acc([("a", 1), ("b", 0), ("b", 1)]) == pytest.approx(0.75)


# ---- fixed-size subsets ----


def test_fixed_subset_is_deterministic_sized_and_ordered():
    records = list(range(100))
    a = B.fixed_subset(records, 30, seed=7)
    assert a == B.fixed_subset(records, 30, seed=7) and len(a) == 30 and len(set(a)) == 30
    assert a == sorted(a)  # kept in the original order
    assert a != B.fixed_subset(records, 30, seed=8)
    b = B.fixed_subset(records, 50, seed=7, offset=30)
    assert not set(a) & set(b)  # consecutive ranges of one permutation are disjoint
    assert B.fixed_subset(records, 100, seed=7) == records
    with pytest.raises(MoleConfigError, match="needs 101 records"):
        B.fixed_subset(records, 71, seed=7, offset=30)


def test_hmora_table8_sizes():
    table8 = {"mmlu": (300, 2000), "mmlu_pro": (70, 2000), "arc_c": (299, 1172), "arc_e": (570, 2376),
              "openbookqa": (500, 500), "swag": (300, 2000), "commonsenseqa": (300, 900)}
    for name, (n_val, n_test) in table8.items():
        sub = B.BENCHMARKS[name].subsets["hmora"]
        assert (sub["validation"].size, sub["test"].size) == (n_val, n_test), name


def _mc(i: int) -> dict:
    return {"instruction": f"Please choose the correct answer to the question: q{i}?\n\nAnswer1: a Answer2: b\n\n"
            "Answer format: answer1/answer2", "input": "", "output": "the correct answer is answer1", "answer": "answer1"}


def test_hmora_validation_and_test_subsets_of_one_split_are_disjoint(tmp_path):
    # CommonsenseQA: HMoRA draws 300 validation and 900 test questions from the 1,221 of the validation split
    folder = tmp_path / "commonsense_qa"
    folder.mkdir()
    (folder / "test.json").write_text(json.dumps([_mc(i) for i in range(1221)]))
    val = B.load_records("commonsenseqa", B.EvalSettings(data_root=str(tmp_path), subset="hmora", split="validation"))
    test = B.load_records("commonsenseqa", B.EvalSettings(data_root=str(tmp_path), subset="hmora"))
    again = B.load_records("commonsenseqa", B.EvalSettings(data_root=str(tmp_path), subset="hmora"))
    assert len(val) == 300 and len(test) == 900 and test == again
    assert not {r["instruction"] for r in val} & {r["instruction"] for r in test}
    other_seed = B.load_records("commonsenseqa", B.EvalSettings(data_root=str(tmp_path), subset="hmora", subset_seed=1))
    assert other_seed != test
    full = B.load_records("commonsenseqa", B.EvalSettings(data_root=str(tmp_path)))
    assert len(full) == 1221


# ---- registry and errors ----

CONTRACT = ["scienceqa", "commonsenseqa", "openbookqa", "mrpc", "cola", "rte", "arc_e", "arc_c", "boolq", "piqa",
            "siqa", "hellaswag", "winogrande", "swag", "mmlu", "mmlu_pro", "gsm8k", "svamp", "multiarith", "addsub",
            "aqua", "singleeq"]


def test_registry_holds_the_contract_names_with_kinds_and_metrics():
    assert sorted(B.BENCHMARKS) == sorted(CONTRACT)
    kinds = {n: (b.kind, b.metric) for n, b in B.BENCHMARKS.items()}
    assert kinds["cola"] == ("mc", "mcc") and kinds["mmlu"] == ("mc", "macro_acc")
    assert kinds["mmlu_pro"] == ("mc", "macro_acc") and kinds["aqua"] == ("letter", "acc")
    assert all(kinds[n] == ("number", "acc") for n in ("gsm8k", "svamp", "multiarith", "addsub", "singleeq"))
    for b in B.BENCHMARKS.values():
        assert b.hf_name, b.name
        assert (B.fixture_path(b.fixture)), b.name  # the smoke fixture ships


def test_missing_local_file_is_one_clear_error(tmp_path):
    settings = B.EvalSettings(data_root=str(tmp_path))
    with pytest.raises(MoleConfigError) as info:
        B.check_available(["arc_e"], settings)
    msg = str(info.value)
    assert "eval.benchmarks: arc_e" in msg and str(tmp_path / "ARC-Easy" / "test.json") in msg
    assert "eval.source=hf" in msg and "allenai/ai2_arc" in msg
    with pytest.raises(MoleConfigError, match="unknown benchmark 'arc_easy'"):
        B.check_available(["arc_easy"], settings)
    with pytest.raises(MoleConfigError, match="has no validation split"):
        B.check_available(["boolq"], B.EvalSettings(data_root=str(tmp_path), split="validation"))
    with pytest.raises(MoleConfigError, match="eval.subset"):
        B.EvalSettings(subset="hmora8").check()


def test_mc_record_without_answer_format_is_rejected(tmp_path):
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "test.json").write_text(json.dumps([{"instruction": "q", "input": "", "output": "o",
                                                                  "answer": "solution1"}]))
    with pytest.raises(MoleConfigError, match="piqa: record 0 has no 'Answer format"):
        B.render_benchmarks(["piqa"], B.EvalSettings(data_root=str(tmp_path)), tmp_path / "out")


# ---- Hugging Face rows -> LLM-Adapters records (hand-made rows) ----


def test_converters_write_the_llm_adapters_layout():
    from mole.data import formats as F

    arc = F.arc({"question": "Which is a gas?", "choices": {"text": ["ice", "steam", "rock", "wood"],
                 "label": ["1", "2", "3", "4"]}, "answerKey": "2"})
    assert arc == {"instruction": "Please choose the correct answer to the question: Which is a gas?\n\nAnswer1: ice "
                   "Answer2: steam Answer3: rock Answer4: wood\n\nAnswer format: answer1/answer2/answer3/answer4",
                   "input": "", "output": "the correct answer is answer2", "answer": "answer2"}
    assert F.boolq({"question": "is ice cold", "answer": True, "passage": "p"})["instruction"] == (
        "Please answer the following question with true or false, question: is ice cold?\n\nAnswer format: true/false")
    gsm = F.gsm8k({"question": "Q?", "answer": "3 + 4 = <<3+4=7>>7 apples.\n#### 7"})
    assert gsm["output"] == "\nA: 3 + 4 = 7 apples. The answer is 7." and gsm["answer"] == "7"
    aqua = F.aqua({"question": "Q?", "options": ["A)1", "B)2", "C)3", "D)4", "E)5"], "rationale": "r", "correct": "C"})
    assert aqua["instruction"] == "Q? Answer Choices: (A) 1 (B) 2 (C) 3 (D) 4 (E) 5" and aqua["answer"] == "C"
    assert F.winogrande({"sentence": "s _", "option1": "x", "option2": "y", "answer": "2"})["answer"] == "option2"
    assert F.winogrande({"sentence": "s _", "option1": "x", "option2": "y", "answer": ""}) is None
    assert F.cola({"sentence": "s", "label": 1})["answer"] == "true"
    assert F.rte({"sentence1": "p", "sentence2": "h", "label": 1})["answer"] == "false"  # 1 = not_entailment
    assert F.mmlu({"question": "q", "subject": "astronomy", "choices": list("abcd"), "answer": 3})["subject"] == "astronomy"
    assert F.scienceqa({"question": "q", "choices": ["a", "b"], "answer": 0, "hint": "", "image": object()}) is None
    assert F.commonsenseqa({"question": "q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": ""}) is None
    assert F.siqa({"context": "c", "question": "q?", "answerA": "a", "answerB": "b", "answerC": "c",
                   "label": "3"})["answer"] == "answer3"
    assert F.piqa({"goal": "g", "sol1": "a", "sol2": "b", "label": 1})["answer"] == "solution2"


# ---- smoke evaluation through lm-eval on tiny_llama ----


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    from mole.build import build_mole_model
    from mole.config import compose_config
    from mole.recipes.evaluate import evaluate

    cfg = compose_config(["debug=smoke", "eval=fixtures", "eval.tasks=[]",
                          "eval.benchmarks=[arc_e,cola,mmlu,gsm8k,aqua,piqa,siqa]"])
    model, tokenizer, _ = build_mole_model(cfg)
    out = tmp_path_factory.mktemp("smoke_eval")
    return evaluate(model, tokenizer, cfg.eval, out), out


@pytest.mark.parametrize(("name", "metric"), [("arc_e", "acc"), ("cola", "mcc"), ("mmlu", "macro_acc"),
                                              ("gsm8k", "acc"), ("aqua", "acc"), ("piqa", "acc"), ("siqa", "acc")])
def test_each_kind_evaluates_in_smoke_mode(smoke_results, name, metric):
    from mole.report import JobRow

    results, _ = smoke_results
    values = results["results"][name]
    low = -1.0 if metric == "mcc" else 0.0
    assert low <= values[f"{metric},none"] <= 1.0
    assert results["n-samples"][name]["effective"] == 4  # debug=smoke: eval.limit=4
    # the report's headline for the benchmark is its metric
    assert JobRow("j", "finished", metrics={"eval": {name: values}}).eval_scores() == {
        f"{name} ({metric})": values[f"{metric},none"]}


def test_smoke_eval_scores_the_fixture_records(smoke_results):
    # the rendered task reads the shipped fixture, with the options of each record's Answer format line
    _, out = smoke_results
    docs = json.loads((out / B.RENDERED_SUBDIR / "data" / "siqa.json").read_text())
    fixture = json.loads(Path(B.fixture_path("three_test.json")).read_text())
    assert [d["instruction"] for d in docs] == [r["instruction"] for r in fixture]
    assert docs[0]["choices"] == [f"the correct answer is answer{i}" for i in (1, 2, 3)]
    assert [d["label"] for d in docs] == [int(r["answer"][-1]) - 1 for r in fixture]
    gen = (out / B.RENDERED_SUBDIR / "gsm8k.yaml").read_text()
    assert "generate_until" in gen and "max_gen_toks: 8" in gen


# ---- the real LLM-Adapters files, where present ----


@pytest.mark.skipif(not SHARED.is_dir(), reason="LLM-Adapters data not present")
def test_real_llm_adapters_test_files_load_through_the_registry():
    settings = B.EvalSettings(data_root=str(SHARED))
    B.check_available(["arc_e", "boolq", "gsm8k"], settings)
    arc = B.load_records("arc_e", settings)
    boolq = B.load_records("boolq", settings)
    gsm = B.load_records("gsm8k", settings)
    assert (len(arc), len(boolq), len(gsm)) == (2376, 3270, 1319)  # PROVENANCE.md
    assert all(r["answer"].lower() in B.answer_options(r["instruction"]) for r in arc + boolq)
    assert all(parse_gold_number(r["answer"]) is not None for r in gsm)
    assert parse_gold_number(gsm[0]["answer"]) == 576.0  # "576.0", the tile problem
    # HMoRA's ARC-E test subset is the whole test set (2376 of 2376)
    assert B.load_records("arc_e", B.EvalSettings(data_root=str(SHARED), subset="hmora")) == arc
