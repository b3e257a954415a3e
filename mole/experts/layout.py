"""Expert layouts: how many experts each transformer layer gets (SPEC §4; MoLA, Gao et al. 2024).

A layout is data expanded by one pure function. MoLA ``2-4-6-8`` splits the L layers into 4 contiguous
groups, lowest layers first, with 2, 4, 6 and 8 experts.

When L is not a multiple of the number of groups G, the groups differ in size by at most one layer and
the *first* ``L mod G`` groups (the lower layers) get the extra layer, as ``numpy.array_split`` does.
SmolLM2-135M has 30 layers, so ``2-4-6-8`` becomes 8 layers of 2, 8 of 4, 7 of 6 and 7 of 8 experts
(172 experts per target module). Giving the extra layers to the lower groups keeps the layout closest in
parameters to the divisible case without favouring the deep layers.
"""

from __future__ import annotations

from collections.abc import Sequence

from mole.utils.errors import MoleConfigError


def split_groups(num_layers: int, num_groups: int) -> list[int]:
    """Sizes of ``num_groups`` contiguous groups over ``num_layers`` layers (first groups larger)."""
    if num_groups < 1:
        raise MoleConfigError("experts.groups must list at least one group")
    if num_groups > num_layers:
        raise MoleConfigError(
            f"experts.groups has {num_groups} groups but the model has only {num_layers} layers"
        )
    base, extra = divmod(num_layers, num_groups)
    return [base + (1 if g < extra else 0) for g in range(num_groups)]


def expand_layout(
    num_layers: int,
    *,
    num_experts: int | None = None,
    groups: Sequence[int] | None = None,
    per_layer: Sequence[int] | None = None,
) -> list[int]:
    """Number of experts for each of ``num_layers`` layers.

    Exactly one of the three forms must be given:

    Args:
        num_layers: L, the model's transformer layers.
        num_experts: the same E for every layer (``experts.num_experts``).
        groups: per-group counts over L/G contiguous layers, e.g. ``[2, 4, 6, 8]`` (``experts.groups``).
        per_layer: an explicit list of L counts (``experts.per_layer``).

    Returns:
        A list of L positive integers.
    """
    given = [k for k, v in (("num_experts", num_experts), ("groups", groups), ("per_layer", per_layer)) if v is not None]
    if len(given) != 1:
        raise MoleConfigError(
            "set exactly one of experts.num_experts, experts.groups, experts.per_layer "
            f"(got {', '.join('experts.' + g for g in given) or 'none'})"
        )
    if num_experts is not None:
        counts = [num_experts] * num_layers
        key = "experts.num_experts"
    elif groups is not None:
        groups = list(groups)
        counts = [c for c, size in zip(groups, split_groups(num_layers, len(groups)), strict=True) for _ in range(size)]
        key = "experts.groups"
    else:
        counts = list(per_layer)
        key = "experts.per_layer"
        if len(counts) != num_layers:
            raise MoleConfigError(
                f"experts.per_layer lists {len(counts)} layers but the model has {num_layers}"
            )
    for c in counts:
        if not isinstance(c, int) or isinstance(c, bool) or c < 1:
            raise MoleConfigError(f"{key} must contain positive integers, got {c!r}")
    return counts
