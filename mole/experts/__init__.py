"""Expert layouts: the number of experts per layer, from ``conf/experts/``."""

from mole.experts.layout import expand_layout, split_groups

__all__ = ["expand_layout", "split_groups"]
