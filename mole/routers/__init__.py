"""Routers (gating functions). Each is selected by a file in ``conf/router/`` naming it as ``_target_``."""

from mole.routers.base import BalanceStats, Router, RouterOutput, keep_top_k
from mole.routers.hybrid import HybridRouter, TaskEncoder
from mole.routers.mor import CRWRouter, MoRRouter
from mole.routers.none import no_router
from mole.routers.soft import SoftRouter
from mole.routers.topk import TopKRouter

__all__ = [
    "BalanceStats",
    "CRWRouter",
    "HybridRouter",
    "MoRRouter",
    "Router",
    "RouterOutput",
    "SoftRouter",
    "TaskEncoder",
    "TopKRouter",
    "keep_top_k",
    "no_router",
]
