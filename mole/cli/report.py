"""``mole-report``: a sweep's runs as one table (Markdown and CSV), failed and unfinished jobs included.

    mole-report outputs/sweeps/multirun              # writes report.md and report.csv into that directory
    mole-report outputs/sweeps/multirun out=reports/ # ... or into reports/

Each job directory is one row: status (running / finished / interrupted / failed / incomplete /
unreadable), method, steps, trainable %, last and best validation loss, each lm-eval task's headline
metric, time per step, wall time, and a failed job's one-line error. A value a run did not produce is an empty cell, never a zero.
"""

from __future__ import annotations

from mole.cli.common import report_user_errors, run_main
from mole.recipes.report import write_report
from mole.utils.errors import MoleConfigError


@report_user_errors("mole-report")
def run(args: list[str]) -> None:
    positional = [a for a in args if "=" not in a]
    options = dict(a.split("=", 1) for a in args if "=" in a)
    unknown = sorted(set(options) - {"out"})
    if len(positional) != 1 or unknown:
        raise MoleConfigError(
            "usage: mole-report SWEEP_DIR [out=DIR]" + (f" (unknown options {unknown})" if unknown else "")
        )
    md, csv_path, rows = write_report(positional[0], options.get("out"))
    print(md.read_text())
    print(f"wrote {md} and {csv_path}")


def main(argv: list[str] | None = None) -> None:
    run_main(__doc__, run, argv)


if __name__ == "__main__":
    main()
