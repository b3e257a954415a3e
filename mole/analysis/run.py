"""``mole-analyze``'s work as plain functions: record a run's routing on labelled data and write the results.

:func:`analyze_run` rebuilds a finished run's model (``config.yaml`` + ``adapter.safetensors``, as
``mole-eval`` does), routes the records of a data config through it without gradients, and writes
into ``RUN_DIR/analysis/`` (or ``out``):

* ``analysis.json`` — per decoder layer and per routing module: expert activation counts and shares,
  average number of activated experts, balance entropy ``H(mean g)`` and certainty ``mean H(g)`` of the
  gates and of each router's own distribution (token / task router); for task routers (HMoRA hybrid)
  the main expert pairs per task (HMoRA Tables 13-16); the t-SNE source's gate vectors (a subsample) and
  their 2-D embedding.
* ``activation_counts.png``, ``entropy.png``, ``active_experts.png``, ``tsne.png`` (see
  :mod:`mole.analysis.plots`), and ``task_pairs.md`` when the model has task routers.

:func:`loss_curves` draws the training-loss curves of several runs on one plot (``metrics.json``'s
``train_loss``).

Statistics count real tokens only (padding excluded); every token of a record (prompt and response,
teacher-forced) is routed, and HMoRA's task encoder reads the prompt part as in training.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from mole.analysis import plots
from mole.analysis.collect import RoutingCollector, sinks_by_module
from mole.analysis.data import TASK_KEY, task_records
from mole.analysis.plots import plot_loss_curves, tsne_embedding
from mole.build import build_mole_model
from mole.data import Collator
from mole.data.collate import encode_record, question_ids
from mole.model.base import quantization
from mole.model.compile import compile_for_run
from mole.model.state import ADAPTER_FILE, load_adapter
from mole.routers.context import routing_inputs
from mole.routers.hybrid import reads_raw_question
from mole.run_dir import load_run_config, write_json
from mole.training.loop import prompt_mask, question_inputs
from mole.utils.errors import MoleConfigError

log = logging.getLogger(__name__)

ANALYSIS_DIR = "analysis"
ANALYSIS_FILE = "analysis.json"
FIGURES = ("activation_counts.png", "entropy.png", "active_experts.png", "tsne.png")
DEFAULT_MAX_POINTS = 2000


def _positive_int(value: Any, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise MoleConfigError(f"{key} must be a positive integer, got {value!r}")
    return value


def check_routed(cfg: DictConfig, run_dir: Path) -> None:
    """A run whose model has routers, else one line: routing analyses need a mixture with a router."""
    _, _, report = build_mole_model(cfg, meta=True)  # shapes only: cheap for any model
    if sum(report.routers_per_layer) == 0:
        method = cfg.get("method_name") or "this method"
        raise MoleConfigError(
            f"{run_dir}: method={method} has no routers (one expert or no gating in every layer), so there is "
            f"no routing to analyse; `mole-analyze curves {run_dir}` still plots its training loss"
        )


def analyze_run(
    run_dir: str | Path,
    data_cfg: DictConfig | None = None,
    *,
    out: str | Path | None = None,
    split: str = "val",
    per_task: int | None = None,
    batch_size: int | None = None,
    max_points: int = DEFAULT_MAX_POINTS,
    seed: int = 0,
    device: str | None = None,
    figures: bool = True,
    trust_remote_code: bool = False,
) -> dict:
    """Analyse a run's routing (see the module docstring) and return what ``analysis.json`` holds.

    Args:
        run_dir: a run directory written by ``mole-train``.
        data_cfg: the ``data`` node to route; ``None``: the run's own.
        out: output directory; default ``run_dir/analysis``.
        split: ``val`` (the run's held-out validation records), ``train`` or ``all``.
        per_task: at most this many records per task.
        batch_size: sequences per forward; default the run's ``trainer.eval_batch_size`` (or 8).
        max_points: gate vectors kept for t-SNE (uniform subsample of the sequences).
        seed: seeds the subsample and t-SNE.
        device: ``cpu`` / ``cuda``...; default CUDA when available.
        figures: draw the PNGs (``False``: JSON and Markdown only).
        trust_remote_code: the command line's permission for a Hub model's own code (never the run's).
    """
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir, trust_remote_code=trust_remote_code)
    adapter = run_dir / ADAPTER_FILE
    if not adapter.is_file():
        raise MoleConfigError(f"{adapter} not found (is the run finished? see its metrics.json)")
    max_points = _positive_int(max_points, "max_points")
    if batch_size is None:
        batch_size = (cfg.get("trainer") or {}).get("eval_batch_size") or 8
    batch_size = _positive_int(batch_size, "batch_size")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.device(device)
    except RuntimeError:
        raise MoleConfigError(f"device={device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    check_routed(cfg, run_dir)
    data_cfg = cfg.data if data_cfg is None else data_cfg
    records = task_records(data_cfg, seed=int(cfg.get("seed", 0)), split=split, per_task=per_task)
    cutoff = data_cfg.get("cutoff_len", 256)
    if not isinstance(cutoff, int) or isinstance(cutoff, bool) or cutoff < 1:
        raise MoleConfigError(f"data.cutoff_len must be a positive integer (tokens per example), got {cutoff!r}")
    template = data_cfg.get("template", "alpaca")

    model, tokenizer, _ = build_mole_model(cfg)
    load_adapter(model, adapter)
    model.to(device).eval()
    clock = compile_for_run(model, cfg.get("trainer"), device, quantization(cfg.model) != "none")  # as the run's trainer.compile says
    truncation = data_cfg.get("truncation", "right")  # a run config without the key was trained with right truncation
    kept = [(enc, r) for r in records if (enc := encode_record(r, tokenizer, cutoff, template, truncation)) is not None]
    if reads_raw_question(cfg.router):
        kept = [({**e, "question_ids": question_ids(r, tokenizer, cutoff)}, r) for e, r in kept]
    encoded, records = [e for e, _ in kept], [r for _, r in kept]  # records longer than the cutoff are left out
    tasks = [r[TASK_KEY] for r in records]
    collate = Collator(tokenizer.pad_token_id)
    collector = RoutingCollector(max_points=max_points, seed=seed)
    log.info("routing %d records (%s) through %s", len(records), ", ".join(sorted(set(tasks))), run_dir)
    with torch.no_grad(), sinks_by_module(model) as sinks:
        for start in range(0, len(encoded), batch_size):
            batch = {k: v.to(device) for k, v in collate(encoded[start : start + batch_size]).items()}
            with routing_inputs(model, prompt_mask(batch), question_inputs(batch)):
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            collector.add_batch(sinks, batch["attention_mask"], tasks[start : start + batch_size])
    if clock is not None:
        clock.stop()

    result: dict[str, Any] = {
        "run_dir": str(run_dir),
        "method": cfg.get("method_name"),
        "model": cfg.model.get("name"),
        "router": (cfg.get("router") or {}).get("_target_"),
        "data": {"name": data_cfg.get("name"), "split": split, "per_task": per_task, "cutoff_len": cutoff},
        **collector.result(),
    }
    result["tsne"] = _tsne(collector, seed)
    out_dir = Path(out) if out is not None else run_dir / ANALYSIS_DIR
    write_outputs(result, out_dir, figures=figures)
    return result


def _tsne(collector: RoutingCollector, seed: int) -> dict:
    """The t-SNE source, its subsampled per-sequence gate vectors, their task labels and 2-D embedding."""
    src = collector.tsne_source
    if src is None or collector.points.vectors is None:
        return {"skipped": "no routing outputs"}
    key, dist = src
    res = collector.points
    vectors = res.vectors.numpy()
    entry: dict[str, Any] = {
        "layer": key.layer,
        "module": key.name,
        "vectors_of": "task router probabilities (one per sequence)" if dist is not None
        else "gates averaged over each sequence's real tokens",
        "sequences_seen": res.seen,
        "labels": list(res.labels),
        "vectors": [[round(float(v), 5) for v in row] for row in vectors],
    }
    if vectors.shape[0] < 5:
        entry["skipped"] = f"t-SNE needs at least 5 sequences, got {vectors.shape[0]}"
        return entry

    entry["embedding"] = [[round(float(v), 4) for v in row] for row in tsne_embedding(vectors, seed)]
    return entry


def task_pairs_markdown(task_routers: list[dict]) -> str:
    """HMoRA Tables 13-16 for each task router, as Markdown."""
    lines = ["# Main expert pairs of the task routers (HMoRA Tables 13-16)", ""]
    for tr in task_routers:
        lines += [f"## layer {tr['layer']}, {tr['module']}", ""]
        share = tr["expert_share"]
        lines += ["Share of activations per expert (%, Table 13):", "",
                  "| expert | " + " | ".join(str(i) for i in range(len(share))) + " |",
                  "|---|" + "---|" * len(share),
                  "| share | " + " | ".join(f"{s:.2f}" for s in share) + " |", ""]
        th = tr["thresholds"]
        lines += ["Tasks whose main-expert-pair proportion reaches the threshold (Table 14):", "",
                  "| threshold | " + " | ".join(f">= {t}" for t in th) + " |",
                  "|---|" + "---|" * len(th),
                  "| tasks | " + " | ".join("—" if v is None else f"{100 * v:.2f}%" for v in th.values()) + " |", ""]
        lines += [f"Main expert pairs (Tables 15-16; recognised: proportion >= {tr['recognised_threshold']}):", "",
                  "| main expert pair | tasks | recognised | ratio |", "|---|---|---|---|"]
        for row in tr["pairs"]:
            pair = row["main_pair"] if isinstance(row["main_pair"], str) else "(" + ", ".join(map(str, row["main_pair"])) + ")"
            ratio = "—" if row["ratio"] is None else f"{100 * row['ratio']:.2f}%"
            lines.append(f"| {pair} | {row['tasks']} | {row['recognised']} | {ratio} |")
        lines += ["", "| task | samples | main expert pair | proportion |", "|---|---|---|---|"]
        for task, v in tr["per_task"].items():
            lines.append(f"| {task} | {v['samples']} | ({', '.join(map(str, v['main_pair']))}) | {v['proportion']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def write_outputs(result: dict, out_dir: Path, figures: bool = True) -> list[Path]:
    """``analysis.json``, ``task_pairs.md`` (task routers only) and the figures; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / ANALYSIS_FILE]
    write_json(out_dir / ANALYSIS_FILE, result)
    if result["task_routers"]:
        (out_dir / "task_pairs.md").write_text(task_pairs_markdown(result["task_routers"]))
        written.append(out_dir / "task_pairs.md")
    if not figures or not result["layers"]:
        return written

    name = f"{result.get('method') or ''} ({Path(result['run_dir']).name})".strip()
    layers = result["layers"]
    written.append(plots.plot_activation_counts(layers, out_dir / "activation_counts.png", f"expert activations: {name}"))
    written.append(plots.plot_entropy(layers, out_dir / "entropy.png", f"routing entropies: {name}"))
    written.append(plots.plot_active_experts(layers, out_dir / "active_experts.png", f"activated experts: {name}"))
    tsne = result["tsne"]
    if "embedding" in tsne:
        where = f"layer {tsne['layer']} {tsne['module']}"
        written.append(plots.plot_tsne(np.asarray(tsne["embedding"]), tsne["labels"], out_dir / "tsne.png",
                                       f"t-SNE of gate vectors, {where}: {name}"))
    return written


# ---------------------------------------------------------------------------------------------------
# training-loss curves (MoR Fig. 4/5)

CURVE_KEYS = ("loss", "lm_loss")


def read_curve(run_dir: str | Path, key: str = "loss") -> tuple[str, list[int], list[float]]:
    """``(label, steps, values)`` of a run's ``metrics.json`` ``train_loss`` history.

    The label is the run's method, and its directory name when that differs.
    """
    run_dir = Path(run_dir)
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise MoleConfigError(f"{path} not found (expected a run directory written by mole-train)")
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MoleConfigError(f"{path} is not valid JSON ({err.msg}, line {err.lineno})") from None
    history = metrics.get("train_loss") if isinstance(metrics, dict) else None
    points = [(h["step"], h[key]) for h in history or [] if isinstance(h, dict) and isinstance(h.get(key), (int, float))
              and isinstance(h.get("step"), int) and math.isfinite(h[key])]
    if not points:
        raise MoleConfigError(f"{path}: no train_loss history with {key!r} values (did the run take a step?)")
    method = metrics.get("method")
    name = run_dir.resolve().name
    label = name if not method or method == name else f"{method} ({name})"
    steps, values = zip(*points, strict=True)
    return label, list(steps), list(values)


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over ``window`` steps (``1``: unchanged)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def loss_curves(run_dirs: list[str | Path], out: str | Path, key: str = "loss", window: int = 1) -> Path:
    """Plot the training-loss curves of ``run_dirs`` on one figure (MoR Fig. 4/5); legend = method (run)."""
    if not run_dirs:
        raise MoleConfigError("curves: name at least one run directory")
    if key not in CURVE_KEYS:
        raise MoleConfigError(f"key must be one of {list(CURVE_KEYS)}, got {key!r}")
    window = _positive_int(window, "smooth")
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise MoleConfigError(f"out={str(out)!r} must name a .png file")
    curves = []
    for run_dir in run_dirs:
        label, steps, values = read_curve(run_dir, key)
        curves.append((label, steps, smooth(values, window)))

    ylabel = {"loss": "training loss (LM + auxiliary)", "lm_loss": "training LM loss"}[key]
    if window > 1:
        ylabel += f", moving average over {window} steps"
    return plot_loss_curves(curves, out, ylabel=ylabel)
