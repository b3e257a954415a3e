"""Training data: LLM-Adapters-format records, prompt templates, tokenisation with prompt masking."""

from omegaconf import DictConfig, OmegaConf

from mole.data.collate import IGNORE_INDEX, Collator, encode_records
from mole.data.prompts import format_prompt
from mole.data.sources import fixture_path, load_hf_records, read_records, split_validation
from mole.utils.errors import MoleConfigError

__all__ = [
    "IGNORE_INDEX",
    "Collator",
    "encode_records",
    "fixture_path",
    "format_prompt",
    "load_datasets",
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


def load_datasets(data_cfg: DictConfig, seed: int):
    """Train and validation records from the ``data`` config node.

    ``data.path`` (one file or a list) or ``data.hf_name`` gives the training records; ``data.val_path``
    a separate validation file, else ``data.val_size`` of the training records are held out with
    ``data.split_seed`` (falling back to ``seed``).
    """
    paths = _paths(data_cfg.get("path"))
    if paths and data_cfg.get("hf_name"):
        raise MoleConfigError("set either data.path (local files) or data.hf_name (Hugging Face dataset), not both")
    if paths:
        records = [r for p in paths for r in read_records(p, "data.path")]
    elif data_cfg.get("hf_name"):
        fields = OmegaConf.to_container(data_cfg.get("fields") or {}) or {k: k for k in ("instruction", "input", "output", "answer")}
        kwargs = OmegaConf.to_container(data_cfg.get("hf_kwargs") or {}, resolve=True)
        records = load_hf_records(data_cfg.hf_name, data_cfg.get("hf_config"), data_cfg.get("hf_split", "train"), fields, kwargs)
    else:
        raise MoleConfigError("no training data: set data.path=FILE (LLM-Adapters JSON) or data.hf_name=NAME")
    limit = data_cfg.get("max_records")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise MoleConfigError(f"data.max_records must be null or a positive integer, got {limit!r}")
    if limit:
        records = records[: int(limit)]
    val_paths = _paths(data_cfg.get("val_path"))
    if val_paths:
        return records, [r for p in val_paths for r in read_records(p, "data.val_path")]
    split_seed = data_cfg.get("split_seed")
    return split_validation(records, data_cfg.get("val_size", 0.1), seed if split_seed is None else split_seed)
