"""``mole-params``: count trainable parameters without weights or downloads (the model on the meta device).

    mole-params model=qwen2_1_5b method=lora        # HMoRA Table 3: LoRA r=8 on all 7 linears, 0.60%
    mole-params model=qwen2_1_5b method=hmora       # HMoRA Table 3 w/o LW: 6.31%, a_l per layer
    mole-params router=mor experts=mola_2468        # the same overrides as mole-train

Prints one JSON object: ``trainable``, ``total``, ``base``, ``percent`` (trainable / base model), and
per layer the number of experts, routers and adapted modules (HMoRA: the mixing weight ``a_l`` and
which routers the layer has, ``router_kinds``), and ``per_model``: modules trained once per model
(HMoRA's task encoder).
"""

from __future__ import annotations

import json

from mole.cli.common import compose_from_argv, report_user_errors, run_main


@report_user_errors("mole-params")
def run(overrides: list[str]) -> dict:
    from mole.pipeline import build_mole_model, parameter_report

    cfg = compose_from_argv(overrides, "train")
    model, _, report = build_mole_model(cfg, meta=True)
    out = {"model": cfg.model.get("name"), "method": cfg.get("method_name"), **parameter_report(model, report)}
    print(json.dumps(out, indent=1))
    return out


def main(argv: list[str] | None = None) -> None:
    run_main(__doc__, run, argv)


if __name__ == "__main__":
    main()
