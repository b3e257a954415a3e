"""Routers (gating functions). Each is selected by a file in ``conf/router/`` naming it as ``_target_``."""

from mole.routers.base import BalanceStats, Router, RouterOutput, keep_top_k
from mole.routers.mor import CRWRouter, MoRRouter
from mole.routers.none import no_router
from mole.routers.soft import SoftRouter
from mole.routers.topk import TopKRouter

__all__ = [
    "BalanceStats",
    "CRWRouter",
    "MoRRouter",
    "Router",
    "RouterOutput",
    "SoftRouter",
    "TopKRouter",
    "keep_top_k",
    "no_router",
]
