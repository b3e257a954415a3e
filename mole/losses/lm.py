"""Causal-LM cross-entropy over the response tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mole.data.collate import IGNORE_INDEX


def lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean", label_smoothing: float = 0.0
) -> torch.Tensor:
    """Next-token cross-entropy; positions labelled ``-100`` (prompt, padding) are ignored.

    Args:
        logits: ``(B, T, V)``.
        labels: ``(B, T)``, aligned with the inputs (shifted here).
        reduction: ``"mean"`` over counted tokens, or ``"sum"``.
        label_smoothing: mix the one-hot target with a uniform distribution over the vocabulary
            (Szegedy et al. 2016; HMoRA trains with 0.1). Validation losses use 0.
    """
    shift_logits = logits[:, :-1, :].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:]  # (B, T-1)
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )
