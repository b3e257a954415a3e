"""``router=none``: a single expert per layer needs no router (plain LoRA)."""

from __future__ import annotations

from mole.utils.errors import MoleConfigError


def no_router(in_features: int, num_experts: int) -> None:
    """Build nothing; only valid when the layer has exactly one expert."""
    if num_experts != 1:
        raise MoleConfigError(
            f"router=none needs exactly 1 expert per layer, but the experts layout gives {num_experts}; "
            "choose a router (router=soft, router=topk, ...) or experts=single"
        )
    return None
