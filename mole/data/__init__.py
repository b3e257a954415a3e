"""Training data: LLM-Adapters-format records, prompt templates, tokenisation with prompt masking."""

from omegaconf import DictConfig, OmegaConf

from mole.data.collate import IGNORE_INDEX, Collator, encode_records
from mole.data.prompts import format_prompt
from mole.data.sources import (
    fixture_path,
    load_hf_messages,
    load_hf_records,
    read_message_records,
    read_records,
    split_validation,
)
from mole.utils.errors import MoleConfigError

__all__ = [
    "IGNORE_INDEX",
    "Collator",
    "encode_records",
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
