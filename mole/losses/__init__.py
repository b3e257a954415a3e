"""Losses: the LM objective and auxiliary routing terms, selected from ``conf/loss/``."""

from mole.losses.cgjs import CGJSLoss, cgjs_loss
from mole.losses.lm import lm_loss
from mole.losses.routing import BalanceLoss, balance_loss
from mole.losses.tsallis import TsallisLoss, mean_tsallis_entropy

__all__ = [
    "BalanceLoss",
    "CGJSLoss",
    "TsallisLoss",
    "balance_loss",
    "cgjs_loss",
    "lm_loss",
    "mean_tsallis_entropy",
]
