"""``mole-params``: count trainable parameters without weights or downloads (the model on the meta device).

    mole-params model=qwen2_1_5b method=lora        # HMoRA Table 3: LoRA r=8 on all 7 linears, 0.60%
    mole-params model=qwen2_1_5b method=hmora       # HMoRA Table 3 w/o LW: 6.31%, a_l per layer
    mole-params router=mor experts=mola_2468        # the same overrides as mole-train
    mole-params model=llama3_1_8b method=mola estimate_memory=true trainer.batch_size=4 data.cutoff_len=512

Prints one JSON object: ``trainable``, ``total``, ``base``, ``percent`` (trainable / base model), and
per layer the number of experts, routers and adapted modules (HMoRA: the mixing weight ``a_l`` and
which routers the layer has, ``router_kinds``), and ``per_model``: modules trained once per model
(HMoRA's task encoder).

``estimate_memory=true`` adds ``memory``: the estimated peak memory of one training step per process, in
bytes (weights, gradients, AdamW states, activations by layer and by adapter kind, logits and losses) for
``trainer.batch_size`` x ``data.cutoff_len`` tokens under the ``distributed`` and ``trainer`` settings
(:mod:`mole.memory`; formula and its check against measured steps in ``docs/memory.md``).
"""

from __future__ import annotations

import json

from mole.cli.common import compose_from_argv, report_user_errors, run_main
from mole.utils.errors import MoleConfigError


@report_user_errors("mole-params")
def run(overrides: list[str]) -> dict:
    from mole.recipes.params import count_parameters

    overrides, memory = _memory_flag(overrides)
    out = count_parameters(compose_from_argv(overrides, "train"), memory)
    print(json.dumps(out, indent=1))
    return out


def _memory_flag(overrides: list[str]) -> tuple[list[str], bool]:
    """Take ``estimate_memory=true|false`` (an option of this command, not a config key) out of the overrides."""
    rest, memory = [], False
    for item in overrides:
        key, sep, value = item.partition("=")
        if key == "estimate_memory" and sep:
            if value.lower() not in ("true", "false"):
                raise MoleConfigError(f"estimate_memory must be true or false, got {value!r}")
            memory = value.lower() == "true"
        else:
            rest.append(item)
    return rest, memory


def main(argv: list[str] | None = None) -> None:
    run_main(__doc__, run, argv)


if __name__ == "__main__":
    main()
