"""Routers (gating functions). Each is selected by a file in ``conf/router/`` naming it as ``_target_``."""

from mole.routers.base import BalanceStats, Router, RouterOutput, keep_top_k
from mole.routers.dynamic import DynamicRouter
from mole.routers.hybrid import HybridRouter, TaskEncoder
from mole.routers.mor import CRWRouter, MoRRouter
from mole.routers.none import no_router
from mole.routers.select import (
    dynamic_select,
    keep_top_p,
    max_tsallis_entropy,
    threshold_select,
    tsallis_entropy,
)
from mole.routers.sigmoid import SigmoidRouter
from mole.routers.soft import SoftRouter
from mole.routers.threshold import ThresholdRouter
from mole.routers.topk import TopKRouter
from mole.routers.topp import TopPRouter

__all__ = [
    "BalanceStats",
    "CRWRouter",
    "DynamicRouter",
    "HybridRouter",
    "MoRRouter",
    "Router",
    "RouterOutput",
    "SigmoidRouter",
    "SoftRouter",
    "ThresholdRouter",
    "TaskEncoder",
    "TopKRouter",
    "TopPRouter",
    "dynamic_select",
    "keep_top_k",
    "keep_top_p",
    "max_tsallis_entropy",
    "no_router",
    "threshold_select",
    "tsallis_entropy",
]
