"""Expert layouts: MoLA groups over divisible and non-divisible layer counts, and their errors."""

from __future__ import annotations

import pytest

from mole.experts import expand_layout, split_groups
from mole.utils.errors import MoleConfigError


def test_mola_2468_on_32_layers_is_eight_per_group():
    assert expand_layout(32, groups=[2, 4, 6, 8]) == [2] * 8 + [4] * 8 + [6] * 8 + [8] * 8


def test_mola_2468_on_30_layers_gives_the_extra_layers_to_the_lower_groups():
    # SmolLM2-135M has 30 layers: 30 = 8 + 8 + 7 + 7
    assert split_groups(30, 4) == [8, 8, 7, 7]
    assert expand_layout(30, groups=[2, 4, 6, 8]) == [2] * 8 + [4] * 8 + [6] * 7 + [8] * 7


@pytest.mark.parametrize("layers, sizes", [(28, [7, 7, 7, 7]), (29, [8, 7, 7, 7]), (31, [8, 8, 8, 7]), (4, [1, 1, 1, 1])])
def test_group_sizes_differ_by_at_most_one(layers, sizes):
    assert split_groups(layers, 4) == sizes
    assert len(expand_layout(layers, groups=[8, 6, 4, 2])) == layers


def test_uniform_and_per_layer():
    assert expand_layout(3, num_experts=5) == [5, 5, 5]
    assert expand_layout(3, per_layer=[1, 2, 3]) == [1, 2, 3]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "set exactly one of"),
        ({"num_experts": 2, "groups": [2, 4]}, "set exactly one of"),
        ({"per_layer": [1, 2]}, "experts.per_layer lists 2 layers but the model has 3"),
        ({"groups": [2, 4, 6, 8]}, "4 groups but the model has only 3 layers"),
        ({"num_experts": 0}, "experts.num_experts must contain positive integers"),
        ({"per_layer": [1, -1, 2]}, "experts.per_layer must contain positive integers"),
    ],
)
def test_layout_errors_name_the_key(kwargs, message):
    with pytest.raises(MoleConfigError, match=message):
        expand_layout(3, **kwargs)
