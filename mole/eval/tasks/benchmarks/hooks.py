"""The functions that the benchmark task settings beside this file name (``!function hooks.<name>``).

lm-eval imports a ``!function`` module from the folder of the YAML that names it; these are
:mod:`mole.eval.metrics`'s.
"""

from mole.eval.metrics import (  # noqa: F401
    aggregate_macro_acc,
    aggregate_mcc,
    process_letter,
    process_mc,
    process_mc_macro,
    process_mc_mcc,
    process_number,
)
