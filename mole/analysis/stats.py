"""Streaming routing statistics and HMoRA's main-expert-pair analysis (pure functions of gate tensors).

* :class:`GateStats` — per router, accumulated batch by batch over real rows (padding excluded):
  expert activation counts (MoR Fig. 3/6), the average number of activated experts (DynMoLE Fig. 6,
  MoA Fig. 4), the balance entropy ``H(mean_n g_n)`` and the certainty ``mean_n H(g_n)`` (HMoRA Fig. 3,
  eq. 10). Memory is ``O(E)`` whatever the number of rows.
* :func:`main_expert_pairs` — HMoRA Appendix E.8 (Tables 13-16): for a task router, each task's most
  frequently selected expert pair (its *main expert pair*, MEP) and the share of the task's samples
  that selected it; the share of tasks whose MEP proportion reaches 0.7 / 0.8 / 0.9 / 1 (Table 14);
  per distinct MEP the number of tasks and of *recognised* tasks (proportion >= 0.8, Tables 15-16);
  the share of each expert in all activations (Table 13).

Entropies are Shannon entropies in nats (:func:`mole.routers.select.shannon_entropy`), ``0 <= H <= log E``.
NOTE(deviation): each gate row is divided by its sum before its entropy is taken, and the mean gate
vector likewise: a no-op for softmax-based gates (soft, top-k, top-p, dynamic, MoR, hybrid), but sigmoid
(Soft MoA) and threshold gates are not distributions, and a threshold-routed token that kept no expert
(all-zero row) then has entropy 0. HMoRA defines the two entropies only for distributions.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from mole.routers.select import shannon_entropy

#: HMoRA Table 14's proportion thresholds.
PAIR_THRESHOLDS = (0.7, 0.8, 0.9, 1.0)
#: A task whose MEP proportion reaches this is "recognised by the router" (HMoRA Tables 15-16).
RECOGNISED = 0.8
_TOL = 1e-9  # proportions are ratios of counts: compare with a little slack against fp rounding


def _normalise_rows(g: Tensor) -> Tensor:
    """Rows divided by their sum; all-zero rows stay zero. ``(n, E)`` fp32 (float64 inputs stay float64)."""
    s = g.sum(dim=-1, keepdim=True)
    return torch.where(s > 0, g / s.clamp_min(1e-30), torch.zeros_like(g))


class GateStats:
    """Running statistics of one router's gate rows.

    Args:
        num_experts: E, the width of the gate rows.
    """

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.rows = 0
        self.counts = torch.zeros(num_experts, dtype=torch.float64)  # (E,) activations per expert
        self.active_sum = 0.0  # sum over rows of the number of active experts
        self.gate_sum = torch.zeros(num_experts, dtype=torch.float64)  # (E,) sum of normalised rows
        self.entropy_sum = 0.0  # sum over rows of H(g_n)

    def update(self, gates: Tensor, selected: Tensor | None = None) -> None:
        """Add rows.

        Args:
            gates: ``(n, E)`` gate values (or router probabilities) of real rows only.
            selected: ``(n, E)`` bool, the experts each row activated; ``None`` = every expert is active
                (the router contract for soft and sigmoid routing, :class:`mole.routers.base.RouterOutput`).
        """
        g = gates.detach().to(torch.float64).cpu()  # (n, E)
        if g.dim() != 2 or g.shape[1] != self.num_experts:
            raise ValueError(f"gate rows of shape {tuple(g.shape)} for a router of {self.num_experts} experts")
        n = g.shape[0]
        if n == 0:
            return
        if selected is None:
            active = torch.ones_like(g, dtype=torch.bool)
        else:
            active = selected.detach().cpu().bool()  # (n, E)
        self.rows += n
        self.counts += active.sum(dim=0).to(torch.float64)
        self.active_sum += float(active.sum())
        p = _normalise_rows(g)  # (n, E)
        self.gate_sum += p.sum(dim=0)
        self.entropy_sum += float(shannon_entropy(p).sum())

    def merge(self, other: GateStats) -> None:
        """Add another accumulator's rows (e.g. the routers of one layer pooled)."""
        self.rows += other.rows
        self.counts += other.counts
        self.active_sum += other.active_sum
        self.gate_sum += other.gate_sum
        self.entropy_sum += other.entropy_sum

    def balance_entropy(self) -> float:
        """``H(mean_n g_n)`` (HMoRA eq. 10, "balance"): high when the experts share the load evenly."""
        if self.rows == 0:
            return float("nan")
        mean = _normalise_rows((self.gate_sum / self.rows).unsqueeze(0))[0]
        return float(shannon_entropy(mean))

    def certainty_entropy(self) -> float:
        """``mean_n H(g_n)`` (HMoRA eq. 10, "certainty"): low when each row's routing is confident."""
        return self.entropy_sum / self.rows if self.rows else float("nan")

    def avg_active(self) -> float:
        """Average number of activated experts per row (DynMoLE Fig. 6, MoA Fig. 4)."""
        return self.active_sum / self.rows if self.rows else float("nan")

    def summary(self) -> dict:
        """JSON-ready: rows, counts, shares, average active experts, both entropies and ``log E``."""
        total = float(self.counts.sum())
        return {
            "rows": self.rows,
            "num_experts": self.num_experts,
            "activation_counts": [int(round(c)) for c in self.counts.tolist()],
            "activation_share": [round(c / total, 6) if total else 0.0 for c in self.counts.tolist()],
            "avg_active_experts": _r(self.avg_active()),
            "balance_entropy": _r(self.balance_entropy()),
            "certainty_entropy": _r(self.certainty_entropy()),
            "max_entropy": _r(math.log(self.num_experts)) if self.num_experts else 0.0,
        }


def _r(x: float, nd: int = 6) -> float | None:
    return None if x != x else round(float(x), nd)  # NaN -> null in JSON


def selected_sets(selected: Tensor) -> list[tuple[int, ...]]:
    """Each row's activated experts as a sorted tuple: ``(n, E)`` bool -> ``n`` tuples."""
    return [tuple(int(i) for i in row.nonzero().flatten().tolist()) for row in selected.detach().cpu().bool()]


def top_sets(probs: Tensor, k: int) -> list[tuple[int, ...]]:
    """Each row's ``k`` most probable experts as a sorted tuple (ties: the lower index first)."""
    order = torch.sort(probs.detach().cpu().float(), dim=-1, descending=True, stable=True).indices[:, :k]
    return [tuple(sorted(int(i) for i in row.tolist())) for row in order]


def main_expert_pairs(pairs_by_task: Mapping[str, Counter], num_experts: int,
                      thresholds: Sequence[float] = PAIR_THRESHOLDS, recognised: float = RECOGNISED) -> dict:
    """HMoRA Appendix E.8, Tables 13-16, for one task router.

    Args:
        pairs_by_task: ``{task: Counter({expert set (sorted tuple): number of samples})}``: the experts
            the task router selected for each sample (sequence) of each task.
        num_experts: E (for Table 13's per-expert shares).
        thresholds: Table 14's proportion thresholds.
        recognised: the MEP proportion from which a task counts as recognised (Tables 15-16: 0.8).

    Returns:
        ``per_task``: ``{task: {main_pair, proportion, samples}}`` — the most frequent expert set of the
        task (ties: the smallest tuple) and the share of the task's samples that selected it;
        ``thresholds``: ``{"0.7": share of tasks with proportion >= 0.7, ...}`` (Table 14);
        ``pairs``: one row per distinct main pair, most tasks first, ``{main_pair, tasks, recognised,
        ratio}`` plus a final ``"All"`` row (Tables 15-16); ``expert_share``: each expert's share of all
        activations of all samples, in percent (Table 13).
    """
    per_task: dict[str, dict] = {}
    activations = [0] * num_experts
    for task in sorted(pairs_by_task):
        counter = pairs_by_task[task]
        samples = sum(counter.values())
        if samples == 0:
            continue
        best = max(counter.values())
        pair = min(p for p, c in counter.items() if c == best)
        per_task[task] = {"main_pair": list(pair), "proportion": round(best / samples, 6), "samples": samples}
        for p, c in counter.items():
            for e in p:
                activations[e] += c
    n_tasks = len(per_task)

    def reaches(prop: float, t: float) -> bool:
        return prop >= t - _TOL

    table14 = {
        f"{t:g}": round(sum(reaches(v["proportion"], t) for v in per_task.values()) / n_tasks, 6) if n_tasks else None
        for t in thresholds
    }
    by_pair: dict[tuple[int, ...], list[float]] = {}
    for v in per_task.values():
        by_pair.setdefault(tuple(v["main_pair"]), []).append(v["proportion"])
    rows = []
    for pair, props in sorted(by_pair.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        rec = sum(reaches(p, recognised) for p in props)
        rows.append({"main_pair": list(pair), "tasks": len(props), "recognised": rec, "ratio": round(rec / len(props), 6)})
    rec_all = sum(r["recognised"] for r in rows)
    rows.append({"main_pair": "All", "tasks": n_tasks, "recognised": rec_all,
                 "ratio": round(rec_all / n_tasks, 6) if n_tasks else None})
    total = sum(activations)
    return {
        "per_task": per_task,
        "thresholds": table14,
        "recognised_threshold": recognised,
        "pairs": rows,
        "expert_share": [round(100.0 * a / total, 4) if total else 0.0 for a in activations],
    }


def count_sets(sets: Iterable[tuple[int, ...]], tasks: Iterable[str], into: dict[str, Counter]) -> None:
    """Add each row's expert set to its task's counter (``sets`` and ``tasks`` aligned)."""
    for s, t in zip(sets, tasks, strict=True):
        into.setdefault(t, Counter())[s] += 1
