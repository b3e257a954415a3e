"""Losses: the LM objective and auxiliary routing terms, selected from ``conf/loss/``."""

from mole.losses.cgjs import CGJSLoss, cgjs_loss, cgjs_losses
from mole.losses.lm import lm_loss
from mole.losses.routing import AuxLoss, BalanceLoss, balance_loss, balance_losses
from mole.losses.tsallis import TsallisLoss, mean_tsallis_entropy

__all__ = [
    "AuxLoss",
    "BalanceLoss",
    "CGJSLoss",
    "TsallisLoss",
    "balance_loss",
    "balance_losses",
    "cgjs_loss",
    "cgjs_losses",
    "lm_loss",
    "mean_tsallis_entropy",
]
