"""Routing analyses of trained runs (SPEC §7): what ``mole-analyze`` computes and draws.

* :mod:`mole.analysis.stats` — activation counts, average active experts, balance / certainty entropies,
  HMoRA's main expert pairs (pure functions of gate tensors).
* :mod:`mole.analysis.collect` — per-module routing capture on labelled batches.
* :mod:`mole.analysis.data` — records labelled by task (the file or data set they came from).
* :mod:`mole.analysis.plots` — the figures (matplotlib, Agg).
* :mod:`mole.analysis.run` — :func:`analyze_run` and :func:`loss_curves`.
"""

from mole.analysis.run import analyze_run, loss_curves
from mole.analysis.stats import GateStats, main_expert_pairs

__all__ = ["GateStats", "analyze_run", "loss_curves", "main_expert_pairs"]
