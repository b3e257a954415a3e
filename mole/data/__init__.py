"""Training data: LLM-Adapters-format records, prompt templates, tokenisation with prompt masking."""

import logging

from omegaconf import DictConfig, OmegaConf

from mole.data.collate import IGNORE_INDEX, Collator, encode_records, encode_split
from mole.data.prompts import format_prompt
from mole.data.sources import (
    fixture_path,
    load_hf_messages,
    load_hf_records,
    read_message_records,
    read_records,
    split_validation,
)
from mole.data.truncation import check_truncation
from mole.utils.errors import MoleConfigError

__all__ = [
    "IGNORE_INDEX",
    "Collator",
    "encode_datasets",
    "encode_records",
    "encode_split",
    "fixture_path",
    "format_prompt",
    "load_datasets",
    "read_message_records",
    "read_records",
    "split_validation",
]


def _paths(value) -> list[str]:
    """``data.path`` may be one path or a list of paths."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


SOURCES = (None, "local", "hf")
FORMATS = ("llm_adapters", "messages")


def _data_format(data_cfg: DictConfig) -> str:
    """``data.format``: LLM-Adapters records, or ``messages`` chats (which need ``data.template=chat``)."""
    fmt = data_cfg.get("format") or "llm_adapters"
    if fmt not in FORMATS:
        raise MoleConfigError(f"data.format must be one of {list(FORMATS)}, got {fmt!r}")
    if fmt == "messages" and data_cfg.get("template", "alpaca") != "chat":
        raise MoleConfigError(f"data.format=messages needs data.template=chat (the tokenizer's chat template), "
                              f"got data.template={data_cfg.get('template')}")
    return fmt


log = logging.getLogger(__name__)


def _missing_hint(data_cfg: DictConfig) -> str:
    hf = data_cfg.get("hf_name")
    online = f"or, online, load it from the Hugging Face Hub with data.source=hf ({hf})" if hf else ""
    return ("put the file there (LLM-Adapters JSON or JSON lines; data.root / $MOLE_DATA_DIR sets the folder) "
            + (online or "or point data.path at your copy") + "; debug=smoke trains on a shipped fixture instead")


def load_datasets(data_cfg: DictConfig, seed: int):
    """Train and validation records from the ``data`` config node.

    ``data.source`` picks ``data.path`` (``local``: one file or a list) or ``data.hf_name`` (``hf``); with
    ``data.source=null`` whichever of the two is set. ``data.smoke=true`` trains on the shipped fixture
    ``data.fixture`` instead (debug=smoke). ``data.val_path`` gives a separate validation file, else
    ``data.val_size`` of the training records are held out with ``data.split_seed`` (falling back to ``seed``).
    """
    source = data_cfg.get("source")
    if source not in SOURCES:
        raise MoleConfigError(f"data.source must be null, local or hf, got {source!r}")
    paths = _paths(data_cfg.get("path"))
    hf_name = data_cfg.get("hf_name")
    val_paths = _paths(data_cfg.get("val_path"))
    if data_cfg.get("smoke") and data_cfg.get("fixture"):
        paths, hf_name, source, val_paths = [fixture_path(f) for f in _paths(data_cfg.fixture)], None, "local", []
    if source is None and paths and hf_name:
        raise MoleConfigError("set either data.path (local files) or data.hf_name (Hugging Face dataset), not both "
                              "(or choose one with data.source=local|hf)")
    use_local = bool(paths) and source != "hf"
    messages = _data_format(data_cfg) == "messages"
    read = read_message_records if messages else read_records
    if use_local:
        hint = _missing_hint(data_cfg)
        records = [r for p in paths for r in read(p, "data.path", hint)]
    elif hf_name and source != "local" and messages:
        kwargs = OmegaConf.to_container(data_cfg.hf_kwargs, resolve=True) if data_cfg.get("hf_kwargs") else {}
        records = load_hf_messages(hf_name, data_cfg.get("hf_config"), data_cfg.get("hf_split", "train"), kwargs)
    elif hf_name and source != "local":
        fields = OmegaConf.to_container(data_cfg.fields) if data_cfg.get("fields") else None
        kwargs = OmegaConf.to_container(data_cfg.hf_kwargs, resolve=True) if data_cfg.get("hf_kwargs") else {}
        records = load_hf_records(hf_name, data_cfg.get("hf_config"), data_cfg.get("hf_split", "train"), fields, kwargs,
                                  fmt=data_cfg.get("hf_format"))
    else:
        raise MoleConfigError(f"no training data for data.source={source}: set data.path=FILE (LLM-Adapters JSON) "
                              "or data.hf_name=NAME")
    limit = data_cfg.get("max_records")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise MoleConfigError(f"data.max_records must be null or a positive integer, got {limit!r}")
    if limit:
        records = records[: int(limit)]
    if val_paths:
        return records, [r for p in val_paths for r in read(p, "data.val_path")]
    split_seed = data_cfg.get("split_seed")
    return split_validation(records, data_cfg.get("val_size", 0.1), seed if split_seed is None else split_seed)


def _training_source(data_cfg: DictConfig) -> str:
    """The training data as the user named it, for messages (``data.path=...`` or ``data.hf_name=...``)."""
    if data_cfg.get("smoke") and data_cfg.get("fixture"):
        return f"data.fixture={_paths(data_cfg.fixture)}"
    paths = _paths(data_cfg.get("path"))
    if paths and data_cfg.get("source") != "hf":
        return f"data.path={paths[0] if len(paths) == 1 else paths}"
    return f"data.hf_name={data_cfg.get('hf_name')}"


def encode_datasets(data_cfg: DictConfig, tokenizer, train_records, val_records, question: bool = False):
    """Tokenise both splits into ``data.cutoff_len`` tokens (``data.truncation``); report what was cut.
    ``question``: every example also carries its raw question's token ids (``router.task_encoder.input=raw``).

    Returns ``(train examples, validation examples, info)``; ``info`` (for ``metrics.json``) holds the record
    counts and, under ``truncation``, the counts of :class:`~mole.data.truncation.TruncationStats` per split.
    A training split with nothing to learn, or a validation split that loses every record, is an error
    naming the file and the cutoff.
    """
    cutoff = data_cfg.get("cutoff_len", 256)
    if not isinstance(cutoff, int) or isinstance(cutoff, bool) or cutoff < 1:
        raise MoleConfigError(f"data.cutoff_len must be a positive integer (tokens per example), got {cutoff!r}")
    mode = check_truncation(data_cfg.get("truncation", "prompt_left"))
    template = data_cfg.get("template", "alpaca")
    train_set, train_stats = encode_split(train_records, tokenizer, cutoff, template, mode, question)
    val_set, val_stats = encode_split(val_records, tokenizer, cutoff, template, mode, question)
    source = _training_source(data_cfg)
    if not train_set:
        raise MoleConfigError(
            f"{source}: none of the {train_stats.records} training records fits data.cutoff_len={cutoff} tokens with "
            f"data.truncation={mode} (the response alone is longer); raise data.cutoff_len"
        )
    if train_stats.empty_output == train_stats.kept:
        raise MoleConfigError(
            f"{source}: every training record kept within data.cutoff_len={cutoff} has an empty output: nothing to "
            "learn but the end-of-sequence token (the `output` field holds the answer to train on)"
        )
    if val_records and not val_set:
        val_source = (f"data.val_path={_paths(data_cfg.val_path)}" if data_cfg.get("val_path")
                      else f"the validation split of {source} (data.val_size={data_cfg.get('val_size')})")
        raise MoleConfigError(
            f"{val_source} is empty: all {val_stats.records} records are longer than data.cutoff_len={cutoff} tokens "
            f"(data.truncation={mode}); raise data.cutoff_len"
        )
    lost = train_stats.truncated + train_stats.dropped + val_stats.truncated + val_stats.dropped
    (log.warning if lost else log.info)(
        "data.cutoff_len=%d, data.truncation=%s: train %s; validation %s", cutoff, mode, train_stats.summary(),
        val_stats.summary() if val_records else "none")
    info = {"train_records": len(train_set), "val_records": len(val_set),
            "truncation": {"cutoff_len": cutoff, "mode": mode, "train": train_stats.as_dict(),
                           "val": val_stats.as_dict()}}
    return train_set, val_set, info
