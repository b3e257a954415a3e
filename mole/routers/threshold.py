"""Threshold routing: Sparse MoA (Cao et al. 2025, eq. 4-5) and AdaMoLE (Liu & Luo 2024).

Gates ``g`` are ``sigmoid(W_g x)`` (MoA) or ``softmax(W_g x)`` (AdaMoLE). Expert i is used for a token iff
``g_i >= tau``, with

* a learnable per-token threshold ``tau(x) = tau_max * sigmoid(w x + b)`` (MoA eq. 5, after AdaMoLE), or
* a fixed threshold ``tau = tau_max`` (MoA eq. 4; ``learnable=False``).

Sigmoid gates keep their weight (MoA: "when the expert is selected, its weight is still used"); softmax
gates are renormalised over the kept experts (AdaMoLE). ``tau_max`` is in (0, 1]; MoA Table 4 sweeps
{0.2, 0.5, 0.8, 1} and its best is 0.5 with the learnable threshold (the default here). ``tau_max=None``
means ``1 / E``, AdaMoLE's default: softmax probabilities always have a maximum >= 1/E >= tau, so every
token keeps at least one expert.

No expert above the threshold: the token's gates are all 0 and the layer returns the frozen base output
for it. This is what Sparse MoA intends ("tokens [that] require no expert intervention ... processed
solely by the frozen LLM"); for softmax gates it cannot happen with ``tau_max <= 1/E``.

NOTE(deviation): MoA eq. 4 keeps ``g_i`` itself, so the comparison ``g_i >= tau`` passes no gradient to
the threshold network, whose ``w, b`` then stay at their initial values (MoA's released code behaves the
same way). AdaMoLE's released code weighs a kept expert by ``g_i - tau`` before renormalising, which does
train the threshold; ``subtract_threshold=True`` selects that form (suggested for AdaMoLE presets).

Balance: with softmax gates the router exposes the variable-size chosen set to the balance loss
(``BalanceStats.k = None``); sigmoid gates are not a distribution and MoA uses no balance loss, so they
expose nothing.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mole.routers.base import BalanceStats, LinearGate, RouterOutput
from mole.routers.select import threshold_select
from mole.utils.errors import MoleConfigError

GATES = ("sigmoid", "softmax")


class ThresholdRouter(LinearGate):
    """Experts whose gate reaches a (learnable, per-token) threshold.

    Args:
        in_features: width of the token features the router reads.
        num_experts: number of experts E.
        gate: ``"sigmoid"`` (Sparse MoA, gates keep their weight) or ``"softmax"`` (AdaMoLE, kept gates
            renormalised).
        tau_max: upper bound of the threshold, in (0, 1]; ``None`` for ``1 / E`` (AdaMoLE).
        learnable: ``tau(x) = tau_max * sigmoid(w x + b)`` (MoA eq. 5) instead of the fixed ``tau_max``.
        subtract_threshold: weigh a kept expert by ``g_i - tau`` (AdaMoLE's code) instead of ``g_i``.
        dropout: dropout on the router's input.
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        gate: str = "sigmoid",
        tau_max: float | None = 0.5,
        learnable: bool = True,
        subtract_threshold: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__(in_features, num_experts, dropout)
        if gate not in GATES:
            raise MoleConfigError(f"router.gate must be one of {list(GATES)}, got {gate!r}")
        if tau_max is None:
            tau_max = 1.0 / num_experts
        valid = isinstance(tau_max, (int, float)) and not isinstance(tau_max, bool) and math.isfinite(tau_max)
        if not valid or not 0.0 < tau_max <= 1.0:
            raise MoleConfigError(f"router.tau_max must be in (0, 1] or null (1 / num_experts), got {tau_max!r}")
        self.gate_kind, self.tau_max = gate, float(tau_max)
        self.learnable, self.subtract_threshold = bool(learnable), bool(subtract_threshold)
        # MoA eq. 5: tau(x) = tau_max * sigmoid(w x + b), one threshold per token
        self.threshold = nn.Linear(in_features, 1) if self.learnable else None

    def forward(self, x: Tensor) -> RouterOutput:
        x = self.dropout(x)
        logits = self.gate(x).float()  # (N, E)
        softmax = self.gate_kind == "softmax"
        probs = torch.softmax(logits, dim=-1) if softmax else torch.sigmoid(logits)  # (N, E)
        if self.threshold is not None:
            tau = self.tau_max * torch.sigmoid(self.threshold(x).float())  # (N, 1)
        else:
            tau = self.tau_max
        gates, selected = threshold_select(probs, tau, renorm=softmax, subtract=self.subtract_threshold)
        balance = [BalanceStats(probs, selected, None)] if softmax else []
        return RouterOutput(gates=gates, probs=probs, selected=selected, balance=balance)
