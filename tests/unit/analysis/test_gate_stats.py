"""mole-analyze's statistics on hand-made gates: counts, entropies, HMoRA's main expert pairs, smoothing."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from mole.analysis.collect import ModuleKey, RoutingCollector
from mole.analysis.run import smooth
from mole.analysis.stats import GateStats, main_expert_pairs
from mole.routers.base import BalanceStats, GateDist, RouterOutput

LN2, LN4 = math.log(2), math.log(4)

# ---- statistics on hand-made gates ----

GATES = torch.tensor([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])


def test_gate_stats_counts_average_and_entropies_by_hand():
    s = GateStats(4)
    s.update(GATES, GATES > 0)
    summ = s.summary()
    assert summ["activation_counts"] == [3, 2, 1, 1]
    assert summ["avg_active_experts"] == pytest.approx(7 / 3)  # (2 + 1 + 4) / 3
    # mean g = (7/12, 3/12, 1/12, 1/12)
    balance = -(7 / 12 * math.log(7 / 12) + 0.25 * math.log(0.25) + 2 / 12 * math.log(1 / 12))
    assert summ["balance_entropy"] == pytest.approx(balance, abs=1e-6)
    assert summ["certainty_entropy"] == pytest.approx((LN2 + 0 + LN4) / 3, abs=1e-6)
    assert summ["max_entropy"] == pytest.approx(LN4, abs=1e-6)
    assert summ["activation_share"] == pytest.approx([3 / 7, 2 / 7, 1 / 7, 1 / 7], abs=1e-6)


def test_gate_stats_stream_in_batches_equals_one_pass():
    one, two = GateStats(4), GateStats(4)
    one.update(GATES, GATES > 0)
    two.update(GATES[:1], GATES[:1] > 0)
    two.update(GATES[1:], GATES[1:] > 0)
    assert one.summary() == two.summary()


def test_soft_routing_counts_every_expert_and_unnormalised_rows_are_normalised():
    s = GateStats(2)
    s.update(torch.tensor([[0.9, 0.1], [0.2, 0.2], [0.0, 0.0]]), None)  # selected None: all active
    summ = s.summary()
    assert summ["activation_counts"] == [3, 3] and summ["avg_active_experts"] == 2.0
    # rows normalised: (0.9, 0.1), (0.5, 0.5), zeros (entropy 0)
    h1 = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    assert summ["certainty_entropy"] == pytest.approx((h1 + LN2 + 0) / 3, abs=1e-6)
    # mean of the normalised rows: (1.4/3, 0.6/3), renormalised to (0.7, 0.3)
    assert summ["balance_entropy"] == pytest.approx(-(0.7 * math.log(0.7) + 0.3 * math.log(0.3)), abs=1e-6)


def test_collector_leaves_padding_out():
    """Two sequences of 3 token slots, the last slot of the second is padding with a gate that would show."""
    gates = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = RouterOutput(gates=gates, probs=gates, selected=gates > 0, balance=[BalanceStats(gates, gates > 0, 1)])
    key = ModuleKey(0, "self_attn.q_proj", 0)
    col = RoutingCollector(max_points=10)
    col.add_batch({key: [out]}, mask, ["a", "b"])
    res = col.result()
    assert res["tokens"] == 5 and res["tasks"] == {"a": 1, "b": 1}
    mod = res["modules"][0]
    assert mod["activation_counts"] == [3, 2]  # the padded (0, 1) row is not counted
    assert mod["certainty_entropy"] == 0.0
    assert mod["balance_entropy"] == pytest.approx(-(0.6 * math.log(0.6) + 0.4 * math.log(0.4)), abs=1e-6)
    # t-SNE source: the only module; per-sequence means over real tokens
    assert torch.allclose(col.points.vectors, torch.tensor([[2 / 3, 1 / 3], [0.5, 0.5]]))
    assert col.points.labels == ["a", "b"]


# ---- HMoRA's main expert pairs (Appendix E.8, Tables 13-16) ----


def test_main_expert_pairs_tables_by_hand():
    pairs = {
        "A": Counter({(3, 6): 8, (2, 7): 2}),  # MEP (3, 6), 0.8
        "B": Counter({(3, 6): 10}),  # (3, 6), 1.0
        "C": Counter({(0, 4): 3, (1, 2): 3, (5, 6): 4}),  # (5, 6), 0.4
        "D": Counter({(0, 4): 7, (3, 6): 3}),  # (0, 4), 0.7
    }
    res = main_expert_pairs(pairs, 8)
    assert res["per_task"]["A"] == {"main_pair": [3, 6], "proportion": 0.8, "samples": 10}
    assert res["per_task"]["C"]["main_pair"] == [5, 6] and res["per_task"]["C"]["proportion"] == 0.4
    assert res["per_task"]["D"]["main_pair"] == [0, 4] and res["per_task"]["D"]["proportion"] == 0.7
    # Table 14: share of tasks with MEP proportion >= threshold
    assert res["thresholds"] == {"0.7": 0.75, "0.8": 0.5, "0.9": 0.25, "1": 0.25}
    # Tables 15-16: per main pair, tasks and recognised (>= 0.8) tasks
    assert res["pairs"] == [
        {"main_pair": [3, 6], "tasks": 2, "recognised": 2, "ratio": 1.0},
        {"main_pair": [0, 4], "tasks": 1, "recognised": 0, "ratio": 0.0},
        {"main_pair": [5, 6], "tasks": 1, "recognised": 0, "ratio": 0.0},
        {"main_pair": "All", "tasks": 4, "recognised": 2, "ratio": 0.5},
    ]
    # Table 13: activations per expert / all activations (40 samples x 2 experts)
    assert res["expert_share"] == pytest.approx([12.5, 3.75, 6.25, 26.25, 12.5, 5.0, 31.25, 2.5])


def test_main_expert_pair_tie_takes_the_smallest_pair():
    res = main_expert_pairs({"E": Counter({(1, 2): 2, (0, 5): 2})}, 6)
    assert res["per_task"]["E"] == {"main_pair": [0, 5], "proportion": 0.5, "samples": 4}


def test_collector_counts_task_router_pairs_per_task():
    """A hybrid-style output: the task router's selection is its sequence-level balance decision."""
    p_task = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.4, 0.4, 0.1, 0.1], [0.1, 0.1, 0.3, 0.5]])  # (B=3, E=4)
    s_task = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1]]).bool()
    t = 2
    gates = p_task.repeat_interleave(t, dim=0)
    out = RouterOutput(gates=gates, probs=gates, selected=s_task.repeat_interleave(t, dim=0),
                       balance=[BalanceStats(p_task, s_task, 2, "sequence")], dists=[GateDist(p_task, "task", "sequence")])
    col = RoutingCollector()
    col.add_batch({ModuleKey(3, "mlp.down_proj", 0): [out]}, torch.ones(3, t, dtype=torch.long), ["x", "x", "y"])
    res = col.result()
    (tr,) = res["task_routers"]
    assert tr["per_task"] == {"x": {"main_pair": [0, 1], "proportion": 1.0, "samples": 2},
                              "y": {"main_pair": [2, 3], "proportion": 1.0, "samples": 1}}
    task_router = res["modules"][0]["routers"][0]
    assert task_router["kind"] == "task" and task_router["rows"] == 3 and task_router["activation_counts"] == [2, 2, 1, 1]
    assert col.tsne_source[1] == 0 and col.points.vectors.shape == (3, 4)  # the task router's rows


# ---- end to end on tiny_llama ----


# ---- loss curves ----


def test_smooth_is_a_trailing_moving_average():
    assert smooth([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    assert smooth([1.0, 2.0], 1) == [1.0, 2.0]
