"""Where training records come from: local files in the LLM-Adapters format, or Hugging Face datasets.

A record is a dict with ``instruction`` and ``output`` (required) and ``input``, ``answer`` (optional),
as in LLM-Adapters' ``dataset/*.json``. Local files may be a JSON list or JSON lines. Hugging Face
datasets (``data.hf_name``, for users who are online) are mapped onto those fields by ``data.fields``.

Multiple-choice records name their options in the instruction's last line, LLM-Adapters style:
``Answer format: answer1/answer2/answer3/answer4`` (ARC, OBQA), ``true/false`` (BoolQ),
``solution1/solution2`` (PIQA), ``ending1/.../ending4`` (HellaSwag), ``option1/option2`` (WinoGrande).
When a record has such a line and a non-empty ``answer``, the answer must be one of those options
(case-insensitive); records without the line (math, free text) are not checked.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mole.data.formats import converter
from mole.utils.errors import MoleConfigError, io_error

REQUIRED = ("instruction", "output")
#: Roles of a ``messages`` record (``data.format=messages``), OpenAI style.
ROLES = ("system", "user", "assistant")
#: Optional fields kept when a record has them (``subject``: the group of MMLU-style macro accuracy).
EXTRA_FIELDS = ("subject",)
_ANSWER_FORMAT = re.compile(r"Answer format:[ \t]*(\S[^\n]*)", re.IGNORECASE)
FIXTURES_DIR = Path(__file__).resolve().parent / "fixtures"


def fixture_path(name: str) -> str:
    """Absolute path of a fixture shipped with mole (``mole/data/fixtures/<name>``)."""
    path = FIXTURES_DIR / name
    if not path.is_file():
        raise MoleConfigError(f"no shipped fixture named {name!r}; available: {sorted(p.name for p in FIXTURES_DIR.glob('*.json'))}")
    return str(path)


def answer_options(instruction: str) -> list[str] | None:
    """The options of an ``Answer format: a/b/c`` line (lower case), or ``None`` without one."""
    match = _ANSWER_FORMAT.search(instruction)
    if match is None:
        return None
    options = [o.strip().lower() for o in match.group(1).strip().split("/") if o.strip()]
    return options if len(options) >= 2 else None


def _check_records(records: list[Any], where: str, lines: Sequence[int] | None = None) -> list[dict[str, str]]:
    """Records checked against the LLM-Adapters layout; ``lines``: each record's line (JSON lines files).

    Messages count records from 1, as a user reading the file does.
    """
    if not records:
        raise MoleConfigError(f"{where}: no records (expected a non-empty list of instruction/output records)")
    out = []
    for i, rec in enumerate(records):
        at = f"record {i + 1}" + (f" (line {lines[i]})" if lines else "")
        if not isinstance(rec, dict):
            raise MoleConfigError(f"{where}: {at} is a {type(rec).__name__}, expected an object with fields {list(REQUIRED)}")
        for key in REQUIRED:
            if key not in rec or not isinstance(rec[key], str):
                raise MoleConfigError(
                    f"{where}: {at} lacks the text field {key!r} (LLM-Adapters format: instruction, input, output, answer)"
                )
        clean = {k: ("" if rec.get(k) is None else str(rec.get(k))) for k in ("instruction", "input", "output", "answer")}
        clean.update({k: str(rec[k]) for k in EXTRA_FIELDS if rec.get(k) is not None})
        options = answer_options(clean["instruction"])
        if options and clean["answer"].strip() and clean["answer"].strip().lower() not in options:
            raise MoleConfigError(
                f"{where}: {at} has answer {clean['answer']!r}, which is not one of the options of its "
                f"'Answer format:' line {options}"
            )
        out.append(clean)
    return out


# leading bytes of compressed or archived files: (magic, what it is, how to unpack it)
_PACKED = ((b"\x1f\x8b", "gzip-compressed", "gunzip"), (b"BZh", "bzip2-compressed", "bunzip2"),
           (b"\xfd7zXZ\x00", "xz-compressed", "unxz"), (b"\x28\xb5\x2f\xfd", "zstd-compressed", "unzstd"),
           (b"PK\x03\x04", "a zip archive", "unzip"), (b"PAR1", "a Parquet file", "convert it to JSON lines"))


def _read_text(path: Path, where: str) -> str:
    """The file's text (UTF-8, a BOM allowed); one-line errors for unreadable, compressed or non-UTF-8 files."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise io_error(path, err, "read") from None
    for magic, what, unpack in _PACKED:
        if data.startswith(magic):
            raise MoleConfigError(f"{where} is {what}, not JSON text; {unpack} it first and point {where.split(':')[0]} "
                                  "at the result")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise MoleConfigError(
            f"{where} is not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}); re-encode it as UTF-8, "
            "e.g. iconv -f latin1 -t utf-8"
        ) from None


def _parse_json_lines(text: str, where: str) -> tuple[list[Any], list[int]]:
    records, lines = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise MoleConfigError(f"{where} is not valid JSON lines: line {number} (record {len(records) + 1}), "
                                  f"column {err.colno}: {err.msg}") from None
        lines.append(number)
    return records, lines


def read_records(path: str | Path, key: str = "data.path", hint: str = "") -> list[dict[str, str]]:
    """Read a local LLM-Adapters JSON list (``.json``) or JSON-lines (``.jsonl``) file.

    ``hint`` is appended to the error for a missing file (where to put it, or how to go online).
    """
    records, where, lines = _read_json_records(path, key, hint)
    return _check_records(records, where, lines)


def _read_json_records(path: str | Path, key: str, hint: str) -> tuple[list[Any], str, list[int] | None]:
    """The raw records of a JSON list or JSON-lines file, the ``key: path`` that errors name, and each
    record's line (JSON lines; ``None`` for a JSON list)."""
    path = Path(path).expanduser()
    where = f"{key}: {path}"
    if not path.exists():
        raise MoleConfigError(f"{where} does not exist" + (f"; {hint}" if hint else ""))
    if not path.is_file():
        raise MoleConfigError(f"{where} is not a file")
    records, lines = load_json_records(path, where)
    return records, where, lines


def load_json_list(path: Path, where: str) -> list[Any]:
    """The list in a ``.json`` file, or the objects of a ``.jsonl`` file (one a line); errors name ``where``."""
    return load_json_records(path, where)[0]


def load_json_records(path: Path, where: str) -> tuple[list[Any], list[int] | None]:
    """The records of a ``.json`` list or ``.jsonl`` file, and (JSON lines) the line of each one."""
    text = _read_text(path, where)
    if not text.strip():
        raise MoleConfigError(f"{where} is empty")
    if path.suffix == ".jsonl":
        return _parse_json_lines(text, where)
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        hint = ("; it looks like JSON lines (one record per line): name it .jsonl"
                if err.msg == "Extra data" and text.lstrip().startswith("{") else "")
        raise MoleConfigError(f"{where} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}){hint}") from None
    if not isinstance(records, list):
        raise MoleConfigError(f"{where} holds a JSON {type(records).__name__}, expected a list of records")
    return records, None


def check_messages(record: Any, where: str, i: int) -> dict[str, list[dict[str, str]]]:
    """One ``messages`` record: ``{"messages": [{"role", "content"}, ...]}`` or the bare list of messages.

    Every role is one of :data:`ROLES`, every content a non-empty string, and at least one turn is the
    assistant's (the turns that are learned); a problem is one line naming ``where`` and record ``i``.
    """
    messages = record.get("messages") if isinstance(record, dict) else record
    if not isinstance(messages, list) or not messages:
        raise MoleConfigError(f"{where}: record {i} has no 'messages' list (expected "
                              '{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]})')
    out = []
    for j, msg in enumerate(messages, start=1):
        if not isinstance(msg, dict):
            raise MoleConfigError(f"{where}: record {i}, message {j} is a {type(msg).__name__}, expected an object "
                                  "with 'role' and 'content'")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise MoleConfigError(f"{where}: record {i}, message {j} has role {role!r}; expected one of {list(ROLES)}")
        if not isinstance(content, str) or not content.strip():
            raise MoleConfigError(f"{where}: record {i}, message {j} ({role}) has empty or non-text content")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise MoleConfigError(f"{where}: record {i} has no assistant turn (nothing to learn)")
    return {"messages": out}


def read_message_records(path: str | Path, key: str = "data.path", hint: str = "") -> list[dict[str, Any]]:
    """Read a local ``messages`` file (``data.format=messages``): a JSON list or JSON lines of chats."""
    records, where, _ = _read_json_records(path, key, hint)
    return [check_messages(r, where, i + 1) for i, r in enumerate(records)]


def load_hf_messages(name: str, config: str | None, split: str, kwargs: dict | None = None, column: str = "messages",
                     key: str = "data.hf_name") -> list[dict[str, Any]]:
    """``messages`` records from the ``column`` column of a Hugging Face dataset (``data.format=messages``)."""
    ds = _load_hf(name, config, split, kwargs, key)
    if column not in ds.column_names:
        raise MoleConfigError(f"{key}={name!r} has no {column!r} column (columns: {ds.column_names})")
    return [check_messages(row[column], f"{key}: {name}", i + 1) for i, row in enumerate(ds)]


def _load_hf(name: str, config: str | None, split: str, kwargs: dict | None, key: str):
    import datasets

    try:
        return datasets.load_dataset(name, config, split=split, **(kwargs or {}))
    except Exception as err:  # noqa: BLE001 - datasets raises many types; report one line
        raise MoleConfigError(
            f"{key}={name!r} could not be loaded ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            "offline, use a local file in the LLM-Adapters format instead (see docs/datasets.md)"
        ) from None


def load_hf_records(
    name: str, config: str | None, split: str, fields: dict[str, str] | None, kwargs: dict | None = None,
    fmt: str | None = None, key: str = "data.hf_name",
) -> list[dict[str, str]]:
    """Records from ``datasets.load_dataset(name, config, split=split, **kwargs)``.

    Rows become records through the converter ``fmt`` (:mod:`mole.data.formats`, ``data.hf_format``),
    else by renaming columns with ``fields`` ({our field: their column}; identity when ``None``).
    A Hub name needs the network (or a filled ``datasets`` cache); a builder such as ``json`` with
    ``data.hf_kwargs.data_files`` works offline.
    """
    convert = converter(fmt, key.rsplit(".", 1)[0] + ".hf_format") if fmt else None
    fields = fields or {k: k for k in ("instruction", "input", "output", "answer")}
    ds = _load_hf(name, config, split, kwargs, key)
    if convert is not None:
        mapped = [rec for rec in map(convert, ds) if rec is not None]
    else:
        mapped = [{ours: row.get(theirs, "") for ours, theirs in fields.items()} for row in ds]
    return _check_records(mapped, f"{key}: {name}")


def split_validation(
    records: Sequence[dict[str, str]], val_size: float | int, seed: int
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Hold out a fixed-seed validation split: ``val_size`` < 1 is a fraction, >= 1 a record count."""
    n = len(records)
    if val_size is None or val_size == 0:
        return list(records), []
    if val_size < 0 or (val_size >= 1 and int(val_size) != val_size):
        raise MoleConfigError(f"data.val_size must be a fraction in [0, 1) or a whole number of records, got {val_size!r}")
    n_val = int(round(n * val_size)) if val_size < 1 else int(val_size)
    n_val = max(1, n_val)
    if n_val >= n:
        raise MoleConfigError(f"data.val_size={val_size} leaves no training records out of {n}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    train = [r for i, r in enumerate(records) if i not in val_idx]
    val = [r for i, r in enumerate(records) if i in val_idx]
    return train, val
