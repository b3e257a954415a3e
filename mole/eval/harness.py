"""Offline lm-evaluation-harness runs on an in-memory model.

Design
------
The machines that train and evaluate ``mole`` models may have no access to the Hugging Face
Hub, so evaluation never names a Hub dataset or a Hub model:

* **Model.** The model under evaluation is the live, in-memory ``transformers``
  ``PreTrainedModel`` (a ``LlamaForCausalLM`` whose ``nn.Linear`` layers ``mole`` replaced in
  place with adapter / mixture modules). It is wrapped with
  ``lm_eval.models.huggingface.HFLM(pretrained=<model object>, tokenizer=<tokenizer object>)``;
  lm-eval then sees an ordinary HF causal LM. It neither reloads, moves nor casts the
  model: the model stays on the device and in the dtype the caller left it in.
* **Tasks.** Tasks are local YAML files with ``dataset_path: json`` and
  ``dataset_kwargs: {data_files: {...}}``, so ``datasets`` reads local JSON files and no
  download is attempted. lm-eval's built-in task names point at Hub datasets: they are
  indexed only when a requested task is not local (``include_defaults=None``, the default),
  and then need the Hub or a filled ``datasets`` cache; offline, that ends in one clear error.
* **Shipped tasks.** ``mole/eval/tasks/*.yaml`` are *templates*: ``data_files`` must be
  absolute paths while the checkout's location varies, so the templates carry the token
  ``@FIXTURES_DIR@`` (no clash with the Jinja that lm-eval itself evaluates in
  ``doc_to_text``), and :func:`render_shipped_tasks` writes copies with the absolute fixtures
  directory substituted into a directory of their own (by default
  ``<output_dir>/lm_eval_tasks``), which is handed to lm-eval's ``TaskManager`` as an
  ``include_path``. The template directory itself must never be an ``include_path``.
* **Prompt.** The prompt (``doc_to_text``) is no task's own: :func:`write_prompt_include` writes it
  into each rendered task directory as ``_prompt_yaml``, which the tasks include (lm-eval's
  ``include:``). It is the exact Alpaca / LLM-Adapters training template of
  ``mole.data.prompts`` in Jinja (:func:`mole.data.prompts.alpaca_jinja`), or, for the other
  templates, ``{{prompt}}`` over records that carry their prompt rendered in Python. Each choice is
  scored as the full training response, ``"the correct answer is answerN"`` /
  ``"... true|false"``, with ``target_delimiter: ""`` because the prompt ends in a newline. The
  settings the shipped tasks share are in ``_fixture_mc_yaml`` beside them, also included.

Shipped tasks: ``mole_mc`` (4-way multiple choice), ``mole_yesno`` (true/false) and the group
``mole_fixtures`` over both (per-task results plus a size-weighted mean). Metrics: ``acc``
and ``acc_norm`` (log-likelihood normalised by the choice's byte length).

Side effects of lm-eval 0.4.13 that :func:`evaluate_model` undoes or prevents, so that it can
run in the middle of training: ``HFLM.__init__`` calls ``model.eval()`` (every module's
``training`` flag is restored afterwards) and ``model.tie_weights()`` (suppressed: see
``_tie_weights_disabled``) and gives a tokenizer without a pad token one (reset afterwards);
``simple_evaluate`` reseeds the global python/numpy/torch RNGs (their states are restored).
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import random
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

import mole
from mole.data.prompts import alpaca_jinja, record_question
from mole.routers.context import routing_inputs
from mole.routers.hybrid import TaskEncoder
from mole.utils.errors import MoleConfigError

logger = logging.getLogger(__name__)

SHIPPED_TASKS: tuple[str, ...] = ("mole_mc", "mole_yesno")
SHIPPED_GROUPS: tuple[str, ...] = ("mole_fixtures",)

#: Token in the shipped task templates standing for the absolute fixtures directory.
FIXTURES_PLACEHOLDER = "@FIXTURES_DIR@"
#: Where the task templates live (inside the package; never an lm-eval include_path).
TASK_TEMPLATES_DIR = Path(__file__).resolve().parent / "tasks"
#: Sub-directory of ``output_dir`` that :func:`evaluate_model` renders the shipped tasks into.
RENDERED_TASKS_SUBDIR = "lm_eval_tasks"
RESULTS_FILENAME = "results.json"
#: The file of a rendered task directory that holds the prompt; its tasks include it.
PROMPT_INCLUDE = "_prompt_yaml"

_PLACEHOLDER_FILE_RE = re.compile(re.escape(FIXTURES_PLACEHOLDER) + r"/([^\"'\s]+)")


def default_fixtures_dir() -> Path:
    """``mole/data/fixtures`` of the installed (editable) package."""
    return Path(mole.__file__).resolve().parent / "data" / "fixtures"


def write_prompt_include(dest_dir: Path, rendered_prompt: bool = False) -> Path:
    """Write ``dest_dir/_prompt_yaml``: the ``doc_to_text`` that the task YAMLs there include.

    ``rendered_prompt``: the records carry their prompt (a ``prompt`` field, rendered in Python with the
    run's template); otherwise the Alpaca template in Jinja, :func:`mole.data.prompts.alpaca_jinja`.
    """
    path = Path(dest_dir) / PROMPT_INCLUDE
    doc_to_text = "{{prompt}}" if rendered_prompt else alpaca_jinja()
    path.write_text("# Written by mole (mole.eval.harness.write_prompt_include): the prompt of the tasks here.\n"
                    + yaml.safe_dump({"doc_to_text": doc_to_text}, allow_unicode=True, width=1 << 16),
                    encoding="utf-8")
    return path


def render_shipped_tasks(dest_dir: Path, fixtures_dir: Path | None = None,
                         prompt: Callable[[dict[str, str]], str] | None = None) -> Path:
    """Write the shipped task YAMLs into ``dest_dir`` with the fixtures path filled in.

    Args:
        dest_dir: Directory to write into (created if missing). Give it a directory of its
            own: lm-eval indexes every ``*.yaml`` below an include path, recursively.
        fixtures_dir: Directory holding ``mc_test.json``, ``yesno_test.json`` (and the
            ``*_train.json`` files used for few-shot examples). Defaults to
            ``mole/data/fixtures``.

        prompt: Renders a record's prompt with the template the run was trained with
            (:func:`mole.data.prompts.record_prompt`). ``None``: the Alpaca template in Jinja.
            Otherwise the data files are copied into ``dest_dir/data`` with a ``prompt`` field
            and the tasks read it (``doc_to_text: "{{prompt}}"``).

    Returns:
        ``dest_dir``, ready to be passed to ``lm_eval.tasks.TaskManager(include_path=...)``.

    Raises:
        FileNotFoundError: If a data file that a template refers to is missing.
    """
    fixtures = Path(fixtures_dir) if fixtures_dir is not None else default_fixtures_dir()
    fixtures = fixtures.expanduser().resolve()
    dest = Path(dest_dir).expanduser().resolve()
    if dest == TASK_TEMPLATES_DIR:
        raise ValueError(f"refusing to render the task templates over themselves ({dest})")

    # the tasks (*.yaml) and the settings they include (_*_yaml, which lm-eval does not index as tasks)
    templates = sorted([*TASK_TEMPLATES_DIR.glob("*.yaml"), *TASK_TEMPLATES_DIR.glob("_*_yaml")])
    if not templates:
        raise FileNotFoundError(f"no task templates found in {TASK_TEMPLATES_DIR}")

    data_dir = fixtures if prompt is None else dest / "data"
    # The placeholder sits inside YAML double-quoted scalars; a JSON string body is a valid
    # YAML double-quoted body, so quotes/backslashes/non-ASCII in the path stay intact. datasets
    # reads data_files as glob patterns, hence glob.escape (a directory named "x=[a]" exists).
    escaped = json.dumps(glob.escape(data_dir.as_posix()), ensure_ascii=False)[1:-1]

    missing: list[str] = []
    rendered: dict[str, str] = {}
    for template in templates:
        text = template.read_text(encoding="utf-8")
        missing += [
            str(fixtures / name)
            for name in _PLACEHOLDER_FILE_RE.findall(text)
            if not (fixtures / name).is_file()
        ]
        rendered[template.name] = text.replace(FIXTURES_PLACEHOLDER, escaped)
    if missing:
        missing_list = ", ".join(sorted(set(missing)))
        raise FileNotFoundError(f"data missing for the shipped lm-eval tasks: {missing_list}")

    dest.mkdir(parents=True, exist_ok=True)
    if prompt is not None:
        data_dir.mkdir(exist_ok=True)
        for name in sorted({n for t in templates for n in _PLACEHOLDER_FILE_RE.findall(t.read_text(encoding="utf-8"))}):
            records = json.loads((fixtures / name).read_text(encoding="utf-8"))
            docs = [{**r, "prompt": prompt(r)} for r in records]
            (data_dir / name).write_text(json.dumps(docs, ensure_ascii=False), encoding="utf-8")
    for name, text in rendered.items():
        (dest / name).write_text(text, encoding="utf-8")
    write_prompt_include(dest, rendered_prompt=prompt is not None)
    return dest


def include_paths(include_path: str | Path | Sequence[str | Path] | None) -> list[Path]:
    if include_path is None:
        return []
    if isinstance(include_path, (str, Path)):
        items: Iterable[str | Path] = [include_path]
    else:  # list / tuple / omegaconf ListConfig
        items = list(include_path)
    paths = []
    for item in items:
        path = Path(str(item)).expanduser().resolve()
        if path == TASK_TEMPLATES_DIR:
            raise MoleConfigError(
                f"eval.include_path must not be the task template directory {path}: its YAMLs "
                f"hold the {FIXTURES_PLACEHOLDER} placeholder (the shipped tasks are always "
                "included, rendered)"
            )
        if not path.is_dir():
            raise MoleConfigError(
                f"eval.include_path entry {str(item)!r} is not a directory (lm-eval scans an "
                "include_path directory recursively for task *.yaml files)"
            )
        paths.append(path)
    return paths


def _local_task_names(task_manager: Any) -> list[str]:
    """Names (tasks, groups, tags) that come from include paths, not lm-eval's built-ins."""
    import lm_eval.tasks

    builtin_root = Path(lm_eval.tasks.__file__).resolve().parent
    index = task_manager.task_index

    def from_yaml_outside_builtins(entry: Any) -> bool:
        path = getattr(entry, "yaml_path", None)
        return path is not None and not Path(path).resolve().is_relative_to(builtin_root)

    names = []
    for name, entry in index.items():
        if from_yaml_outside_builtins(entry) or (
            getattr(entry, "yaml_path", None) is None  # a tag: local if one member is
            and any(
                member in index and from_yaml_outside_builtins(index[member])
                for member in getattr(entry, "tags", ())
            )
        ):
            names.append(name)
    return sorted(names)


@contextlib.contextmanager
def _preserve_rng_state() -> Iterator[None]:
    """simple_evaluate() reseeds python/numpy/torch global RNGs (0/1234/1234); undo that so an
    evaluation in the middle of training does not reset dropout masks, shuffling, etc."""
    py_state, np_state = random.getstate(), np.random.get_state()
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


@contextlib.contextmanager
def _tie_weights_disabled(model: Any) -> Iterator[None]:
    """HFLM.__init__ calls model.tie_weights(). With config.tie_word_embeddings=True that
    re-points ``lm_head.weight`` at the input embedding: it would overwrite a head that was
    untied on purpose, and on an ``lm_head`` replaced by a wrapper module it registers a stray
    ``lm_head.weight`` parameter. The model is already tied as it should be; skip the call."""
    own = model.__dict__.get("tie_weights", None)
    object.__setattr__(model, "tie_weights", lambda *args, **kwargs: None)
    try:
        yield
    finally:
        if own is None:
            model.__dict__.pop("tie_weights", None)
        else:
            object.__setattr__(model, "tie_weights", own)


@contextlib.contextmanager
def _hub_errors_explained(builtin_tasks: list[str]) -> Iterator[None]:
    """A built-in lm-eval task whose dataset cannot be fetched (offline) ends in one clear line."""
    try:
        yield
    except ConnectionError as err:
        if not builtin_tasks:
            raise
        raise MoleConfigError(
            f"eval.tasks: {builtin_tasks} are lm-eval's built-in tasks, whose data comes from the Hugging Face "
            f"Hub, which is not reachable ({str(err).splitlines()[0]}); offline, use the shipped tasks "
            f"{list(SHIPPED_TASKS)} or eval.include_path with task YAMLs over local files"
        ) from None


def _is_task_yaml_file(spec: str) -> bool:
    # lm-eval also accepts the path of a task YAML file as a task name.
    return spec.endswith((".yaml", ".yml")) and Path(spec).expanduser().is_file()


def evaluate_model(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    *,
    output_dir: Path,
    include_path: str | Path | Sequence[str | Path] | None = None,
    batch_size: int = 8,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    max_length: int | None = None,
    fixtures_dir: str | Path | None = None,
    include_defaults: bool | None = None,
    prompt: Callable[[dict[str, str]], str] | None = None,
) -> dict:
    """Run lm-eval tasks on an in-memory HF causal LM, offline; write ``results.json``.

    Args:
        model: A ``transformers.PreTrainedModel`` (causal LM), possibly with custom modules.
            It is evaluated where it is (device, dtype unchanged), in eval mode under
            ``torch.no_grad``; each module's previous ``training`` flag is restored afterwards.
        tokenizer: The matching ``PreTrainedTokenizer(Fast)``. lm-eval encodes with the
            tokenizer's own default special-token behaviour (a tokenizer that adds no BOS gets
            no BOS), so evaluation tokenises like ``tokenizer(text)`` does in training.
        tasks: Task, group or tag names known from the shipped tasks or ``include_path``
            (or paths of task YAML files).
        output_dir: Directory for ``results.json`` and the rendered shipped task YAMLs
            (``output_dir/lm_eval_tasks``).
        include_path: Extra directory (or list of directories) with the user's task YAMLs;
            they take precedence over shipped tasks of the same name.
        batch_size: Requests per forward pass.
        limit: At most this many documents per task (a float < 1: that fraction).
        num_fewshot: Few-shot examples per prompt (shipped tasks draw them from the
            ``*_train.json`` fixtures); ``None`` keeps each task's default (0).
        max_length: Context length; ``None`` takes ``config.max_position_embeddings``.
        fixtures_dir: Data directory for the shipped tasks (default ``mole/data/fixtures``).
        include_defaults: Index lm-eval's built-in tasks too: ``None`` (default) only when a
            requested task is not local; ``True`` always; ``False`` never. Built-in tasks fetch
            Hub datasets, so they need the Hub or a filled ``datasets`` cache.
        prompt: The training template's prompt of a record, for the shipped tasks
            (:func:`render_shipped_tasks`); ``None``: Alpaca.

    Returns:
        The lm-eval results dict, made JSON-serialisable the way lm-eval writes its own
        output (``default=lm_eval.utils.handle_non_serializable``). Per-task metrics are in
        ``results["results"][task]["acc,none"]`` / ``["acc_norm,none"]`` (and
        ``"..._stderr,none"``), group aggregates in ``results["groups"]``, document counts
        in ``results["n-samples"][task] == {"original": N, "effective": n}``.

    Raises:
        ValueError: If a requested task is unknown (before anything is run), or an
            ``include_path`` entry is not a directory.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    if isinstance(tasks, str):
        tasks = [tasks]
    task_names = [str(t) for t in tasks]
    if not task_names:
        raise MoleConfigError(
            f"eval.tasks is empty: name at least one task, e.g. {list(SHIPPED_TASKS)}"
        )

    output_dir = Path(output_dir).expanduser().resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    user_paths = include_paths(include_path)
    rendered = render_shipped_tasks(output_dir / RENDERED_TASKS_SUBDIR, fixtures_dir, prompt)
    # Later include paths override earlier ones in lm-eval 0.4.x, so user tasks win.
    paths = [str(rendered), *map(str, user_paths)]
    task_manager = TaskManager(include_path=paths, include_defaults=bool(include_defaults))

    def unknown_in(manager: Any) -> list[str]:
        known = set(manager.all_tasks)
        return [t for t in task_names if t not in known and not _is_task_yaml_file(t)]

    unknown = unknown_in(task_manager)
    builtin: list[str] = []  # requested tasks found only among lm-eval's built-in ones
    if unknown and include_defaults is None:
        # Not a local task: index lm-eval's built-in tasks too (~10-20 s), so standard names such as
        # arc_easy work for users who are online (their data comes from the Hugging Face Hub).
        task_manager = TaskManager(include_path=paths, include_defaults=True)
        still_unknown = unknown_in(task_manager)
        builtin = [t for t in unknown if t not in still_unknown]
        unknown = still_unknown
    if unknown:
        where = "the shipped tasks" + (
            f" or eval.include_path ({', '.join(map(str, user_paths))})" if user_paths else ""
        )
        builtins = "; lm-eval's built-in tasks are not indexed" if include_defaults is False else ""
        raise MoleConfigError(
            f"unknown lm-eval task(s) in eval.tasks: {unknown}; not found in {where}. "
            f"Available local tasks: {_local_task_names(task_manager)}. Fix eval.tasks, or set "
            f"eval.include_path to a directory of task YAMLs defining them (a YAML that fails "
            f"to parse is skipped silently){builtins}."
        )

    if all(getattr(tokenizer, f"{t}_token_id", None) is None for t in ("bos", "eos")):
        # HFLM uses BOS (else EOS) as prefix token and crashes deep inside without either.
        raise ValueError("the tokenizer has neither a BOS nor an EOS token; HFLM needs one")

    # HFLM's constructor calls model.eval(); remember every module's mode so that a
    # partly-frozen model comes back exactly as it was.
    modes = [(module, module.training) for module in model.modules()]
    pad_token_before = getattr(tokenizer, "pad_token", None)
    try:
        model.eval()
        lm_class = _raw_question_lm(HFLM) if _reads_raw_questions(model) else HFLM
        with _tie_weights_disabled(model):
            lm = lm_class(
                pretrained=model,
                tokenizer=tokenizer,
                batch_size=batch_size,
                max_length=max_length,
            )
        with _preserve_rng_state(), _hub_errors_explained(builtin):
            raw = simple_evaluate(
                model=lm,
                tasks=task_names,
                task_manager=task_manager,
                batch_size=batch_size,  # only recorded in results["config"]; HFLM has it
                limit=limit,
                num_fewshot=num_fewshot,
                log_samples=False,
            )
    finally:
        for module, was_training in modes:
            module.training = was_training
        # HFLM sets a pad token (to unk or eos) on a tokenizer without one; undo that.
        if pad_token_before is None and getattr(tokenizer, "pad_token", None) is not None:
            try:
                tokenizer.pad_token = None
            except Exception:  # pragma: no cover - tokenizer refuses; harmless for scoring
                logger.debug("could not reset the tokenizer's pad token", exc_info=True)

    if raw is None:  # only on non-zero ranks, which an in-memory HFLM never is
        raise RuntimeError("lm-eval returned no results")
    results: dict = json.loads(
        json.dumps(raw, default=handle_non_serializable, ensure_ascii=False)
    )
    results_path = output_dir / RESULTS_FILENAME
    results_path.write_text(
        json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    logger.info("lm-eval results written to %s\n%s", results_path, format_table(results))
    return results


def _reads_raw_questions(model: Any) -> bool:
    """Whether the model's task encoder reads the raw question (``router.task_encoder.input=raw``)."""
    return any(isinstance(m, TaskEncoder) and m.input == "raw" for m in model.modules())


def question_rows(rows: Sequence[Sequence[int]], questions: dict[tuple[int, ...], list[int]]) -> list[list[int] | None]:
    """Each row's raw-question token ids: those of the longest context in ``questions`` that begins the row
    (``None`` when none does, e.g. a context truncated on the left).

    Args:
        rows: the token ids lm-eval feeds the model, one list per sequence (context, then continuation).
        questions: a request's context token ids -> its question's token ids.
    """
    lengths = sorted({len(k) for k in questions}, reverse=True)
    out = []
    for row in rows:
        row = tuple(row)
        out.append(next((questions[row[:n]] for n in lengths if n <= len(row) and row[:n] in questions), None))
    return out


def _raw_question_lm(hflm: type) -> type:
    """``HFLM`` that hands the task encoder each request's raw question (``router.task_encoder.input=raw``).

    lm-eval passes the model token ids only. :meth:`loglikelihood` reads each request's document: one with
    LLM-Adapters fields (``instruction``, the shipped tasks' and every LLM-Adapters task's) gives its question
    (:func:`mole.data.prompts.record_question`), tokenised on its own as in training, under the token ids of
    its context. Each forward (``_model_call``) looks its rows up by the context they begin with and sets
    them as the routing context's ``task_inputs``. A row with no question (a document without those fields,
    a context cut on the left) gives the task encoder all its tokens, as under ``input=templated``.
    """
    class RawQuestionLM(hflm):
        _questions: dict[tuple[int, ...], list[int]] = {}

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            questions = {}
            for req in requests:
                context, continuation = req.args
                doc = req.doc if isinstance(req.doc, dict) else {}
                if context and "instruction" in doc:
                    context_enc, _ = self._encode_pair(context, continuation)
                    text = record_question(doc)
                    questions[tuple(context_enc)] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            self._questions = questions
            try:
                return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
            finally:
                self._questions = {}

        def _model_call(self, inps, attn_mask=None, labels=None):
            found = question_rows(inps.tolist(), self._questions) if self._questions else []
            if not any(q is not None for q in found):
                return super()._model_call(inps, attn_mask, labels)
            rows = [q if q is not None else row for q, row in zip(found, inps.tolist(), strict=True)]
            width = max(1, *(len(r) for r in rows))
            ids = torch.zeros((len(rows), width), dtype=torch.long, device=inps.device)
            mask = torch.zeros((len(rows), width), dtype=torch.bool, device=inps.device)
            for i, r in enumerate(rows):
                ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
                mask[i, : len(r)] = True
            with routing_inputs(self.model, None, (ids, mask)):
                return super()._model_call(inps, attn_mask, labels)

    return RawQuestionLM


def format_table(results: dict) -> str:
    """Markdown table(s) of an lm-eval results dict: tasks, then groups if there are any."""
    from lm_eval.utils import make_table

    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table
