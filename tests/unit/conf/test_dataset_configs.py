"""The data / eval config groups of the papers' data sets: composition, smoke fixtures, sources, errors."""

from __future__ import annotations

import json

import pytest

from mole import CONF_DIR
from mole.config import compose_config
from mole.data import load_datasets
from mole.data.sources import answer_options
from mole.eval.benchmarks import BENCHMARKS
from mole.utils.errors import MoleConfigError

TRAINING_SETS = ["scienceqa", "commonsenseqa", "openbookqa", "mrpc", "cola", "rte", "arc_e", "arc_c", "boolq", "piqa",
                 "siqa", "hellaswag", "winogrande", "swag", "flan_v2", "commonsense15k", "commonsense170k", "math14k",
                 "mor_instruct"]


def _data_configs() -> list[str]:
    from pathlib import Path

    return sorted(p.stem for p in (Path(CONF_DIR) / "data").glob("*.yaml"))


def test_every_contract_training_set_has_a_config():
    assert set(TRAINING_SETS) <= set(_data_configs())


@pytest.mark.parametrize("name", _data_configs())
def test_data_config_composes_and_loads_its_smoke_fixture(name):
    cfg = compose_config([f"data={name}", "debug=smoke"])
    train, val = load_datasets(cfg.data, seed=0)
    assert train and val and cfg.data.smoke is True
    for bench in cfg.data.benchmarks:
        assert bench in BENCHMARKS, f"data={name} names an unknown benchmark {bench}"
    # a fixture of the right schema: multiple-choice sets train on records with an Answer format line
    kinds = {BENCHMARKS[b].kind for b in cfg.data.benchmarks}
    if kinds == {"mc"} and name != "flan_v2":  # Flan v2 is an instruction mixture, free text included
        assert all(answer_options(r["instruction"]) for r in train)
    if kinds and kinds <= {"number", "letter"}:
        assert all("The answer is" in r["output"] for r in train)


@pytest.mark.parametrize("name", TRAINING_SETS)
def test_training_set_names_local_file_and_hub_source(name):
    cfg = compose_config([f"data={name}", "data.root=/data/root"])
    assert cfg.data.source == "local" and str(cfg.data.path).startswith("/data/root/")
    assert cfg.data.hf_name and cfg.data.hf_split
    if cfg.data.hf_format:
        from mole.data.formats import CONVERTERS

        assert cfg.data.hf_format in CONVERTERS


def test_natural_test_sets_of_training_sets():
    def benches(name):
        return list(compose_config([f"data={name}"]).data.benchmarks)

    assert benches("scienceqa") == ["scienceqa"] and benches("cola") == ["cola"] and benches("siqa") == ["siqa"]
    assert benches("commonsense15k") == ["boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_e", "arc_c", "openbookqa"]
    assert benches("math14k") == ["gsm8k", "svamp", "multiarith", "addsub", "aqua", "singleeq"]


def test_eval_configs():
    def benches(*overrides):
        cfg = compose_config(list(overrides))
        return list(cfg.eval.tasks), list(cfg.eval.benchmarks), cfg.eval.subset

    assert benches("data=arc_c", "eval=same_as_data") == ([], ["arc_c"], None)
    assert benches("eval=commonsense8")[1] == ["boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_e", "arc_c",
                                               "openbookqa"]
    assert benches("eval=math6")[1] == ["gsm8k", "svamp", "multiarith", "addsub", "aqua", "singleeq"]
    assert benches("eval=dynmole9")[1] == ["rte", "arc_e", "arc_c", "boolq", "openbookqa", "piqa", "siqa", "hellaswag",
                                           "winogrande"]
    assert benches("eval=hmora7") == ([], ["mmlu", "mmlu_pro", "arc_c", "arc_e", "openbookqa", "swag", "commonsenseqa"],
                                      "hmora")


def test_eval_data_root_follows_data_root():
    cfg = compose_config(["data=arc_e", "data.root=/mnt/llm-adapters", "eval=commonsense8"])
    assert cfg.eval.data_root == "/mnt/llm-adapters"


def test_missing_local_training_file_names_data_path_and_the_way_out(tmp_path):
    cfg = compose_config(["data=boolq", f"data.root={tmp_path}"])
    with pytest.raises(MoleConfigError) as info:
        load_datasets(cfg.data, seed=0)
    msg = str(info.value)
    assert msg.startswith(f"data.path: {tmp_path}/boolq/train.json does not exist")
    assert "data.source=hf" in msg and "google/boolq" in msg


def test_local_training_file_is_read_from_the_root(tmp_path):
    (tmp_path / "boolq").mkdir()
    recs = [{"instruction": f"Please answer the following question with true or false, question: q{i}?\n\n"
             "Answer format: true/false", "input": "", "output": "the correct answer is true", "answer": "true"}
            for i in range(10)]
    (tmp_path / "boolq" / "train.json").write_text(json.dumps(recs))
    cfg = compose_config(["data=boolq", f"data.root={tmp_path}", "data.val_size=2"])
    train, val = load_datasets(cfg.data, seed=0)
    assert len(train) == 8 and len(val) == 2


def test_hf_source_uses_the_converter_offline(tmp_path):
    # the `datasets` json builder reads a local file of Hub-style rows; data.hf_format converts them
    rows = [{"question": f"q{i}", "choices": {"text": ["a", "b", "c", "d"], "label": ["A", "B", "C", "D"]},
             "answerKey": "ABCD"[i % 4]} for i in range(8)]
    path = tmp_path / "arc.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = compose_config(["data=arc_e", "data.source=hf", "data.hf_name=json", "data.hf_config=null",
                          f"+data.hf_kwargs.data_files={path}", "data.val_size=0"])
    train, _ = load_datasets(cfg.data, seed=0)
    assert [r["answer"] for r in train] == ["answer1", "answer2", "answer3", "answer4"] * 2
    assert train[0]["instruction"].endswith("Answer format: answer1/answer2/answer3/answer4")


def test_bad_source_is_rejected():
    cfg = compose_config(["data=arc_e", "data.source=web"])
    with pytest.raises(MoleConfigError, match="data.source must be null, local or hf"):
        load_datasets(cfg.data, seed=0)


def test_smoke_training_run_evaluates_the_natural_test_sets(tmp_path):
    """debug=smoke end to end: math14k -> the six math benchmarks by generation, on tiny_llama, offline."""
    from mole.recipes.train import run_train

    cfg = compose_config(["debug=smoke", "data=math14k", "eval=same_as_data"])
    metrics = run_train(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["finished"] and saved["steps"] == 2
    assert set(saved["eval"]) == {"gsm8k", "svamp", "multiarith", "addsub", "aqua", "singleeq"}
    assert all(0.0 <= v["acc,none"] <= 1.0 for v in saved["eval"].values())
    assert metrics["eval"] == saved["eval"]
