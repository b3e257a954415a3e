"""User errors through the real commands: each ends with exit status 2 and exactly one line
``mole-<command>: error: ...`` naming the config key or file, never a traceback, and leaves nothing on
disk lost or half-written: every file that was there is unchanged, and no ``*.tmp`` file or temporary
checkpoint directory is left behind.

The table has five families: configs, data files, checkpoints and run directories, processes and signals
(the machine: disk full, permissions, names too long, command-line options; a run stopped by SIGTERM or
SIGINT, a second signal, a run directory held by another process) and security (secrets never printed). Cases marked ``SUB`` run the installed command as a subprocess; the others call the same entry
functions in-process (``mole.cli.params.main``, ``mole.cli.eval.main``, and for ``mole-train`` the
single-run function ``mole.cli.train._single_run`` on a config composed as the command does). A case's
``patch`` simulates what a test cannot arrange for real (a full disk, a file root may not read).
"""

from __future__ import annotations

import builtins
import errno
import gzip
import hashlib
import io
import json
import logging
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
FAMILIES = ("configs", "data files", "checkpoints and run directories", "processes and signals", "security")


@dataclass(frozen=True)
class Case:
    id: str
    cmd: str  # train | eval | params
    args: tuple[str, ...]  # {tmp} is the test's directory
    names: tuple[str, ...]  # the error line must contain each: the config key or file, and the problem
    sub: bool = False  # run the real command as a subprocess
    setup: Callable[[Path, dict], None] | None = None  # writes the files a case needs
    post: Callable[[Path], None] | None = None  # more checks afterwards
    absent: tuple[str, ...] = ()  # the output must not contain these (a secret, a wrong key)
    patch: Callable[[pytest.MonkeyPatch, Path], None] | None = None  # in-process only: simulate the machine
    family: str = ""


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


BASE_CASES = [
    # -- which method: groups, presets, routers, layouts, adapters (mole-params builds them on the meta device) --
    Case("unknown-router", "train", ("router=nope",), ("router/nope", "available options in 'router'"), SUB),
    Case("unknown-router-params", "params", ("router=nope",), ("router/nope",)),
    Case("unknown-preset", "params", ("method=nope",), ("method/nope", "mola_mor"), SUB),
    Case("top-k-above-experts", "params", ("router.selection.top_k=3",), ("router.selection.top_k=3", "experts (2)")),
    Case("top-k-zero", "params", ("router=topk", "router.top_k=0"), ("router.top_k", "positive integer")),
    Case("per-layer-wrong-length", "params", ("experts.per_layer=[2,2]", "experts.groups=null"),
         ("experts.per_layer", "2 layers", "has 4")),
    Case("two-layout-forms", "params", ("experts.per_layer=[2,2,2,2]",), ("experts.groups", "experts.per_layer")),
    Case("target-module-missing", "params", ("experts.targets=[q_proj,nope_proj]",), ("experts.targets", "nope_proj")),
    Case("top-p-zero", "params", ("router=topp", "router.top_p=0"), ("router.top_p", "(0, 1]")),
    Case("top-p-above-one", "params", ("router=dynamic", "router.top_p=1.5"), ("router.top_p", "(0, 1]")),
    Case("tau-max-above-one", "params", ("router=threshold", "router.tau_max=1.2"), ("router.tau_max", "(0, 1]")),
    Case("tau-max-zero", "params", ("router=threshold", "router.tau_max=0"), ("router.tau_max", "(0, 1]")),
    Case("unknown-placement", "params", ("experts.placement=everywhere",), ("experts.placement", "linear")),
    # keys that moved: the old override names the new key
    Case("moved-placement", "train", ("router.placement=layer",), ("router.placement moved to experts.placement",
         "experts.placement=layer"), SUB),
    Case("moved-level", "params", ("router.level=instance",), ("experts.level=instance",)),
    Case("moved-select", "params", ("router.select=dynamic",), ("router.select", "router/selection=dynamic")),
    Case("mor-flat-selection-key", "params", ("router.top_p=0.5",), ("router.top_p", "router.selection.top_p=0.5")),
    Case("moved-placement-appended", "params", ("+router.placement=layer",), ("experts.placement",)),
    Case("rank-zero", "params", ("adapter.rank=0",), ("adapter.rank", "got 0")),
    Case("rank-negative", "params", ("adapter.rank=-4",), ("adapter.rank", "got -4")),
    Case("dropout-one", "params", ("adapter.dropout=1.0",), ("adapter.dropout", "[0, 1)")),
    Case("bad-architecture", "params", ("model.hidden_size=-3",), ("model.config", "hidden size")),
    Case("bad-dtype", "params", ("model.dtype=int8",), ("model.dtype", "int8")),
    Case("gguf-missing-file", "params", ("model.source=gguf", "+model.gguf={tmp}/nope.gguf"),
         ("model.gguf", "nope.gguf", "no such file"), SUB),
    Case("gguf-not-in-package", "params", ("model.source=gguf", "+model.gguf=omegaconf:nope.gguf"),
         ("model.gguf", "omegaconf", "holds no file 'nope.gguf'")),
    Case("gguf-not-a-gguf-file", "params", ("model.source=gguf", "+model.gguf={tmp}/m.gguf"),
         ("model.gguf", "m.gguf", "not a GGUF file"), setup=_write("m.gguf", "not a model")),
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
    Case("record-missing-a-field", "train", ("data.path={tmp}/nofield.jsonl",),
         ("nofield.jsonl", "record 2 (line 2)", "'output'"),
         setup=_write("nofield.jsonl", json.dumps(GOOD) + "\n" + json.dumps({"instruction": "a", "answer": "b"}) + "\n")),
    Case("chat-unknown-role", "train", ("data=chat", "data.path={tmp}/roles.jsonl"), ("roles.jsonl", "record 2", "'bot'"),
         SUB, setup=_write("roles.jsonl", json.dumps(CHAT) + "\n" + json.dumps({"messages": [
             {"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}) + "\n")),
    Case("chat-no-assistant-turn", "train", ("data=chat", "data.path={tmp}/noanswer.json"),
         ("noanswer.json", "record 1", "no assistant turn"),
         setup=_write("noanswer.json", json.dumps([{"messages": [{"role": "user", "content": "q"}]}]))),
    Case("chat-empty-content", "train", ("data=chat", "data.path={tmp}/empty.json"), ("empty.json", "record 1", "message 2"),
         setup=_write("empty.json", json.dumps([{"messages": [{"role": "user", "content": "q"},
                                                              {"role": "assistant", "content": " "}]}]))),
    Case("chat-messages-without-chat-template", "train", ("data=chat", "data.template=alpaca"),
         ("data.format=messages", "data.template=chat")),
    Case("answer-not-an-option", "train", ("data.path={tmp}/answers.json",),
         ("data.path", "answers.json", "record 2", "'answer5'", "Answer format"), SUB,
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


# ---- more setups: files and runs damaged as a user, a disk or a crash leaves them ----


def _write_bytes(name: str, data: bytes) -> Callable[[Path, dict], None]:
    return lambda tmp, runs: (tmp / name).write_bytes(data)


def _records(n: int = 12, **fields) -> list[dict]:
    return [{**GOOD, **fields} for _ in range(n)]


GOOD_JSON = json.dumps(_records()).encode()
GOOD_LINE = json.dumps(GOOD)


def _jsonl(lines: list[str]) -> Callable[[Path, dict], None]:
    return _write("d.jsonl", "\n".join(lines) + "\n")


def _cut_config(keep_lines: int | None = None, keep_bytes: int | None = None) -> Callable[[Path], None]:
    """The run's config.yaml cut short, as a crash or a full disk during a copy leaves it."""

    def edit(run: Path) -> None:
        path = run / "config.yaml"
        data = path.read_bytes()
        if keep_lines is not None:
            data = b"".join(data.splitlines(keepends=True)[:keep_lines])
        path.write_bytes(data[:keep_bytes] if keep_bytes is not None else data)

    return edit


def _edit_config(old: str, new: str) -> Callable[[Path], None]:
    def edit(run: Path) -> None:
        path = run / "config.yaml"
        text = path.read_text()
        assert old in text
        path.write_text(text.replace(old, new, 1))

    return edit


def _copy_run_to(name: str, which: str = "lora", edit: Callable[[Path], None] | None = None):
    def setup(tmp: Path, runs: dict) -> None:
        shutil.copytree(runs[which], tmp / name)
        if edit is not None:
            edit(tmp / name)

    return setup


def _finished_train_run(tmp: Path, runs: dict) -> None:
    """A finished run in the directory a train case trains into: a failure must not touch it."""
    shutil.copytree(runs["lora"], tmp / "train_run")


# ---- patches: what the machine does (in-process cases only) ----

NO_SPACE = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'


def _disk_full_safetensors(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
    """The adapter writer runs out of space half-way (safetensors raises its own error type)."""
    from safetensors import SafetensorError

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 16)  # what it had written so far
        raise SafetensorError(NO_SPACE)

    monkeypatch.setattr("mole.model.state.save_file", full)


def _disk_full_on(name: str) -> Callable[[pytest.MonkeyPatch, Path], None]:
    """Writing the file called ``name`` (or its temporary ``name[.PID].tmp``) runs out of space half-way."""

    def patch(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
        real = Path.write_text

        def write_text(self, data, *args, **kwargs):
            if self.name == name or (self.name.startswith(name + ".") and self.name.endswith(".tmp")):
                real(self, data[: len(data) // 2], *args, **kwargs)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
            return real(self, data, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", write_text)

    return patch


def _unreadable(name: str) -> Callable[[pytest.MonkeyPatch, Path], None]:
    """The file called ``name`` may not be read (root reads any file, so the refusal is simulated)."""

    def patch(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
        real_bytes, real_open = Path.read_bytes, builtins.open  # io.open is the same function

        def denied(path) -> OSError:
            return PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

        def read_bytes(self):
            if self.name == name:
                raise denied(self)
            return real_bytes(self)

        def opener(file, *args, **kwargs):
            if isinstance(file, (str, Path)) and Path(file).name == name:
                raise denied(file)
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(Path, "read_bytes", read_bytes)
        monkeypatch.setattr(builtins, "open", opener)
        monkeypatch.setattr(io, "open", opener)

    return patch


def _mkdir_denied(name: str) -> Callable[[pytest.MonkeyPatch, Path], None]:
    def patch(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
        real = Path.mkdir

        def mkdir(self, *args, **kwargs):
            if self.name == name:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return real(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", mkdir)

    return patch


# ---- more post checks ----


def _no_adapter(run: str) -> Callable[[Path], None]:
    def check(tmp: Path) -> None:
        assert not (tmp / run / "adapter.safetensors").exists()

    return check


def _failure_recorded(tmp: Path) -> None:
    record = json.loads((tmp / "train_run" / "metrics.json").read_text())
    assert record["failed"] is True and record["finished"] is False


LONG = "x" * 300
SECRET = "S3cr3t v4l,ue"
SECRET_PARTS = ("S3cr3t", "v4l", "ue\"")

CONFIG_CASES = [
    Case("seed-negative", "train", ("seed=-1",), ("seed must be an integer in [0, 4294967295]", "got -1")),
    Case("seed-too-large", "train", ("seed=4294967296",), ("seed", "4294967296")),
    Case("seed-a-fraction", "params", ("seed=1.5",), ("seed", "got 1.5")),
    Case("epochs-inf", "train", ("trainer.epochs=inf",), ("trainer.epochs", "positive number", "got inf")),
    Case("epochs-nan", "train", ("trainer.epochs=nan",), ("trainer.epochs", "got nan")),
    Case("epochs-zero", "train", ("trainer.epochs=0",), ("trainer.epochs", "positive")),
    Case("max-steps-negative", "train", ("trainer.max_steps=-1",), ("trainer.max_steps", "non-negative integer")),
    Case("val-size-a-word", "train", ("data.val_size=ten",), ("data.val_size", "fraction", "'ten'")),
    Case("val-size-negative", "train", ("data.val_size=-0.1",), ("data.val_size", "got -0.1")),
    Case("val-size-more-than-the-records", "train", ("data.val_size=500",), ("data.val_size=500", "no training records")),
    Case("groups-a-number", "params", ("experts.groups=4",), ("experts.groups", "list of positive integers", "got 4")),
    Case("groups-empty", "params", ("experts.groups=[]",), ("experts.groups", "got []")),
    Case("per-layer-has-zero", "params", ("experts.per_layer=[2,0,2,2]", "experts.groups=null"),
         ("experts.per_layer", "got [2, 0, 2, 2]")),
    Case("num-experts-zero", "params", ("experts.num_experts=0", "experts.groups=null"), ("experts.num_experts", "got 0")),
    Case("main-top-k-above-n-routers", "params", ("router.main_top_k=3",),
         ("router.main_top_k=3", "router.n_routers=2"), absent=("number of experts",)),
    Case("main-top-k-zero", "params", ("router.main_top_k=0",), ("router.main_top_k", "got 0")),
    Case("n-routers-zero", "params", ("router.n_routers=0",), ("router.n_routers", "got 0")),
    Case("q-zero-dynmole", "train", ("method=dynmole", "router.q=0"), ("router.q", "Tsallis", "got 0"),
         absent=("loss.tsallis",)),
    Case("q-negative", "params", ("router=dynamic", "router.q=-1"), ("router.q", "got -1")),
    Case("q-inf", "params", ("router=crw", "router/selection=dynamic", "router.selection.q=inf"),
         ("router.selection.q", "got inf")),
    Case("top-p-nan", "params", ("router=topp", "router.top_p=nan"), ("router.top_p", "(0, 1]", "got nan")),
    Case("top-k-a-word", "params", ("router=topk", "router.top_k=abc"), ("router.top_k", "'abc'")),
    Case("block-adapter-key", "params", ("method=moa_soft", "adapter.blocks.parallel_adapter.bottleneck=0"),
         ("adapter.blocks.parallel_adapter.bottleneck", "got 0")),
    Case("block-prompt-key", "params", ("method=moa_soft", "adapter.blocks.prompt.length=0"),
         ("adapter.blocks.prompt.length", "got 0")),
    Case("alpha-a-word", "params", ("adapter.alpha=abc",), ("adapter.alpha", "'abc'")),
    Case("rank-a-fraction", "params", ("adapter.rank=1.5",), ("adapter.rank", "got 1.5")),
    Case("dropout-negative", "params", ("adapter.dropout=-0.1",), ("adapter.dropout", "[0, 1)")),
    Case("cutoff-negative", "train", ("data.cutoff_len=-5",), ("data.cutoff_len", "tokens per example", "got -5")),
    Case("cutoff-a-fraction", "train", ("data.cutoff_len=12.5",), ("data.cutoff_len", "got 12.5")),
    Case("truncation-unknown", "train", ("data.truncation=left",), ("data.truncation", "prompt_left", "'left'")),
    Case("max-records-zero", "train", ("data.max_records=0",), ("data.max_records", "got 0")),
    Case("batch-size-zero", "train", ("trainer.batch_size=0",), ("trainer.batch_size", "positive integer")),
    Case("grad-accum-zero", "train", ("trainer.grad_accum=0",), ("trainer.grad_accum",)),
    Case("warmup-negative", "train", ("trainer.warmup_steps=-3",), ("trainer.warmup_steps", "non-negative")),
    Case("weight-decay-negative", "train", ("trainer.weight_decay=-0.1",), ("trainer.weight_decay",)),
    Case("label-smoothing-one", "train", ("trainer.label_smoothing=1",), ("trainer.label_smoothing", "[0, 1)")),
    Case("force-not-a-bool", "train", ("force=maybe",), ("force must be true or false", "'maybe'")),
    Case("unknown-model", "params", ("model=nope",), ("model/nope", "available options in 'model'")),
    Case("unknown-data", "train", ("data=nope",), ("data/nope", "available options in 'data'")),
    Case("num-processes-zero", "train", ("distributed.num_processes=0",), ("distributed.num_processes", "got 0")),
    Case("override-without-value", "train", ("trainer.lr",), ("trainer.lr", "missing EQUAL")),
    Case("override-unclosed-list", "params", ("experts.groups=[1,",), ("'[1,'",)),
    Case("eval-fewshot-negative", "eval", ("checkpoint={tmp}/run", "eval.num_fewshot=-1"), ("eval.num_fewshot",),
         setup=_run_copy("lora")),
    Case("eval-limit-above-one", "eval", ("checkpoint={tmp}/run", "eval.limit=1.5"), ("eval.limit", "got 1.5"),
         setup=_run_copy("lora")),
    Case("eval-nothing-to-evaluate", "eval", ("checkpoint={tmp}/run", "eval.tasks=[]", "eval.benchmarks=[]"),
         ("eval.tasks and eval.benchmarks are empty",), setup=_run_copy("lora")),
]

DATA_CASES = [
    Case("gzip-file", "train", ("data.path={tmp}/d.json",), ("data.path", "d.json is gzip-compressed", "gunzip"),
         setup=_write_bytes("d.json", gzip.compress(GOOD_JSON))),
    Case("bzip2-file", "train", ("data.path={tmp}/d.json",), ("d.json is bzip2-compressed",),
         setup=_write_bytes("d.json", b"BZh91AY&SY" + b"\x00" * 20)),
    Case("zip-file", "train", ("data.path={tmp}/d.json",), ("d.json is a zip archive", "unzip"),
         setup=_write_bytes("d.json", b"PK\x03\x04" + b"\x00" * 20)),
    Case("parquet-file", "train", ("data.path={tmp}/d.json",), ("d.json is a Parquet file",),
         setup=_write_bytes("d.json", b"PAR1" + b"\x00" * 20)),
    Case("latin1-file", "train", ("data.path={tmp}/d.json",), ("d.json is not UTF-8", "byte 0xe9 on line 1", "iconv"),
         setup=_write_bytes("d.json", json.dumps(_records(instruction="café"), ensure_ascii=False).encode("latin-1"))),
    Case("utf16-file", "train", ("data.path={tmp}/d.json",), ("d.json is not UTF-8",),
         setup=_write_bytes("d.json", GOOD_JSON.decode().encode("utf-16"))),
    Case("unreadable-file", "train", ("data.path={tmp}/d.json",), ("cannot read", "d.json", "Permission denied"),
         setup=_write_bytes("d.json", GOOD_JSON), patch=_unreadable("d.json")),
    Case("jsonl-broken-on-line-9", "train", ("data.path={tmp}/d.jsonl",),
         ("d.jsonl is not valid JSON lines", "line 9 (record 9)"),
         setup=_jsonl([GOOD_LINE] * 8 + ['{"instruction": "a", "output": '] + [GOOD_LINE] * 3)),
    Case("jsonl-blank-lines-counted", "train", ("data.path={tmp}/d.jsonl",), ("line 7 (record 4)",),
         setup=_jsonl([GOOD_LINE, "", GOOD_LINE, "", GOOD_LINE, "", "{oops}", GOOD_LINE])),
    Case("jsonl-record-not-an-object", "train", ("data.path={tmp}/d.jsonl",), ("record 3 (line 3) is a int",),
         setup=_jsonl([GOOD_LINE, GOOD_LINE, "7", GOOD_LINE])),
    Case("json-cut-short", "train", ("data.path={tmp}/d.json",), ("d.json is not valid JSON", "line 1"),
         setup=_write_bytes("d.json", GOOD_JSON[: len(GOOD_JSON) // 2])),
    Case("json-lines-named-json", "train", ("data.path={tmp}/d.json",), ("d.json is not valid JSON", "name it .jsonl"),
         setup=_write("d.json", "\n".join([GOOD_LINE] * 4))),
    Case("json-null", "train", ("data.path={tmp}/d.json",), ("d.json holds a JSON NoneType", "list of records"),
         setup=_write("d.json", "null")),
    Case("output-not-text", "train", ("data.path={tmp}/d.json",), ("record 1", "'output'"),
         setup=_write("d.json", json.dumps([{"instruction": "a", "output": 5}]))),
    Case("blank-jsonl", "train", ("data.path={tmp}/d.jsonl",), ("d.jsonl is empty",), setup=_write("d.jsonl", "\n \n\n")),
    Case("all-outputs-empty", "train", ("data.path={tmp}/d.json",),
         ("data.path=", "d.json", "empty output", "nothing to learn", "data.cutoff_len=256"),
         setup=_write("d.json", json.dumps(_records(output="", answer="")))),
    Case("every-answer-over-the-cutoff", "train", ("data.path={tmp}/d.json", "data.cutoff_len=6"),
         ("d.json", "none of the 10 training records fits data.cutoff_len=6", "raise data.cutoff_len"),
         setup=_write("d.json", GOOD_JSON.decode())),
    Case("truncation-drop-drops-all", "train", ("data.path={tmp}/d.json", "data.cutoff_len=40", "data.truncation=drop"),
         ("d.json", "data.cutoff_len=40", "data.truncation=drop"), setup=_write("d.json", GOOD_JSON.decode())),
    Case("validation-file-over-the-cutoff", "train",
         ("data.path={tmp}/d.json", "data.val_path={tmp}/v.json", "data.cutoff_len=40"),
         ("data.val_path=", "v.json", "is empty", "data.cutoff_len=40"),
         setup=lambda tmp, runs: ((tmp / "d.json").write_text(json.dumps(_records(instruction="q?", output="ok"))),
                                  (tmp / "v.json").write_text(json.dumps(_records(2, output="long " * 40))))),
    Case("truncation-right-cuts-every-answer", "train",
         ("data.path={tmp}/d.json", "data.cutoff_len=40", "data.truncation=right"),
         ("d.json", "none of the 10 training records fits data.cutoff_len=40", "data.truncation=right"),
         setup=_write("d.json", GOOD_JSON.decode())),
    Case("validation-file-missing", "train", ("data.val_path={tmp}/v.json",), ("data.val_path", "v.json does not exist")),
    Case("validation-file-no-records", "train", ("data.val_path={tmp}/v.json",), ("data.val_path", "no records"),
         setup=_write("v.json", "[]")),
    Case("one-of-two-files-missing", "train", ("data.path=[{tmp}/d.json,{tmp}/missing.json]",),
         ("data.path", "missing.json does not exist"), setup=_write("d.json", GOOD_JSON.decode())),
    Case("unknown-source", "train", ("data.source=ftp",), ("data.source must be null, local or hf", "'ftp'")),
    Case("path-and-hub-name", "train", ("data.hf_name=some/set",), ("data.path", "data.hf_name", "not both")),
    Case("data-dir-missing", "train", ("data=arc_c", "data.root={tmp}/nowhere"),
         ("data.path", "nowhere/ARC-Challenge/train.json does not exist", "data.source=hf")),
]

RUN_CASES = [
    Case("config-cut-short", "eval", ("checkpoint={tmp}/run",), ("config.yaml is incomplete", "router", "cut short"),
         setup=_run_copy("lora", _cut_config(keep_lines=40))),
    Case("config-cut-mid-line", "eval", ("checkpoint={tmp}/run",), ("checkpoint", "config.yaml"),
         setup=_run_copy("lora", _cut_config(keep_bytes=1500))),
    Case("config-empty", "eval", ("checkpoint={tmp}/run",), ("config.yaml is not a mole run config",),
         setup=_run_copy("lora", _cut_config(keep_bytes=0))),
    Case("config-a-list", "eval", ("checkpoint={tmp}/run",), ("config.yaml is not a mole run config",),
         setup=_run_copy("lora", lambda run: (run / "config.yaml").write_text("- 1\n- 2\n"))),
    Case("config-seed-edited", "eval", ("checkpoint={tmp}/run",), ("config.yaml", "seed must be an integer", "got -7"),
         setup=_run_copy("lora", _edit_config("seed: 42", "seed: -7"))),
    Case("config-unreadable", "eval", ("checkpoint={tmp}/run",), ("cannot read", "config.yaml", "Permission denied"),
         setup=_run_copy("lora"), patch=_unreadable("config.yaml")),
    Case("adapter-empty", "eval", ("checkpoint={tmp}/run",), ("adapter.safetensors", "not a readable safetensors"),
         setup=_run_copy("lora", lambda run: (run / "adapter.safetensors").write_bytes(b""))),
    Case("adapter-cut-short", "eval", ("checkpoint={tmp}/run",), ("adapter.safetensors", "not a readable safetensors"),
         setup=_run_copy("lora", lambda run: (run / "adapter.safetensors").write_bytes(
             (run / "adapter.safetensors").read_bytes()[:200]))),
    Case("adapter-a-directory", "eval", ("checkpoint={tmp}/run",), ("adapter.safetensors not found",),
         setup=_run_copy("lora", lambda run: ((run / "adapter.safetensors").unlink(),
                                              (run / "adapter.safetensors").mkdir()))),
    Case("checkpoint-name-too-long", "eval", (f"checkpoint={{tmp}}/{LONG}",), ("checkpoint=", "cannot be opened: File name too long")),
    Case("init-from-missing", "train", ("trainer.init_from={tmp}/nowhere",), ("trainer.init_from", "not a directory")),
    Case("init-from-cut-config", "train", ("trainer.init_from={tmp}/stage1",),
         ("trainer.init_from", "config.yaml is incomplete"), setup=_copy_run_to("stage1", edit=_cut_config(keep_lines=40))),
    Case("resume-checkpoint-lost-a-file", "train", ("trainer.save_every=1", "trainer.resume=true"),
         ("trainer.resume", "step-1"), setup=_checkpointed(lambda d: (d / "rng.safetensors").unlink())),
    Case("resume-checkpoint-state-garbage", "train", ("trainer.save_every=1", "trainer.resume=true"),
         ("trainer.resume", "step-1"), setup=_checkpointed(lambda d: (d / "trainer_state.json").write_text("{oops"))),
    Case("finished-run-kept-on-bad-config", "train", ("force=true", "trainer.lr=-1"), ("trainer.lr", "positive"),
         setup=_finished_train_run),
    Case("run-dir-is-a-file", "train", (), ("train_run", "File exists", "a file stands where a directory is needed"),
         setup=_write("train_run", "not a directory")),
]

PROCESS_CASES = [
    Case("disk-full-writing-the-adapter", "train", ("eval=none",),
         ("cannot write", "train_run/adapter.safetensors", "No space left on device", "free some space"),
         patch=_disk_full_safetensors, post=lambda tmp: (_no_adapter("train_run")(tmp), _failure_recorded(tmp))),
    Case("disk-full-writing-the-config", "train", (), ("config.yaml", "No space left on device"),
         patch=_disk_full_on("config.yaml"), post=lambda tmp: _no_adapter("train_run")(tmp)),
    Case("disk-full-writing-metrics", "train", (), ("metrics.json", "No space left on device"),
         patch=_disk_full_on("metrics.json")),
    Case("run-dir-not-writable", "train", (), ("train_run", "Permission denied"), patch=_mkdir_denied("train_run")),
    Case("run-dir-name-too-long", "train", (f"hydra.run.dir={{tmp}}/{LONG}",), ("File name too long", "255 bytes"), SUB),
    Case("run-dir-under-a-file", "train", ("hydra.run.dir={tmp}/file.txt/run",), ("file.txt", "Not a directory"), SUB,
         setup=_write("file.txt", "x")),
    Case("unknown-option", "train", ("--nope",), ("unrecognized option --nope", "key=value"), SUB),
    Case("unknown-launcher", "train", ("hydra/launcher=nope",), ("hydra/launcher/nope", "mole_joblib"), SUB),
    Case("fp16-on-the-cpu", "train", ("trainer.mixed_precision=fp16",), ("trainer.mixed_precision", "fp16")),
    Case("unknown-tracker", "train", ("trainer.log_with=[nope]",), ("trainer.log_with",)),
]


def _secret_case(id: str, cmd: str, args: tuple[str, ...], names: tuple[str, ...], sub: bool = False, **kw) -> Case:
    return Case(id, cmd, args, names, sub, absent=SECRET_PARTS, **kw)


SECURITY_CASES = [
    _secret_case("api-key-without-plus", "train", (f'wandb.api_key="{SECRET}"',), ("wandb.api_key", "<redacted>")),
    _secret_case("api-key-without-plus-command", "train", (f'wandb.api_key="{SECRET}"',), ("wandb.api_key",), SUB),
    _secret_case("hf-auth-token-bare", "params", (f"hub.hf_auth_token={SECRET}",), ("hub.hf_auth_token",)),
    _secret_case("sas-token-quoted", "params", (f"store.sas_token='{SECRET}'",), ("store.sas_token",)),
    _secret_case("private-key-in-a-bad-value", "train", (f'trainer.scheduler="private_key={SECRET}"',),
                 ("trainer.scheduler", "private_key=<redacted>")),
    _secret_case("passphrase-beside-a-bad-key", "train", (f'+x.passphrase="{SECRET}"', "trainer.lr=0"), ("trainer.lr",),
                 post=lambda tmp: _nothing_holds_the_secret(tmp)),
    _secret_case("oauth-token-beside-a-missing-file", "train", (f'+x.oauth_token="{SECRET}"', "data.path={tmp}/no.json"),
                 ("no.json does not exist",), SUB, post=lambda tmp: _nothing_holds_the_secret(tmp)),
    _secret_case("credential-beside-a-bad-seed", "params", (f'+db.credential="{SECRET}"', "seed=-1"), ("seed",)),
]


def _nothing_holds_the_secret(tmp: Path) -> None:
    for path in tmp.rglob("*"):
        assert not any(part in path.name for part in SECRET_PARTS[:2]), path
        if path.is_file():
            text = path.read_bytes().decode(errors="replace")
            assert not any(part in text for part in SECRET_PARTS[:2]), path


_FAMILY_OF = {
    "data files": ("missing-data-file", "empty-data-file", "malformed-json", "json-object-not-a-list",
                   "record-missing-a-field", "answer-not-an-option", "data-path-is-a-directory"),
    "checkpoints and run directories": (
        "init-from-another-method", "resume-with-another-config", "resume-from-a-damaged-checkpoint", "no-checkpoint",
        "checkpoint-dir-missing", "checkpoint-without-config", "checkpoint-is-a-file", "config-not-yaml",
        "adapter-missing", "adapter-from-another-method", "corrupted-adapter"),
}


def _family(case: Case, default: str) -> Case:
    from dataclasses import replace

    found = next((fam for fam, ids in _FAMILY_OF.items() if case.id in ids), default)
    return replace(case, family=found)


CASES = [
    *(_family(c, "configs") for c in BASE_CASES),
    *(_family(c, "configs") for c in CONFIG_CASES),
    *(_family(c, "data files") for c in DATA_CASES),
    *(_family(c, "checkpoints and run directories") for c in RUN_CASES),
    *(_family(c, "processes and signals") for c in PROCESS_CASES),
    *(_family(c, "security") for c in SECURITY_CASES),
]


# ---- running a case ----


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Finished tiny runs (untrained: max_steps=0) of two methods, and an interrupted one with a checkpoint."""
    from mole.recipes.train import run_train

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


@pytest.fixture
def restore_logging():
    """A command that got as far as opening its log (mole-eval's log_to) leaves handlers on the root logger
    that write to this test's captured streams: take them off again."""
    handlers = list(logging.root.handlers)
    yield
    for handler in logging.root.handlers[:]:
        if handler not in handlers:
            logging.root.removeHandler(handler)
            handler.close()
    logging.root.handlers[:] = handlers


def _snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file()}


def _nothing_lost_or_half_written(before: dict[str, str], root: Path) -> None:
    """Every file that was there is unchanged; nothing temporary is left; what was written is whole."""
    after = _snapshot(root)
    changed = sorted(k for k, h in before.items() if after.get(k) != h)
    assert not changed, f"changed or removed: {changed}"
    leftovers = sorted(k for k in after if k.endswith(".tmp") or "/.tmp-step-" in f"/{k}")
    assert not leftovers, f"temporary files left: {leftovers}"
    for name in sorted(set(after) - set(before)):
        if name.endswith(".json"):
            json.loads((root / name).read_text())  # a metrics.json or failure record is whole


@pytest.mark.parametrize("case", CASES, ids=[c.id + ("[SUB]" if c.sub else "") for c in CASES])
def test_user_error_is_one_line_naming_the_key_or_file(case: Case, runs, tmp_path, capsys, monkeypatch, restore_logging):
    monkeypatch.chdir(tmp_path)
    if case.setup is not None:
        case.setup(tmp_path, runs)
    before = _snapshot(tmp_path)
    args = _command_args(case, tmp_path)
    if case.sub:
        assert case.patch is None, "a patch works in-process only"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "MOLE_OUTPUT_DIR": str(tmp_path / "out")}
        extra = ([f"hydra.run.dir={tmp_path / 'train_run'}"]
                 if case.cmd == "train" and not any(a.startswith("hydra.run.dir=") for a in args) else [])
        proc = subprocess.run([sys.executable, "-m", f"mole.cli.{case.cmd}", *args, *extra], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    else:
        if case.patch is not None:
            case.patch(monkeypatch, tmp_path)
        try:
            code = _in_process(case, args, tmp_path)
        finally:
            monkeypatch.undo()
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
    for text in case.absent:
        assert text not in out + err, (text, line)
    _nothing_lost_or_half_written(before, tmp_path)
    if case.post is not None:
        case.post(tmp_path)


# ---- processes and signals: the real command stopped by a signal, or refused by another process's lock ----
#
# A signal ends the run with its own status (128 + signal) and one line that is not an error; the run keeps
# a resumable checkpoint and `metrics.json` with `interrupted: true`. These start `mole-train` with every
# micro-batch slowed down (tests/unit/training/test_checkpoint.py's driver and config), so each takes seconds: slow tier.


@dataclass(frozen=True)
class ProcessCase:
    id: str
    signals: tuple[str, ...]  # sent once training has started; none: another process holds the run directory
    status: int
    line: str  # the one line; {step}: the step metrics.json records, {run}, {pid}: the lock's holder
    checkpoint: bool = True  # a checkpoint of that step and metrics.json with interrupted: true are written
    args: tuple[str, ...] = ()


STOPPED = "mole-train: interrupted at step {step}; resume with trainer.resume=true"
SIGNAL_CASES = [
    ProcessCase("sigterm", ("SIGTERM",), 143, STOPPED),
    ProcessCase("sigint", ("SIGINT",), 130, STOPPED),
    ProcessCase("second-signal", ("SIGTERM", "SIGTERM"), 143,
                "mole-train: SIGTERM again; stopping now without a checkpoint", checkpoint=False,
                args=("trainer.max_steps=40",)),  # the second signal lands well before the run's end
    ProcessCase("run-dir-locked-by-another-pid", (), 2,
                "mole-train: error: run directory {run} is in use by another mole run (pid {pid}); wait for it "
                "to end, or give this run another directory (hydra.run.dir=DIR)", checkpoint=False),
]


def _owned_run_dir(run: Path) -> None:
    """What a live run has written so far (its notes, log and running record)."""
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("- trainer.lr=0.001\n")
    (run / "train.log").write_text("[step 0] the owner's log\n")
    (run / "metrics.json").write_text(json.dumps({"status": "running", "finished": False, "pid": 1}))


@pytest.mark.slow
@pytest.mark.timing
@pytest.mark.parametrize("case", SIGNAL_CASES, ids=[c.id for c in SIGNAL_CASES])
def test_a_stopped_or_refused_run_says_so_in_one_line_and_keeps_what_it_wrote(case: ProcessCase, tmp_path):
    import signal
    import time

    from mole.training import checkpoint as ckpt
    from tests.integration.test_signals import _start_slow, _wait_for_training
    from tests.unit.test_run_dir import _hold_lock

    run = tmp_path / "run"
    holder = None
    if not case.signals:
        _owned_run_dir(run)
        holder = _hold_lock(run)
    before = _snapshot(tmp_path)
    try:
        proc = _start_slow(run, *case.args)
        if case.signals:
            _wait_for_training(run, proc)
            for name in case.signals:
                proc.send_signal(getattr(signal, name))
                time.sleep(0.05)
        _, err = proc.communicate(timeout=180)
        assert holder is None or holder.poll() is None  # the owner goes on
    finally:
        if holder is not None:
            holder.stdin.close()
            holder.wait(timeout=30)
    assert proc.returncode == case.status, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
    expected = case.line.format(step=metrics.get("steps"), run=run, pid=holder.pid if holder else None)
    assert [ln for ln in err.splitlines() if ln.startswith("mole-train:")] == [expected]
    steps = [s for s, _ in ckpt.list_checkpoints(run)] if run.is_dir() else []
    if case.checkpoint:
        assert metrics["interrupted"] is True and metrics["finished"] is False and "failed" not in metrics
        assert metrics["status"] == "interrupted" and metrics["signal"] == case.signals[0]
        assert steps == [metrics["steps"]] and metrics["steps"] >= 1
        assert (run / "checkpoints" / f"step-{metrics['steps']}" / "trainer_state.json").is_file()
    else:
        assert steps == [] and not metrics.get("interrupted")
    assert not (run / "adapter.safetensors").exists()
    _nothing_lost_or_half_written(before, tmp_path)


def test_the_table_covers_every_family():
    counts = {fam: sum(c.family == fam for c in CASES) for fam in FAMILIES}
    counts["processes and signals"] += len(SIGNAL_CASES)
    assert all(n >= 5 for n in counts.values()), counts
    assert len(CASES) >= 120 and len({c.id for c in CASES}) == len(CASES)
