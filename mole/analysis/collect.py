"""Record a trained model's routing on labelled batches: one accumulator per routing module.

Every routing module of a mole model (a :class:`~mole.model.layer.MoLELinear` with its own router, a
:class:`~mole.routers.placement.SharedRouter`, a :class:`~mole.routers.placement.LayerRouter`, a block
expert's router) publishes its :class:`~mole.routers.base.RouterOutput` to its ``routing_sink``.
:func:`sinks_by_module` gives each module a sink of its own (instead of the one shared list of
:func:`mole.model.routing.collect_routing`), so every output is known by decoder layer and module name.

Per module, :class:`RoutingCollector` keeps

* ``gates``: :class:`~mole.analysis.stats.GateStats` of the mixing weights over real tokens (what
  the experts receive; activation counts from ``selected``);
* ``routers``: one :class:`GateStats` per router distribution behind the gates
  (:meth:`RouterOutput.distributions`): the token router's dense probabilities, and for HMoRA's hybrid
  routing also the task router's (one row per sequence);
* for task routers: the expert set each sequence selected, counted per task (HMoRA Tables 13-16);
* one module's per-sequence gate vectors, subsampled, for t-SNE (HMoRA Fig. 4).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mole.analysis.stats import GateStats, count_sets, main_expert_pairs, selected_sets, top_sets
from mole.model.inject import decoder_layers
from mole.model.routing import module_sinks
from mole.routers.base import RouterOutput, real_rows

#: Expert-set size used for the main pairs of a soft task router (no selection of its own): HMoRA's
#: analysis is of top-2 routing.
SOFT_PAIR_K = 2


@dataclass(frozen=True)
class ModuleKey:
    """Where a routing module sits: decoder layer (``-1`` outside the layers) and name within it."""

    layer: int
    name: str
    order: int  # position in the model's module order (forward order within a layer)


@contextmanager
def sinks_by_module(model: nn.Module) -> Iterator[dict[ModuleKey, list[RouterOutput]]]:
    """Inside the block, each routing module appends its outputs to its own list (keyed by :class:`ModuleKey`)."""
    where: dict[int, tuple[int, str]] = {}
    for idx, layer in enumerate(decoder_layers(model)):
        for rel, m in layer.named_modules():
            where[id(m)] = (idx, rel)
    with module_sinks(model) as attached:
        yield {ModuleKey(*where.get(id(m), (-1, name)), order): sink for order, name, m, sink in attached}


@dataclass
class DistSlot:
    """One router distribution of a module (token or task router)."""

    kind: str
    level: str
    stats: GateStats
    selection_known: bool = False
    pairs: dict[str, Counter] = field(default_factory=dict)  # task routers: {task: Counter(expert set)}
    pair_k: int | None = None  # size of the expert sets when fixed (top-k), else None


@dataclass
class ModuleSlot:
    key: ModuleKey
    gates: GateStats
    dists: list[DistSlot] = field(default_factory=list)


class Reservoir:
    """A uniform random subsample of at most ``capacity`` rows of a stream (random keys, keep the smallest).

    Memory ``O(capacity)``; deterministic for a seed.
    """

    def __init__(self, capacity: int, seed: int = 0):
        self.capacity = capacity
        self.gen = torch.Generator().manual_seed(seed)
        self.keys = torch.empty(0)
        self.vectors: Tensor | None = None  # (n, E)
        self.labels: list[str] = []
        self.seen = 0

    def add(self, vectors: Tensor, labels: Sequence[str]) -> None:
        v = vectors.detach().float().cpu()  # (b, E)
        keys = torch.rand(v.shape[0], generator=self.gen)
        self.seen += v.shape[0]
        all_keys = torch.cat([self.keys, keys])
        all_vec = v if self.vectors is None else torch.cat([self.vectors, v])
        all_lab = self.labels + list(labels)
        if all_keys.numel() > self.capacity:
            keep = torch.argsort(all_keys)[: self.capacity].sort().values  # keep stream order
            all_keys, all_vec = all_keys[keep], all_vec[keep]
            all_lab = [all_lab[i] for i in keep.tolist()]
        self.keys, self.vectors, self.labels = all_keys, all_vec, all_lab


class RoutingCollector:
    """Accumulate routing statistics over batches (see the module docstring).

    Args:
        max_points: gate vectors kept for t-SNE (a uniform subsample of the sequences).
        seed: seeds the subsample.
    """

    def __init__(self, max_points: int = 2000, seed: int = 0):
        self.slots: dict[ModuleKey, ModuleSlot] = {}
        self.points = Reservoir(max_points, seed)
        self.tsne_source: tuple[ModuleKey, int | None] | None = None  # (module, task dist index or None)
        self.tokens = 0
        self.sequences = 0
        self.task_counts: Counter = Counter()

    # ---- one batch ----

    def add_batch(self, sinks: dict[ModuleKey, list[RouterOutput]], attention_mask: Tensor, tasks: Sequence[str]) -> None:
        """Consume the outputs one forward put into ``sinks`` (then cleared).

        Args:
            sinks: from :func:`sinks_by_module`.
            attention_mask: ``(B, T)``, 1 for real tokens; router token rows are in ``(B, T)`` order.
            tasks: the task label of each of the ``B`` sequences.
        """
        b, t = attention_mask.shape
        mask = attention_mask.reshape(-1).bool().cpu()  # (B*T,)
        self.tokens += int(mask.sum())
        self.sequences += b
        self.task_counts.update(tasks)
        if self.tsne_source is None:
            self.tsne_source = self._choose_tsne_source(sinks)
        for key, outs in sinks.items():
            for out in outs:
                self._add_output(key, out, mask, (b, t), tasks)
            outs.clear()

    def _add_output(self, key: ModuleKey, out: RouterOutput, mask: Tensor, shape: tuple[int, int],
                    tasks: Sequence[str]) -> None:
        b, t = shape
        gates = out.gates.detach().float().cpu()  # (N, E)
        if gates.shape[0] != b * t:
            raise RuntimeError(f"{key.name} (layer {key.layer}): {gates.shape[0]} gate rows for a batch of {b}x{t} tokens")
        slot = self.slots.get(key)
        dists = out.distributions()
        if slot is None:
            slot = self.slots[key] = ModuleSlot(key, GateStats(gates.shape[1]))
            for d in dists:
                slot.dists.append(DistSlot(d.kind, d.level, GateStats(d.probs.shape[1])))
        selected = None if out.selected is None else out.selected.detach().cpu()
        slot.gates.update(gates[mask], None if selected is None else selected[mask])
        for i, (d, ds) in enumerate(zip(dists, slot.dists, strict=True)):
            probs = d.probs.detach().float().cpu()
            # the experts this distribution's router activated: its own selection (a balance decision on
            # the same tensor), every expert (soft routing), the output's selection (a single router), or
            # not exposed (the token router inside a sparse hybrid output)
            match = next((s for s in out.balance if s.probs is d.probs), None)
            known = True
            if match is not None:
                match_sel = match.selected.detach().cpu()
            elif out.selected is None:
                match_sel = None
            elif d.probs is out.probs:
                match_sel = selected
            else:
                match_sel, known = None, False
            ds.selection_known = known
            rows = real_rows(probs, d.level, mask)
            sel_rows = None if match_sel is None else real_rows(match_sel, d.level, mask)
            ds.stats.update(rows, sel_rows)
            if d.kind == "task":
                if d.level != "sequence" or probs.shape[0] != b:
                    raise RuntimeError(f"{key.name}: a task router with {probs.shape[0]} rows for {b} sequences")
                if match is not None:
                    sets, ds.pair_k = selected_sets(match_sel), match.k
                else:  # soft task routing: the most probable experts
                    ds.pair_k = min(SOFT_PAIR_K, probs.shape[1])
                    sets = top_sets(probs, ds.pair_k)
                count_sets(sets, tasks, ds.pairs)
            if self.tsne_source == (key, i):
                self.points.add(probs if d.level == "sequence" else _per_sequence(probs, mask, b, t), tasks)
        if self.tsne_source == (key, None):
            self.points.add(_per_sequence(gates, mask, b, t), tasks)

    def _choose_tsne_source(self, sinks: dict[ModuleKey, list[RouterOutput]]) -> tuple[ModuleKey, int | None] | None:
        """The last task router (HMoRA Fig. 4: the final task router), else the last routing module's gates."""
        keys = sorted((k for k, outs in sinks.items() if outs), key=lambda k: (k.layer, k.order))
        for key in reversed(keys):
            for i, d in enumerate(sinks[key][0].distributions()):
                if d.kind == "task":
                    return key, i
        return (keys[-1], None) if keys else None

    # ---- results ----

    def modules(self) -> list[ModuleSlot]:
        return sorted(self.slots.values(), key=lambda s: (s.key.layer, s.key.order))

    def result(self) -> dict:
        """JSON-ready per-module and per-layer statistics and the task routers' main expert pairs."""
        modules, layers, task_routers = [], {}, []
        for slot in self.modules():
            entry = {"layer": slot.key.layer, "module": slot.key.name, **slot.gates.summary(), "routers": []}
            for ds in slot.dists:
                summ = ds.stats.summary()
                if not ds.selection_known:
                    for k in ("activation_counts", "activation_share", "avg_active_experts"):
                        summ.pop(k)
                entry["routers"].append({"kind": ds.kind, "level": ds.level, **summ})
                if ds.kind == "task":
                    task_routers.append({
                        "layer": slot.key.layer, "module": slot.key.name, "set_size": ds.pair_k,
                        **main_expert_pairs(ds.pairs, ds.stats.num_experts),
                    })
            modules.append(entry)
            layers.setdefault(slot.key.layer, []).append(slot)
        return {
            "tokens": self.tokens,
            "sequences": self.sequences,
            "tasks": dict(sorted(self.task_counts.items())),
            "layers": [_layer_summary(layer, slots) for layer, slots in sorted(layers.items())],
            "modules": modules,
            "task_routers": task_routers,
        }


def _per_sequence(rows: Tensor, mask: Tensor, b: int, t: int) -> Tensor:
    """``(B*T, E)`` token rows -> ``(B, E)`` means over each sequence's real tokens."""
    g = rows.view(b, t, -1)
    m = mask.view(b, t, 1).to(g.dtype)
    return (g * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return round(sum(vals) / len(vals), 6) if vals else None


def _layer_summary(layer: int, slots: list[ModuleSlot]) -> dict:
    """A decoder layer: activation counts summed over its routing modules (expert by index), and the
    modules' average number of active experts and entropies averaged over them (as the training
    monitor does, :class:`mole.training.tracking.RoutingMonitor`)."""
    width = max(s.gates.num_experts for s in slots)
    counts = [0] * width
    summaries = [s.gates.summary() for s in slots]
    for summ in summaries:
        for i, c in enumerate(summ["activation_counts"]):
            counts[i] += c
    out = {
        "layer": layer,
        "modules": len(slots),
        "num_experts": width,
        "activation_counts": counts,
        "avg_active_experts": _mean([s["avg_active_experts"] for s in summaries]),
        "balance_entropy": _mean([s["balance_entropy"] for s in summaries]),
        "certainty_entropy": _mean([s["certainty_entropy"] for s in summaries]),
    }
    for kind in ("token", "task"):
        ds = [d.stats.summary() for s in slots for d in s.dists if d.kind == kind]
        if ds:
            out[f"{kind}_router"] = {
                "routers": len(ds),
                "balance_entropy": _mean([d["balance_entropy"] for d in ds]),
                "certainty_entropy": _mean([d["certainty_entropy"] for d in ds]),
            }
    return out
