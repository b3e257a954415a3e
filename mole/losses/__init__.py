"""Losses: the LM objective and auxiliary routing terms, selected from ``conf/loss/``."""

from mole.losses.cgjs import CGJSLoss, cgjs_loss
from mole.losses.lm import lm_loss
from mole.losses.routing import BalanceLoss, balance_loss

__all__ = ["BalanceLoss", "CGJSLoss", "balance_loss", "cgjs_loss", "lm_loss"]
