"""The benchmarks of the four papers' tables, as lm-eval tasks over LLM-Adapters-format records.

A :class:`Benchmark` says where its test (and validation) records come from — a local file under the
data root, in LLM-Adapters' folder layout (``ARC-Easy/test.json``), or a Hugging Face dataset converted
by :mod:`mole.data.formats` — how it is scored, and which shipped fixture stands in for it in smoke runs.

Kinds (``kind``):

* ``mc`` — multiple choice by log-likelihood, as lm-eval-harness scores it: the options are the answer
  tokens of the record's ``Answer format:`` line, each scored as the full response the model is trained
  to produce, ``"the correct answer is answer2"`` (LLM-Adapters' output format).
* ``number`` — greedy generation, then the last number of the text against the gold number
  (GSM8K, SVAMP, MultiArith, AddSub, SingleEq; LLM-Adapters' ``evaluate.py``, MoA Table 2).
* ``letter`` — greedy generation, then the option letter A-E (AQuA).

Metrics (``metric``): ``acc``; ``mcc`` (Matthews correlation, CoLA in MoR Table 1); ``macro_acc``
(the mean of per-subject accuracies: MMLU / MMLU-Pro, HMoRA Table 7). Each lands in lm-eval's results
as ``"<metric>,none"`` under the benchmark's name.

Subsets (``eval.subset=hmora``): HMoRA Table 8's fixed-size random validation / test subsets, drawn with
``eval.subset_seed``; a validation and a test subset taken from the same original split (SWAG,
CommonsenseQA) are disjoint (one permutation: the first ``n_val`` records, then the next ``n_test``).

:func:`render_benchmarks` writes what lm-eval reads into a directory of its own: the records (one JSON
file per benchmark, with ``choices`` and ``label`` added for ``mc``), one task YAML per benchmark, and the
prompt they include. Each task YAML includes (lm-eval's ``include:``) the shipped settings of its kind and
metric (``mole/eval/tasks/benchmarks/``, whose ``!function`` tags reach :mod:`mole.eval.metrics`).
"""

from __future__ import annotations

import glob
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mole.data.prompts import ALPACA_STOP
from mole.data.sources import answer_options, fixture_path, load_hf_records, read_records
from mole.eval.harness import PROMPT_INCLUDE, write_prompt_include
from mole.utils.errors import MoleConfigError

KINDS = ("mc", "number", "letter")
METRICS = ("acc", "mcc", "macro_acc")
SPLITS = ("test", "validation")
SOURCES = ("local", "hf")
SUBSET_SCHEMES = ("hmora",)
RENDERED_SUBDIR = "lm_eval_benchmarks"
#: Raw files of LLM-Adapters (Hu et al., 2023), for the sets it ships that have no Hub copy in its format.
LLM_ADAPTERS_RAW = "https://raw.githubusercontent.com/AGI-Edgerunners/LLM-Adapters/main"


@dataclass(frozen=True)
class Split:
    """Where one split's records come from: ``local`` under the data root, ``hf_split`` on the Hub."""

    local: str
    hf_split: str
    hf_kwargs: dict[str, Any] | None = None  # e.g. data_files for the ``json`` builder


@dataclass(frozen=True)
class Subset:
    """``size`` records of split ``of`` after skipping ``offset`` in its seeded permutation."""

    of: str
    size: int
    offset: int = 0


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    kind: str
    metric: str
    fixture: str                      # shipped smoke fixture (mole/data/fixtures/) of the same schema
    test: Split
    validation: Split | None = None
    hf_name: str | None = None
    hf_config: str | None = None
    hf_format: str | None = None      # converter in mole.data.formats; None: rows are LLM-Adapters records
    subsets: dict[str, dict[str, Subset]] = field(default_factory=dict)
    note: str = ""

    def split(self, name: str) -> Split:
        if name == "test":
            return self.test
        if self.validation is None:
            raise MoleConfigError(f"eval.split=validation: benchmark {self.name!r} has no validation split "
                                  "(use eval.subset=hmora where HMoRA defines one, or eval.split=test)")
        return self.validation


def _raw(folder: str) -> Split:
    """A test set that LLM-Adapters ships (``dataset/<folder>/test.json``), online through ``json``."""
    return Split(f"{folder}/test.json", "train", {"data_files": f"{LLM_ADAPTERS_RAW}/dataset/{folder}/test.json"})


def _hmora(val: Subset, test: Subset) -> dict[str, dict[str, Subset]]:
    return {"hmora": {"validation": val, "test": test}}


_B = Benchmark
BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in [
    # ---- MoR Table 1-3 ----
    _B("scienceqa", "ScienceQA (text-only)", "mc", "acc", "mc_test.json",
       Split("ScienceQA/test.json", "test"), Split("ScienceQA/validation.json", "validation"),
       "derek-thomas/ScienceQA", None, "scienceqa", note="questions without an image"),
    _B("commonsenseqa", "CommonsenseQA", "mc", "acc", "mc_test.json",
       Split("commonsense_qa/test.json", "validation"), None,
       "tau/commonsense_qa", None, "commonsenseqa",
       subsets=_hmora(Subset("test", 300, 0), Subset("test", 900, 300)),
       note="the labeled validation split is the test set (the Hub test split has no labels)"),
    _B("openbookqa", "OpenBookQA", "mc", "acc", "mc_test.json",
       Split("openbookqa/test.json", "test"), Split("openbookqa/validation.json", "validation"),
       "allenai/openbookqa", "main", "openbookqa",
       subsets=_hmora(Subset("validation", 500), Subset("test", 500))),
    _B("mrpc", "GLUE MRPC", "mc", "acc", "glue_test.json",
       Split("glue/mrpc/test.json", "validation"), None, "nyu-mll/glue", "mrpc", "mrpc",
       note="GLUE validation split as the test set (the GLUE test labels are hidden)"),
    _B("cola", "GLUE CoLA", "mc", "mcc", "glue_test.json",
       Split("glue/cola/test.json", "validation"), None, "nyu-mll/glue", "cola", "cola",
       note="GLUE validation split as the test set; Matthews correlation"),
    _B("rte", "GLUE RTE", "mc", "acc", "glue_test.json",
       Split("glue/rte/test.json", "validation"), None, "nyu-mll/glue", "rte", "rte",
       note="GLUE validation split as the test set"),
    # ---- commonsense (MoA, DynMoLE, HMoRA) ----
    _B("arc_e", "ARC-Easy", "mc", "acc", "mc_test.json",
       Split("ARC-Easy/test.json", "test"), Split("ARC-Easy/validation.json", "validation"),
       "allenai/ai2_arc", "ARC-Easy", "arc",
       subsets=_hmora(Subset("validation", 570), Subset("test", 2376))),
    _B("arc_c", "ARC-Challenge", "mc", "acc", "mc_test.json",
       Split("ARC-Challenge/test.json", "test"), Split("ARC-Challenge/validation.json", "validation"),
       "allenai/ai2_arc", "ARC-Challenge", "arc",
       subsets=_hmora(Subset("validation", 299), Subset("test", 1172))),
    _B("boolq", "BoolQ", "mc", "acc", "yesno_test.json",
       Split("boolq/test.json", "validation"), None, "google/boolq", None, "boolq",
       note="validation split as the test set, as LLM-Adapters"),
    _B("piqa", "PIQA", "mc", "acc", "two_test.json",
       Split("piqa/test.json", "validation"), None, "baber/piqa", None, "piqa"),
    _B("siqa", "Social IQa", "mc", "acc", "three_test.json",
       Split("social_i_qa/test.json", "validation"), None, "lighteval/siqa", None, "siqa"),
    _B("hellaswag", "HellaSwag", "mc", "acc", "mc_test.json",
       Split("hellaswag/test.json", "validation"), None, "Rowan/hellaswag", None, "hellaswag"),
    _B("winogrande", "WinoGrande", "mc", "acc", "two_test.json",
       Split("winogrande/test.json", "validation"), None, "allenai/winogrande", "winogrande_xl", "winogrande"),
    _B("swag", "SWAG", "mc", "acc", "mc_test.json",
       Split("swag/test.json", "validation"), None, "allenai/swag", "regular", "swag",
       subsets=_hmora(Subset("test", 300, 0), Subset("test", 2000, 300)),
       note="the labeled validation split is the test set"),
    # ---- HMoRA ----
    _B("mmlu", "MMLU", "mc", "macro_acc", "mmlu_test.json",
       Split("mmlu/test.json", "test"), Split("mmlu/validation.json", "validation"), "cais/mmlu", "all", "mmlu",
       subsets=_hmora(Subset("validation", 300), Subset("test", 2000))),
    _B("mmlu_pro", "MMLU-Pro", "mc", "macro_acc", "mmlu_test.json",
       Split("mmlu_pro/test.json", "test"), Split("mmlu_pro/validation.json", "validation"),
       "TIGER-Lab/MMLU-Pro", None, "mmlu_pro",
       subsets=_hmora(Subset("validation", 70), Subset("test", 2000)), note="macro accuracy over categories"),
    # ---- math (MoA Table 2) ----
    _B("gsm8k", "GSM8K", "number", "acc", "math_test.json",
       Split("gsm8k/test.json", "test"), None, "openai/gsm8k", "main", "gsm8k"),
    _B("svamp", "SVAMP", "number", "acc", "math_test.json", _raw("SVAMP"), None, "json"),
    _B("multiarith", "MultiArith", "number", "acc", "math_test.json", _raw("MultiArith"), None, "json"),
    _B("addsub", "AddSub", "number", "acc", "math_test.json", _raw("AddSub"), None, "json"),
    _B("singleeq", "SingleEq", "number", "acc", "math_test.json", _raw("SingleEq"), None, "json"),
    _B("aqua", "AQuA", "letter", "acc", "aqua_test.json",
       Split("AQuA/test.json", "test"), None, "deepmind/aqua_rat", "raw", "aqua"),
]}


def get(name: str) -> Benchmark:
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise MoleConfigError(f"eval.benchmarks: unknown benchmark {name!r}; known: {sorted(BENCHMARKS)}") from None


# ---- choosing records ----


def fixed_subset(records: Sequence[Any], size: int, seed: int, offset: int = 0) -> list[Any]:
    """``size`` records at ``[offset, offset + size)`` of a ``seed``-ed permutation, in their original order.

    Subsets of one list with the same seed and non-overlapping ranges are disjoint. ``offset + size``
    beyond the list is an error (the requested subset does not exist).
    """
    n = len(records)
    if size < 1 or offset < 0:
        raise ValueError(f"subset size must be positive and offset non-negative, got size={size}, offset={offset}")
    if offset + size > n:
        raise MoleConfigError(f"a subset of {size} records after {offset} needs {offset + size} records; the split has {n}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    chosen = sorted(order[offset:offset + size])
    return [records[i] for i in chosen]


@dataclass
class EvalSettings:
    """The ``eval`` keys that say which records of a benchmark are evaluated."""

    split: str = "test"
    subset: str | None = None
    subset_seed: int = 1234
    source: str = "local"
    data_root: str = "data"
    smoke: bool = False
    max_gen_toks: int = 256

    @classmethod
    def from_config(cls, eval_cfg: Any) -> EvalSettings:
        get_ = eval_cfg.get
        out = cls(
            split=get_("split") or "test",
            subset=get_("subset"),
            subset_seed=get_("subset_seed", 1234),
            source=get_("source") or "local",
            data_root=str(get_("data_root") or "data"),
            smoke=bool(get_("smoke", False)),
            max_gen_toks=get_("max_gen_toks", 256),
        )
        out.check()
        return out

    def check(self) -> None:
        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if self.split not in SPLITS:
            raise MoleConfigError(f"eval.split must be one of {list(SPLITS)}, got {self.split!r}")
        if self.subset is not None and self.subset not in SUBSET_SCHEMES:
            raise MoleConfigError(f"eval.subset must be null or one of {list(SUBSET_SCHEMES)}, got {self.subset!r}")
        if self.source not in SOURCES:
            raise MoleConfigError(f"eval.source must be one of {list(SOURCES)}, got {self.source!r}")
        if not is_int(self.subset_seed):
            raise MoleConfigError(f"eval.subset_seed must be an integer, got {self.subset_seed!r}")
        if not (is_int(self.max_gen_toks) and self.max_gen_toks >= 1):
            raise MoleConfigError(f"eval.max_gen_toks must be a positive integer, got {self.max_gen_toks!r}")


def _where(bench: Benchmark, split_name: str, settings: EvalSettings) -> tuple[Split, Subset | None]:
    """The original split to read and the subset of it to keep, for ``settings.split``."""
    if settings.subset:
        subset = bench.subsets.get(settings.subset, {}).get(settings.split)
        if subset is not None:
            return bench.split(subset.of), subset
    return bench.split(split_name), None


def local_file(bench: Benchmark, split: Split, root: str | Path) -> Path:
    return Path(root).expanduser() / split.local


def _missing_hint(bench: Benchmark, split: Split, root: str | Path) -> str:
    online = (f"or, online, load it from the Hugging Face Hub with eval.source=hf ({bench.hf_name}"
              + (f", {bench.hf_config}" if bench.hf_config else "") + f", split {split.hf_split})") if bench.hf_name else ""
    return (f"put the {bench.title} file there in the LLM-Adapters format (eval.data_root / $MOLE_DATA_DIR sets "
            f"the folder, now {root}) {online}; debug=smoke evaluates on a shipped fixture instead")


def check_available(names: Sequence[str], settings: EvalSettings) -> None:
    """Before training: every benchmark is known, has the requested split, and (local) its file exists."""
    for name in names:
        bench = get(name)
        split, _ = _where(bench, settings.split, settings)
        if settings.smoke or settings.source == "hf":
            continue
        path = local_file(bench, split, settings.data_root)
        if not path.is_file():
            raise MoleConfigError(f"eval.benchmarks: {name}: {path} does not exist; "
                                  + _missing_hint(bench, split, settings.data_root))


def load_records(name: str, settings: EvalSettings) -> list[dict[str, str]]:
    """The records of benchmark ``name`` that are evaluated under ``settings`` (split, subset, source)."""
    bench = get(name)
    split, subset = _where(bench, settings.split, settings)
    key = f"eval.benchmarks: {name}"
    if settings.smoke:
        records = read_records(fixture_path(bench.fixture), key)
    elif settings.source == "hf":
        if not bench.hf_name:
            raise MoleConfigError(f"{key} has no Hugging Face source; use a local file (eval.source=local)")
        records = load_hf_records(bench.hf_name, bench.hf_config, split.hf_split, None, split.hf_kwargs,
                                  fmt=bench.hf_format, key=f"eval.benchmarks.{name}")
    else:
        path = local_file(bench, split, settings.data_root)
        records = read_records(path, key, _missing_hint(bench, split, settings.data_root))
    if subset is not None and not settings.smoke:
        records = fixed_subset(records, subset.size, settings.subset_seed, subset.offset)
    return records


# ---- lm-eval task files ----


def _mc_doc(rec: dict[str, str], where: str, i: int) -> dict[str, Any]:
    options = answer_options(rec["instruction"])
    if not options:
        raise MoleConfigError(f"{where}: record {i} has no 'Answer format: a/b/...' line; a multiple-choice "
                              "benchmark needs one (LLM-Adapters format)")
    answer = rec["answer"].strip().lower()
    if answer not in options:
        raise MoleConfigError(f"{where}: record {i} has answer {rec['answer']!r}, not one of {options}")
    return {**rec, "choices": [f"the correct answer is {o}" for o in options], "label": options.index(answer)}


#: The settings each benchmark's task includes, one file per kind and metric, beside the functions
#: (``hooks.py``) their ``!function`` tags name.
TASK_SETTINGS_DIR = Path(__file__).resolve().parent / "tasks" / "benchmarks"
_SETTINGS = {("mc", "acc"): "_mc_acc_yaml", ("mc", "mcc"): "_mc_mcc_yaml", ("mc", "macro_acc"): "_mc_macro_acc_yaml",
             ("number", "acc"): "_number_yaml", ("letter", "acc"): "_letter_yaml"}


def task_config(bench: Benchmark, data_file: Path, max_gen_toks: int) -> dict[str, Any]:
    """The lm-eval task of one benchmark over ``data_file`` (records as :func:`render_benchmarks` writes).

    The task includes the settings of its kind and metric (:data:`TASK_SETTINGS_DIR`) and the prompt of
    its directory (:func:`mole.eval.harness.write_prompt_include`); it adds its name, its data and, for
    generation, the budget and the template's stop sequences. ``datasets`` reads ``data_files`` as glob
    patterns, so the path is glob-escaped: a run directory named after list overrides
    (``eval.benchmarks=[boolq]``) holds ``[...]``, which would match no file.
    """
    config: dict[str, Any] = {
        "include": [(TASK_SETTINGS_DIR / _SETTINGS[bench.kind, bench.metric]).as_posix(), PROMPT_INCLUDE],
        "task": bench.name,
        "output_type": "multiple_choice" if bench.kind == "mc" else "generate_until",
        "dataset_kwargs": {"data_files": {"test": glob.escape(data_file.as_posix())}},
    }
    if bench.kind != "mc":
        config["generation_kwargs"] = {"until": list(ALPACA_STOP), "max_gen_toks": int(max_gen_toks), "do_sample": False}
    return config


def render_benchmarks(names: Sequence[str], settings: EvalSettings, dest_dir: Path,
                      prompt: Callable[[dict[str, str]], str] | None = None) -> Path:
    """Write the records, task YAMLs and prompt of ``names`` into ``dest_dir`` (an lm-eval include path).

    ``prompt`` renders a record's prompt with the template the run was trained with
    (:func:`mole.data.prompts.record_prompt`); ``None`` is the Alpaca template.
    """
    dest = Path(dest_dir).expanduser().resolve()
    data_dir = dest / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for stale in dest.glob("*.yaml"):  # an include path is scanned whole: only this evaluation's tasks
        stale.unlink()
    write_prompt_include(dest, rendered_prompt=prompt is not None)
    for name in names:
        bench = get(name)
        records = load_records(name, settings)
        if bench.kind == "mc":
            docs = [_mc_doc(r, f"eval.benchmarks: {name}", i) for i, r in enumerate(records)]
        else:
            docs = [dict(r) for r in records]
        if prompt is not None:
            docs = [{**d, "prompt": prompt(d)} for d in docs]
        data_file = data_dir / f"{name}.json"
        data_file.write_text(json.dumps(docs, ensure_ascii=False), encoding="utf-8")
        header = (f"# {bench.title}: written by mole (mole.eval.benchmarks) for this evaluation; kind {bench.kind}, "
                  f"metric {bench.metric}.\n")
        task = yaml.safe_dump(task_config(bench, data_file, settings.max_gen_toks), sort_keys=False, allow_unicode=True)
        (dest / f"{name}.yaml").write_text(header + task, encoding="utf-8")
    return dest
