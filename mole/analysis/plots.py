"""The analysis figures (matplotlib, Agg backend: no display needed), drawn from ``analysis.json`` values.

* :func:`plot_activation_counts` — layer x expert heatmap of activations (MoR Fig. 3/6).
* :func:`plot_entropy` — balance ``H(mean g)`` (dotted) and certainty ``mean H(g)`` (solid) per layer
  (HMoRA Fig. 3).
* :func:`plot_active_experts` — average number of activated experts per layer (DynMoLE Fig. 6, MoA Fig. 4).
* :func:`plot_tsne` — t-SNE of gate vectors coloured by task (HMoRA Fig. 4).
* :func:`plot_loss_curves` — training-loss curves of several runs on one plot (MoR Fig. 4/5).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot_activation_counts(layers: list[dict], path: Path, title: str = "") -> Path:
    """Heatmap: one row per layer, one column per expert; colour = the expert's share of the layer's
    activations (comparable across layers of different widths), cells annotated with the counts.
    Experts a layer does not have are blank."""
    plt = _pyplot()
    width = max(layer["num_experts"] for layer in layers)
    counts = np.full((len(layers), width), np.nan)
    for r, layer in enumerate(layers):
        c = np.asarray(layer["activation_counts"], dtype=float)
        counts[r, : len(c)] = c
    totals = np.nansum(counts, axis=1, keepdims=True)
    share = np.divide(counts, totals, out=np.full_like(counts, np.nan), where=totals > 0)
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * width, 1.2 + 0.4 * len(layers)))
    im = ax.imshow(np.ma.masked_invalid(share), aspect="auto", cmap="viridis")
    ax.set_xticks(range(width))
    ax.set_yticks(range(len(layers)), [str(layer["layer"]) for layer in layers])
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    if width * len(layers) <= 400:
        top = np.nanmax(share) if np.isfinite(share).any() else 1.0
        for r in range(len(layers)):
            for c in range(width):
                if not math.isnan(counts[r, c]):
                    light = share[r, c] > 0.6 * top  # dark text on the bright end of viridis
                    ax.text(c, r, f"{int(counts[r, c])}", ha="center", va="center", fontsize=7,
                            color="black" if light else "white")
    fig.colorbar(im, ax=ax, label="share of the layer's activations")
    ax.set_title(title or "expert activation counts")
    return _save(fig, path)


def plot_entropy(layers: list[dict], path: Path, title: str = "") -> Path:
    """HMoRA Fig. 3 style: per layer, ``H(mean g)`` dotted (balance, higher = more balanced) and
    ``mean H(g)`` solid (certainty, lower = more certain) of the gates; for hybrid routing also of the
    token and task routers' own distributions; ``log E`` as a grey step."""
    plt = _pyplot()
    x = [layer["layer"] for layer in layers]
    fig, ax = plt.subplots(figsize=(7, 4))
    series = [("gates", lambda layer: layer)]
    if any("task_router" in layer for layer in layers):
        series += [("token router", lambda layer: layer.get("token_router")),
                   ("task router", lambda layer: layer.get("task_router"))]
    for i, (name, get) in enumerate(series):
        color = f"C{i}"
        for key, style, what in (("balance_entropy", ":", "balance H(mean g)"), ("certainty_entropy", "-", "certainty mean H(g)")):
            ys = [None if get(layer) is None else get(layer).get(key) for layer in layers]
            xs = [xi for xi, y in zip(x, ys, strict=True) if y is not None]
            ys = [y for y in ys if y is not None]
            if ys:
                ax.plot(xs, ys, style, marker="o", color=color, label=f"{name}: {what}")
    ax.step(x, [math.log(layer["num_experts"]) if layer["num_experts"] > 1 else 0.0 for layer in layers],
            where="mid", color="grey", lw=0.8, label="log E")
    ax.set_xticks(x)
    ax.set_xlabel("layer")
    ax.set_ylabel("entropy (nats)")
    ax.legend(fontsize=7)
    ax.set_title(title or "routing balance and certainty")
    return _save(fig, path)


def plot_active_experts(layers: list[dict], path: Path, title: str = "") -> Path:
    """Bars: average number of activated experts per layer; markers: the layer's number of experts."""
    plt = _pyplot()
    x = np.arange(len(layers))
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(layers) + 2), 4))
    vals = [layer["avg_active_experts"] or 0.0 for layer in layers]
    ax.bar(x, vals, color="C0", label="average activated experts")
    ax.plot(x, [layer["num_experts"] for layer in layers], "k_", markersize=14, label="experts in the layer")
    ax.set_xticks(x, [str(layer["layer"]) for layer in layers])
    ax.set_xlabel("layer")
    ax.set_ylabel("experts")
    ax.legend(fontsize=8)
    ax.set_title(title or "average number of activated experts")
    return _save(fig, path)


def tsne_embedding(vectors: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE of ``(n, E)`` vectors (scikit-learn); perplexity ``min(30, (n - 1) / 3)``."""
    from sklearn.manifold import TSNE

    n = vectors.shape[0]
    perplexity = max(1.0, min(30.0, (n - 1) / 3.0))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(vectors)


def plot_tsne(points: np.ndarray, labels: Sequence[str], path: Path, title: str = "") -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    for i, task in enumerate(sorted(set(labels))):
        idx = [j for j, lab in enumerate(labels) if lab == task]
        ax.scatter(points[idx, 0], points[idx, 1], s=12, color=f"C{i % 10}", marker="osd^v<>p*h"[(i // 10) % 10],
                   label=f"{task} ({len(idx)})", alpha=0.8)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=8, markerscale=1.5)
    ax.set_title(title or "t-SNE of gate vectors")
    return _save(fig, path)


def plot_loss_curves(curves: Sequence[tuple[str, list[int], list[float]]], path: Path, ylabel: str = "training loss",
                     title: str = "") -> Path:
    """One line per run: ``(label, steps, values)``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, steps, values in curves:
        ax.plot(steps, values, label=label, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.set_title(title or "training loss")
    return _save(fig, path)
