"""User errors through the real commands: each ends with exit status 2 and exactly one line
``mole-<command>: error: ...`` naming the config key or file, and never a traceback.

Cases marked ``SUB`` run the installed command as a subprocess; the others call the same entry functions
in-process (``mole.cli.params.main``, ``mole.cli.eval.main``, and for ``mole-train`` the single-run
function ``mole.cli.train._single_run`` on a config composed as the command does).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from mole.config import compose_config

TRAIN_BASE = ["model=tiny_llama", "trainer.max_steps=1", "trainer.batch_size=2", "data.max_records=12"]
SUB = True
CHAT = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


@dataclass(frozen=True)
class Case:
    id: str
    cmd: str  # train | eval | params
    args: tuple[str, ...]  # {tmp} is the test's directory
    names: tuple[str, ...]  # the error line must contain each: the config key or file, and the problem
    sub: bool = False  # run the real command as a subprocess
    setup: Callable[[Path, dict], None] | None = None  # writes the files a case needs
    post: Callable[[Path], None] | None = None  # more checks afterwards


# ---- setups ----


def _write(name: str, text: str) -> Callable[[Path, dict], None]:
    return lambda tmp, runs: (tmp / name).write_text(text)


MC = ("Please choose the correct answer to the question: Which is a planet?\n\nAnswer1: Mars Answer2: the Moon "
      "Answer3: the Sun Answer4: a comet\n\nAnswer format: answer1/answer2/answer3/answer4")
GOOD = {"instruction": MC, "input": "", "output": "the correct answer is answer1", "answer": "answer1"}
BAD_ANSWER = json.dumps([GOOD, {**GOOD, "output": "the correct answer is answer5", "answer": "answer5"}])


def _run_copy(which: str, edit: Callable[[Path], None] | None = None) -> Callable[[Path, dict], None]:
    """A copy of a finished run (``lora`` / ``mola``) in ``{tmp}/run``, edited."""

    def setup(tmp: Path, runs: dict) -> None:
        shutil.copytree(runs[which], tmp / "run")
        if edit is not None:
            edit(tmp / "run")

    return setup


def _foreign_adapter(tmp: Path, runs: dict) -> None:
    """The lora run's directory with the mola run's adapter."""
    shutil.copytree(runs["lora"], tmp / "run")
    shutil.copyfile(runs["mola"] / "adapter.safetensors", tmp / "run" / "adapter.safetensors")


def _checkpointed(edit: Callable[[Path], None] | None = None) -> Callable[[Path, dict], None]:
    """An interrupted run with a checkpoint of step 1 in ``{tmp}/train_run``."""

    def setup(tmp: Path, runs: dict) -> None:
        shutil.copytree(runs["checkpointed"], tmp / "train_run")
        if edit is not None:
            edit(tmp / "train_run" / "checkpoints" / "step-1")

    return setup


def _still_empty(tmp: Path) -> None:
    assert list((tmp / "empty").iterdir()) == []  # mole-eval wrote nothing into it


def _not_created(tmp: Path) -> None:
    assert not (tmp / "nowhere").exists()


CASES = [
    # -- which method: groups, presets, routers, layouts, adapters (mole-params builds them on the meta device) --
    Case("unknown-router", "train", ("router=nope",), ("router/nope", "available options in 'router'"), SUB),
    Case("unknown-router-params", "params", ("router=nope",), ("router/nope",)),
    Case("unknown-preset", "params", ("method=nope",), ("method/nope", "mola_mor"), SUB),
    Case("top-k-above-experts", "params", ("router.top_k=3",), ("router.top_k=3", "experts (2)")),
    Case("top-k-zero", "params", ("router=topk", "router.top_k=0"), ("router.top_k", "positive integer")),
    Case("per-layer-wrong-length", "params", ("experts.per_layer=[2,2]", "experts.groups=null"),
         ("experts.per_layer", "2 layers", "has 4")),
    Case("two-layout-forms", "params", ("experts.per_layer=[2,2,2,2]",), ("experts.groups", "experts.per_layer")),
    Case("target-module-missing", "params", ("experts.targets=[q_proj,nope_proj]",), ("experts.targets", "nope_proj")),
    Case("top-p-zero", "params", ("router=topp", "router.top_p=0"), ("router.top_p", "(0, 1]")),
    Case("top-p-above-one", "params", ("router=dynamic", "router.top_p=1.5"), ("router.top_p", "(0, 1]")),
    Case("tau-max-above-one", "params", ("router=threshold", "router.tau_max=1.2"), ("router.tau_max", "(0, 1]")),
    Case("tau-max-zero", "params", ("router=threshold", "router.tau_max=0"), ("router.tau_max", "(0, 1]")),
    Case("unknown-placement", "params", ("router.placement=everywhere",), ("router.placement", "linear")),
    Case("rank-zero", "params", ("adapter.rank=0",), ("adapter.rank", "got 0")),
    Case("rank-negative", "params", ("adapter.rank=-4",), ("adapter.rank", "got -4")),
    Case("dropout-one", "params", ("adapter.dropout=1.0",), ("adapter.dropout", "[0, 1)")),
    Case("bad-architecture", "params", ("model.hidden_size=-3",), ("model.config", "hidden size")),
    Case("bad-dtype", "params", ("model.dtype=int8",), ("model.dtype", "int8")),
    Case("unknown-key-params", "params", ("trainer.foo=1",), ("trainer.foo",)),
    # -- how to optimise --
    Case("unknown-trainer-key", "train", ("trainer.foo=1",), ("trainer.foo", "+trainer.foo=1"), SUB),
    Case("unknown-trainer-key-appended", "train", ("+trainer.foo=1",), ("trainer: unknown keys ['foo']",)),
    Case("lr-zero", "train", ("trainer.lr=0",), ("trainer.lr", "positive", "got 0")),
    Case("init-from-another-method", "train", ("method=mola", "trainer.init_from={tmp}/stage1"),
         ("trainer.init_from", "method=lora"), setup=lambda tmp, runs: shutil.copytree(runs["lora"], tmp / "stage1")),
    Case("lr-negative", "train", ("trainer.lr=-1e-4",), ("trainer.lr", "positive")),
    Case("save-every-negative", "train", ("trainer.save_every=-1",), ("trainer.save_every",)),
    Case("keep-checkpoints-zero", "train", ("trainer.keep_checkpoints=0",), ("trainer.keep_checkpoints",)),
    Case("resume-not-a-bool", "train", ("trainer.resume=maybe",), ("trainer.resume", "true or false")),
    Case("seed-not-an-integer", "train", ("seed=abc",), ("seed must be an integer",)),
    Case("balance-weight-negative", "train", ("loss.balance.weight=-1",), ("loss.balance.weight",)),
    Case("resume-with-another-config", "train", ("trainer.save_every=1", "trainer.resume=true", "trainer.lr=1e-3"),
         ("trainer.resume", "step-1", "differs at trainer.lr"), setup=_checkpointed()),
    Case("resume-from-a-damaged-checkpoint", "train", ("trainer.save_every=1", "trainer.resume=true"),
         ("trainer.resume", "step-1", "unreadable"),
         setup=_checkpointed(lambda d: (d / "optimizer.safetensors").write_bytes(b"\x00" * 12))),
    # -- what text --
    Case("missing-data-file", "train", ("data.path={tmp}/missing.json",), ("data.path", "missing.json does not exist"), SUB),
    Case("local-data-without-path", "train", ("data=local",), ("data.path=FILE",)),
    Case("empty-data-file", "train", ("data.path={tmp}/empty.json",), ("data.path", "empty.json is empty"),
         setup=_write("empty.json", "")),
    Case("malformed-json", "train", ("data.path={tmp}/bad.json",), ("data.path", "bad.json is not valid JSON", "line 1"),
         setup=_write("bad.json", '[{"instruction": "a",}]')),
    Case("json-object-not-a-list", "train", ("data.path={tmp}/obj.json",), ("obj.json", "expected a list"),
         setup=_write("obj.json", '{"instruction": "a", "output": "b"}')),
    Case("record-missing-a-field", "train", ("data.path={tmp}/nofield.jsonl",), ("nofield.jsonl", "record 1", "'output'"),
         setup=_write("nofield.jsonl", json.dumps(GOOD) + "\n" + json.dumps({"instruction": "a", "answer": "b"}) + "\n")),
    Case("chat-unknown-role", "train", ("data=chat", "data.path={tmp}/roles.jsonl"), ("roles.jsonl", "record 1", "'bot'"),
         SUB, setup=_write("roles.jsonl", json.dumps(CHAT) + "\n" + json.dumps({"messages": [
             {"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}) + "\n")),
    Case("chat-no-assistant-turn", "train", ("data=chat", "data.path={tmp}/noanswer.json"),
         ("noanswer.json", "record 0", "no assistant turn"),
         setup=_write("noanswer.json", json.dumps([{"messages": [{"role": "user", "content": "q"}]}]))),
    Case("chat-empty-content", "train", ("data=chat", "data.path={tmp}/empty.json"), ("empty.json", "record 0", "message 1"),
         setup=_write("empty.json", json.dumps([{"messages": [{"role": "user", "content": "q"},
                                                              {"role": "assistant", "content": " "}]}]))),
    Case("chat-messages-without-chat-template", "train", ("data=chat", "data.template=alpaca"),
         ("data.format=messages", "data.template=chat")),
    Case("answer-not-an-option", "train", ("data.path={tmp}/answers.json",),
         ("data.path", "answers.json", "record 1", "'answer5'", "Answer format"), SUB,
         setup=_write("answers.json", BAD_ANSWER)),
    Case("data-path-is-a-directory", "train", ("data.path={tmp}",), ("data.path", "is not a file")),
    Case("cutoff-zero", "train", ("data.cutoff_len=0",), ("data.cutoff_len",)),
    Case("val-size-too-large", "train", ("data.val_size=2.5",), ("data.val_size",)),
    Case("unknown-template", "train", ("data.template=nope",), ("data.template", "'nope'")),
    # -- which lm-eval tasks --
    Case("eval-batch-size-not-a-number", "train", ("eval=fixtures", "eval.batch_size=abc"), ("eval.batch_size",)),
    Case("include-path-missing-before-training", "train", ("eval=fixtures", "eval.include_path={tmp}/nowhere"),
         ("eval.include_path", "nowhere", "not a directory")),
    # -- mole-eval: the checkpoint --
    Case("no-checkpoint", "eval", (), ("checkpoint=DIR is required",)),
    Case("checkpoint-dir-missing", "eval", ("checkpoint={tmp}/nowhere",), ("checkpoint=", "nowhere", "not a directory"),
         post=_not_created),
    Case("checkpoint-without-config", "eval", ("checkpoint={tmp}/empty",), ("checkpoint", "config.yaml not found"),
         setup=lambda tmp, runs: (tmp / "empty").mkdir(), post=_still_empty),
    Case("checkpoint-is-a-file", "eval", ("checkpoint={tmp}/file.txt",), ("checkpoint=", "file.txt", "not a directory"),
         setup=_write("file.txt", "x")),
    Case("config-not-yaml", "eval", ("checkpoint={tmp}/run",), ("config.yaml", "not valid YAML"),
         setup=_run_copy("lora", lambda run: (run / "config.yaml").write_text("model: [1\n"))),
    Case("adapter-missing", "eval", ("checkpoint={tmp}/run",), ("adapter.safetensors not found",),
         setup=_run_copy("lora", lambda run: (run / "adapter.safetensors").unlink())),
    Case("adapter-from-another-method", "eval", ("checkpoint={tmp}/run",),
         ("run/adapter.safetensors", "does not match", "another method"), SUB, setup=_foreign_adapter),
    Case("corrupted-adapter", "eval", ("checkpoint={tmp}/run",), ("run/adapter.safetensors", "not a readable safetensors"),
         SUB, setup=_run_copy("lora", lambda run: (run / "adapter.safetensors").write_bytes(b"\x10" * 40))),
    Case("include-path-not-a-directory", "eval", ("checkpoint={tmp}/run", "eval.include_path={tmp}/file.txt"),
         ("eval.include_path", "file.txt", "not a directory"),
         setup=lambda tmp, runs: (_run_copy("lora")(tmp, runs), (tmp / "file.txt").write_text("x"))),
    Case("task-not-in-include-path", "eval", ("checkpoint={tmp}/run", "eval.include_path={tmp}/tasks", "eval.tasks=[my_task]"),
         ("eval.tasks", "my_task", "eval.include_path"), SUB,
         setup=lambda tmp, runs: (_run_copy("lora")(tmp, runs), (tmp / "tasks").mkdir())),
    Case("eval-limit-zero", "eval", ("checkpoint={tmp}/run", "eval.limit=0"), ("eval.limit", "got 0"), setup=_run_copy("lora")),
    Case("unknown-eval-key", "eval", ("checkpoint={tmp}/run", "eval.foo=1"), ("eval.foo",), setup=_run_copy("lora")),
]


# ---- running a case ----


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Finished tiny runs (untrained: max_steps=0) of two methods, and an interrupted one with a checkpoint."""
    from mole.pipeline import run_train

    root = tmp_path_factory.mktemp("bad_input") / "_runs"
    out = {}
    for method in ("lora", "mola"):
        # eval=fixtures (tasks mole_mc, mole_yesno) without lm-eval at the end: what mole-eval reads back
        run_train(compose_config([*TRAIN_BASE, "eval=fixtures", "eval.at_end=false", f"method={method}",
                                  "trainer.max_steps=0"]), root / method)
        out[method] = root / method
    run_train(compose_config([*TRAIN_BASE, "eval=none", "trainer.save_every=1"]), root / "checkpointed")
    (root / "checkpointed" / "metrics.json").unlink()  # as if killed after the checkpoint
    out["checkpointed"] = root / "checkpointed"
    return out


def _command_args(case: Case, tmp: Path) -> list[str]:
    args = [a.replace("{tmp}", str(tmp)) for a in case.args]
    if case.cmd == "train":
        evals = [] if any(a.startswith("eval=") for a in args) else ["eval=none"]
        return [*TRAIN_BASE, *evals, *args]
    if case.cmd == "params":
        return ["model=tiny_llama", *args]
    return args


def _in_process(case: Case, args: list[str], tmp: Path) -> int:
    import mole.cli.eval
    import mole.cli.params
    from mole.cli.common import compose_from_argv, report_user_errors
    from mole.cli.train import _single_run

    try:
        if case.cmd == "params":
            mole.cli.params.main(args)
        elif case.cmd == "eval":
            mole.cli.eval.main(args)
        else:  # compose as mole-train does (one-line Hydra errors), then its single-run function
            cfg = report_user_errors("mole-train")(compose_from_argv)(args, "train")
            _single_run(cfg, str(tmp / "train_run"))
    except SystemExit as stop:
        return stop.code
    return 0


@pytest.mark.parametrize("case", CASES, ids=[c.id + ("[SUB]" if c.sub else "") for c in CASES])
def test_user_error_is_one_line_naming_the_key_or_file(case: Case, runs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if case.setup is not None:
        case.setup(tmp_path, runs)
    args = _command_args(case, tmp_path)
    if case.sub:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "MOLE_OUTPUT_DIR": str(tmp_path / "out")}
        extra = [f"hydra.run.dir={tmp_path / 'train_run'}"] if case.cmd == "train" else []
        proc = subprocess.run([sys.executable, "-m", f"mole.cli.{case.cmd}", *args, *extra], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    else:
        code = _in_process(case, args, tmp_path)
        captured = capsys.readouterr()
        out, err = captured.out, captured.err

    assert code == 2, (code, err[-2000:])
    assert "Traceback" not in out + err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, err[-2000:]
    (line,) = lines
    assert line.startswith(f"mole-{case.cmd}: error: "), line
    for name in case.names:
        assert name in line, (name, line)
    if case.post is not None:
        case.post(tmp_path)
