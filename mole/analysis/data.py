"""The records a routing analysis runs on, each labelled with its task (the data set it came from).

The task of a record is the stem of the file it was read from (``mc_train.json`` -> ``mc_train``; with
several files of one stem in different directories, ``parent/stem``), or the Hugging Face dataset name
(``name`` or ``name:config``). The split is chosen like the training run's
(:func:`mole.data.load_datasets`): the same ``data.max_records`` cut and the same fixed-seed held-out
validation records (``data.val_size``, ``data.split_seed``), or ``data.val_path``'s files.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mole.data import read_records, split_validation
from mole.data.sources import load_hf_records
from mole.utils.errors import MoleConfigError

SPLITS = ("val", "train", "all")
TASK_KEY = "task"


def _paths(value) -> list[str]:
    if value is None:
        return []
    return [str(value)] if isinstance(value, str) else [str(v) for v in value]


def _task_names(paths: list[str]) -> list[str]:
    """A short, unique task name per file: its stem, or ``parent/stem`` where stems repeat."""
    stems = [Path(p).stem for p in paths]
    return [f"{Path(p).parent.name}/{s}" if stems.count(s) > 1 else s for p, s in zip(paths, stems, strict=True)]


def _tagged(paths: list[str], key: str) -> list[dict[str, str]]:
    out = []
    for path, task in zip(paths, _task_names(paths), strict=True):
        out.extend({**r, TASK_KEY: task} for r in read_records(path, key))
    return out


def task_records(data_cfg: DictConfig, seed: int, split: str = "val", per_task: int | None = None) -> list[dict[str, str]]:
    """Records with a ``task`` field, from the ``data`` config node (mirrors :func:`mole.data.load_datasets`).

    Args:
        data_cfg: a ``data`` config node (the run's own, or one composed from ``data=NAME``).
        seed: the run's seed (the split seed when ``data.split_seed`` is null).
        split: ``val`` (the held-out validation records), ``train`` (the rest) or ``all``.
        per_task: keep at most this many records of each task (in file order), ``None``: all.
    """
    if split not in SPLITS:
        raise MoleConfigError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if per_task is not None and (not isinstance(per_task, int) or isinstance(per_task, bool) or per_task < 1):
        raise MoleConfigError(f"per_task must be a positive integer, got {per_task!r}")
    paths = _paths(data_cfg.get("path"))
    if paths and data_cfg.get("hf_name"):
        raise MoleConfigError("set either data.path (local files) or data.hf_name (Hugging Face dataset), not both")
    if paths:
        records = _tagged(paths, "data.path")
    elif data_cfg.get("hf_name"):
        name = str(data_cfg.hf_name)
        fields = OmegaConf.to_container(data_cfg.get("fields") or {}) or {k: k for k in ("instruction", "input", "output", "answer")}
        kwargs = OmegaConf.to_container(data_cfg.get("hf_kwargs") or {}, resolve=True)
        task = name + (f":{data_cfg.hf_config}" if data_cfg.get("hf_config") else "")
        rows = load_hf_records(name, data_cfg.get("hf_config"), data_cfg.get("hf_split", "train"), fields, kwargs)
        records = [{**r, TASK_KEY: task} for r in rows]
    else:
        raise MoleConfigError("no data to analyse: set data.path=FILE (LLM-Adapters JSON) or data.hf_name=NAME")
    limit = data_cfg.get("max_records")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise MoleConfigError(f"data.max_records must be null or a positive integer, got {limit!r}")
    if limit:
        records = records[: int(limit)]
    val_paths = _paths(data_cfg.get("val_path"))
    if val_paths:
        train, val = records, _tagged(val_paths, "data.val_path")
    else:
        split_seed = data_cfg.get("split_seed")
        train, val = split_validation(records, data_cfg.get("val_size", 0.1), seed if split_seed is None else split_seed)
    chosen = {"val": val, "train": train, "all": train + val}[split]
    if not chosen:
        raise MoleConfigError(
            "the data config holds out no validation records (data.val_size=0 and no data.val_path); "
            "analyse the training records with split=train, or set data.val_size / data.val_path"
        )
    if per_task is not None:
        seen: dict[str, int] = {}
        kept = []
        for r in chosen:
            seen[r[TASK_KEY]] = seen.get(r[TASK_KEY], 0) + 1
            if seen[r[TASK_KEY]] <= per_task:
                kept.append(r)
        chosen = kept
    return chosen
