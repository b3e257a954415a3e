"""``mole-report`` as a recipe: read every job of a sweep (:mod:`mole.report`), lay out the paper table when the
sweep is one (:mod:`mole.report_paper`), write ``report.md`` and ``report.csv``."""

from __future__ import annotations

from pathlib import Path

from mole.report import JobRow, find_jobs, read_job, summary, table, to_csv, to_markdown
from mole.report_paper import paper_report


def write_report(root: str | Path, output: str | Path | None = None) -> tuple[Path, Path, list[JobRow]]:
    """Write ``report.md`` and ``report.csv`` (into ``root`` unless ``output`` names a directory)."""
    rows = [read_job(p) for p in find_jobs(root)]
    header, cells = table(rows)
    out = Path(output) if output is not None else Path(root)
    out.mkdir(parents=True, exist_ok=True)
    md, csv_path = out / "report.md", out / "report.csv"
    paper = paper_report(Path(root), rows)
    jobs_md = to_markdown(header, cells)
    if paper is None:
        md.write_text(f"# {Path(root).name}\n\n{summary(rows)}\n\n" + jobs_md)
        csv_path.write_text(to_csv(header, cells))
    else:  # a paper table's sweep: the paper layout first (report.csv), every job below (jobs.csv)
        paper_md, paper_csv = paper
        md.write_text(f"# {Path(root).name}\n\n{summary(rows)}\n\n{paper_md}\n## Jobs\n\n{jobs_md}")
        csv_path.write_text(paper_csv)
        (out / "jobs.csv").write_text(to_csv(header, cells))
    return md, csv_path, rows
