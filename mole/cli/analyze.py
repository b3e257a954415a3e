"""``mole-analyze``: routing analyses of a trained run, and training-loss curves of several runs.

    mole-analyze RUN_DIR                              # the run's own validation records
    mole-analyze RUN_DIR data=fixtures split=all      # another data config (conf/data/), all its records
    mole-analyze RUN_DIR data=local data.path=[/d/arc.json,/d/obqa.json] per_task=100 out=analysis_arc/
    mole-analyze curves RUN_A RUN_B [RUN_C ...] out=loss.png [key=loss|lm_loss] [smooth=N]

Routing analyses (SPEC §7) write into RUN_DIR/analysis/ (or out=DIR): analysis.json — per layer and per
routing module the expert activation counts (MoR Fig. 3/6), average number of activated experts (DynMoLE
Fig. 6, MoA Fig. 4), balance entropy H(mean g) and certainty mean H(g) (HMoRA Fig. 3), padding excluded;
for HMoRA's task routers the main expert pairs per task (HMoRA Tables 13-16, also as task_pairs.md) —
and activation_counts.png, entropy.png, active_experts.png, tsne.png (t-SNE of gate vectors coloured by
task, HMoRA Fig. 4). A record's task is the file (stem) or data set it came from.

Options: data=NAME and data.KEY=VALUE (Hydra syntax, as mole-train; without data=NAME the keys override
the run's own data config); split=val|train|all (default val: the records the run held out);
per_task=N (at most N records per task); batch_size=N; max_points=N (t-SNE points, default 2000);
seed=N; device=cpu|cuda; out=DIR; trust_remote_code=true (run a Hub model's own Python code: only this
command line can allow it, a run's config.yaml cannot).

curves: one plot of the training-loss curves (metrics.json train_loss; key=loss, the logged total, or
lm_loss) of the runs, legend = method (run directory); default out=loss_curves.png. A run directory
literally named "curves" is given as ./curves.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from mole.cli.common import compose_from_argv, log_to, report_user_errors, run_main
from mole.run_dir import check_trust_flag, load_run_config
from mole.utils.errors import MoleConfigError

USAGE = ("usage: mole-analyze RUN_DIR [data=NAME] [data.KEY=VALUE ...] [split=val|train|all] [per_task=N] "
         "[batch_size=N] [max_points=N] [seed=N] [device=DEV] [out=DIR] [trust_remote_code=true] | "
         "mole-analyze curves RUN_DIR [RUN_DIR ...] [out=FILE.png] [key=loss|lm_loss] [smooth=N]")
ANALYZE_OPTIONS = {"split", "per_task", "batch_size", "max_points", "seed", "device", "out", "trust_remote_code"}
CURVE_OPTIONS = {"out", "key", "smooth"}
INT_OPTIONS = {"per_task", "batch_size", "max_points", "seed", "smooth"}


def _split_args(args: list[str], allowed: set[str]) -> tuple[list[str], dict[str, object], list[str]]:
    """Positional arguments, known ``key=value`` options (ints parsed), and ``data``/``data.*`` overrides."""
    positional, options, data = [], {}, []
    for a in args:
        if "=" not in a:
            positional.append(a)
            continue
        key, value = a.split("=", 1)
        if key == "data" or key.startswith("data.") or key.startswith("+data."):
            data.append(a)
            continue
        if key not in allowed:
            raise MoleConfigError(f"unknown option {key!r}; {USAGE}")
        if key in INT_OPTIONS:
            try:
                options[key] = int(value)
            except ValueError:
                raise MoleConfigError(f"{key} must be an integer, got {value!r}") from None
        else:
            options[key] = value
    return positional, options, data


def resolve_data(run_cfg, overrides: list[str]):
    """The ``data`` node to analyse: ``data=NAME`` composes that group file (plus ``data.*`` overrides);
    otherwise ``data.*`` overrides apply to the run's own data config; nothing given: the run's own."""
    if not overrides:
        return None
    if any(o.split("=", 1)[0] == "data" for o in overrides):
        return compose_from_argv(overrides, "train").data
    own = run_cfg.data
    dotted = [o.lstrip("+")[len("data."):] for o in overrides]
    unknown = sorted({d.split("=", 1)[0].split(".")[0] for d in dotted} - set(own.keys()))
    if unknown:
        raise MoleConfigError(f"data: unknown keys {unknown} in the run's data config; known keys are {sorted(own.keys())}")
    try:
        return OmegaConf.merge(own, OmegaConf.from_dotlist(dotted))
    except Exception as err:  # noqa: BLE001 - OmegaConf's parse errors come in several types
        raise MoleConfigError(f"data overrides {overrides}: {str(err).splitlines()[0]}") from None


@report_user_errors("mole-analyze")
def run(args: list[str]) -> object:
    from mole.analysis import analyze_run, loss_curves

    if args and args[0] == "curves":
        positional, options, data = _split_args(args[1:], CURVE_OPTIONS)
        if data or not positional:
            raise MoleConfigError(USAGE)
        path = loss_curves(positional, options.get("out", "loss_curves.png"), key=str(options.get("key", "loss")),
                           window=options.get("smooth", 1))
        print(f"wrote {path}")
        return path
    positional, options, data = _split_args(args, ANALYZE_OPTIONS)
    if len(positional) != 1:
        raise MoleConfigError(USAGE)

    run_dir = Path(positional[0])
    options["trust_remote_code"] = check_trust_flag(options.get("trust_remote_code", False))
    data_cfg = resolve_data(load_run_config(run_dir, trust_remote_code=options["trust_remote_code"]), data)
    result = analyze_run(run_dir, data_cfg, **options)
    out = Path(options.get("out") or run_dir / "analysis")
    print(f"analysed {result['tokens']} tokens of {result['sequences']} sequences "
          f"({', '.join(f'{t}: {n}' for t, n in result['tasks'].items())}); wrote {out}/")
    return result


def main(argv: list[str] | None = None) -> None:
    log_to()  # progress lines to stdout (the command only; run() called in-process leaves logging alone)
    run_main(__doc__, run, argv)


if __name__ == "__main__":
    main()
