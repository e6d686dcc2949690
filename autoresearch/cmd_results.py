"""`autoresearch results`: the experiments of a results.tsv (ours or upstream's) as a table, a
summary and gains by change; `--json` for tools, `--plot` for upstream's progress figure.
`autoresearch report`: a session's morning page in HTML (loop.report)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer

from autoresearch.output import fail, info, out, print_json, warn


def _default_path() -> Path:
    from harness.paths import repo_root

    return repo_root() / "results.tsv"


def results(
    path: Annotated[Optional[Path], typer.Argument(help="The results file (default: results.tsv in the repository).")] = None,
    top: Annotated[Optional[int], typer.Option("--top", min=1, help="Only the N best experiments, lowest val_bpb first.")] = None,
    kept_only: Annotated[bool, typer.Option("--kept-only", help="Only the kept experiments.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object (rows and summary) on stdout.")] = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Also draw the progress figure into this PNG file.")] = None,
) -> None:
    """Show a results.tsv: the experiments, kept rate, baseline -> best, gains by change.

    Rows are listed in file order (chronological); `--top N` lists the N lowest val_bpb instead.
    Reads upstream's 5-column files too."""
    from loop.results import ResultsReport, plot_progress, rows_by_best

    path = path or _default_path()
    table = read_results_or_fail(path)
    rows = table.rows
    summary = ResultsReport.from_rows(rows)
    numbered = list(enumerate(rows, start=1))
    shown = [(i, r) for i, r in numbered if r.status == "keep"] if kept_only else numbered
    if top is not None:
        order = {id(r): rank for rank, r in enumerate(rows_by_best(r for _, r in shown))}
        shown = sorted((p for p in shown if id(p[1]) in order), key=lambda p: order[id(p[1])])[:top]

    if plot is not None:
        try:
            drawn = plot_progress(rows, plot)
        except ValueError as exc:
            fail(str(exc), "the plot needs at least one scored experiment")
        info(f"wrote {plot}" + (f" ({drawn.describe()})" if drawn.describe() else ""))

    if json_output:
        print_json({"path": str(path),
                    "rows": [dict(r.to_dict(), index=i, line=table.line_numbers[i - 1]) for i, r in shown],
                    "summary": summary.to_dict(),
                    "skipped_lines": table.skipped,
                    "problems": [asdict(p) for p in table.problems]})
        return
    _print_table(rows, shown, path)
    _print_summary(summary)
    _print_holdout(rows, summary)
    if table.skipped:
        out.print(f"{table.skipped} line(s) of the file skipped (warnings above): not counted here")


MAX_WARNINGS = 20  # a file of garbage should not bury the terminal; the count says how many


def read_results_or_fail(path: Path):
    """The file's rows, with a warning on stderr for each line problem; exits 1 on a missing file
    or one that is not a results table."""
    from loop.results import NotAResultsTable, read_results

    try:
        table = read_results(path)
    except FileNotFoundError:
        fail(f"no results file at {path}",
             "start a session (`autoresearch session start TAG`) and run `autoresearch try` or `autoresearch loop`, "
             "or pass the path of a results.tsv")
    except IsADirectoryError:
        fail(f"{path} is a folder", "pass the path of a results.tsv file")
    except NotAResultsTable as exc:
        fail(str(exc), "pass a results.tsv written by `autoresearch` or by upstream's loop")
    for problem in table.problems[:MAX_WARNINGS]:
        warn(f"{path} {problem}")
    if len(table.problems) > MAX_WARNINGS:
        warn(f"... and {len(table.problems) - MAX_WARNINGS} more problem line(s) (`--json` lists them all)")
    return table


def _print_table(rows: list, shown: list, path: Path) -> None:
    from rich.markup import escape
    from rich.table import Table

    from loop.results import baseline_of, running_best

    baseline, _ = baseline_of(rows)
    best_line = running_best(rows)
    styles = {"keep": "green", "discard": "dim", "crash": "red", "rejected": "magenta", "baseline": "blue"}
    table = Table(title=f"{path} ({len(shown)} of {len(rows)} rows)", title_justify="left", expand=False)
    for name, justify in (("#", "right"), ("commit", "left"), ("val_bpb", "right"), ("Δ best", "right"),
                          ("mem GB", "right"), ("status", "left"), ("description", "left")):
        table.add_column(name, justify=justify, overflow="fold", no_wrap=name != "description")
    for index, row in shown:
        before = best_line[index - 2] if index >= 2 else baseline
        delta = ""
        if row.scored and row.status != "baseline" and before is not None:
            delta = f"{row.val_bpb - before:+.6f}"
        description = escape(row.description)
        if row.reason and not row.scored:
            reason = escape(row.reason)
            description = f"{description} [dim]({reason})[/dim]" if description else reason
        style = styles.get(row.status, "")
        table.add_row(str(index), escape(row.commit), f"{row.val_bpb:.6f}" if row.scored else "-", delta,
                      f"{row.memory_gb:.1f}" if row.scored else "-",
                      f"[{style}]{row.status}[/{style}]" if style else row.status, description)
    out.print(table)


def _print_holdout(rows, summary) -> None:
    """Validation against the holdout for the baseline and the best (the session's own ledger has
    the holdout; the repository's copy leaves it out)."""
    from loop.holdout import check_floor, holdout_check

    check = holdout_check(rows, check_floor(summary.noise_sigma))
    if check is not None:
        out.print(f"holdout: {check.describe()}", markup=False)


def _print_summary(summary) -> None:
    from rich.markup import escape
    from rich.table import Table

    counts = (f"{summary.experiments} experiments"
              + (f" (+{summary.baseline_runs} baseline runs)" if summary.baseline_runs else "")
              + f", kept {summary.kept}, discarded {summary.discarded}, crashed {summary.crashed}"
              + (f", rejected {summary.rejected}" if summary.rejected else ""))
    out.print(counts)
    if summary.kept_rate is not None:
        out.print(f"kept rate: {100 * summary.kept_rate:.1f}% (kept / (kept + discarded))")
    if summary.baseline_bpb is not None and summary.best_bpb is not None:
        line = f"baseline {summary.baseline_bpb:.6f} -> best {summary.best_bpb:.6f}"
        if summary.improvement is not None:
            line += f" (improvement {summary.improvement:.6f}, {summary.improvement_pct:.2f}%)"
        out.print(line)
        if summary.best_commit:
            out.print(f"best: {summary.best_commit} {summary.best_description}", markup=False)
    if summary.noise_sigma is not None:
        out.print(f"noise sigma: {summary.noise_sigma:.6f}")
    if summary.energy_j is not None:
        line = f"energy: {summary.energy_j / 3.6e6:.3f} kWh"
        if summary.energy_per_keep_j is not None:
            line += f", {summary.energy_per_keep_j / 3.6e3:.1f} Wh per kept improvement"
        out.print(line)
    if summary.gains:
        gains = Table(title="Gains by change (biggest first)", title_justify="left")
        for name, justify in (("#", "right"), ("Δ val_bpb", "right"), ("val_bpb", "right"), ("description", "left")):
            gains.add_column(name, justify=justify, overflow="fold")
        for gain in sorted(summary.gains, key=lambda g: g.delta):
            gains.add_row(str(gain.index), f"{gain.delta:+.6f}", f"{gain.val_bpb:.6f}", escape(gain.description))
        gains.add_row("", f"{sum(g.delta for g in summary.gains):+.6f}", "", "total over the baseline")
        out.print(gains)
    if summary.crashes_by_reason:
        out.print("crashes by reason:")
        for reason, count in summary.crashes_by_reason.items():
            out.print(f"  {count:>3}  {reason}", markup=False)


def report(
    tag: Annotated[Optional[str], typer.Option("--tag", help="The session (default: the active one, else the latest).")] = None,
    out_path: Annotated[Optional[Path], typer.Option(
        "--out", help="Where to write the page (default: report.html in the session's folder, outside the working tree).")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Also print the report's figures as one JSON object on stdout.")] = False,
) -> None:
    """Write one self-contained HTML page of a session: the progress plot, the kept changes with
    their diffs and gains, crashes by reason, the noise floor and holdout check, experiments per
    hour, device hours and energy where recorded. Open it in any browser; it loads nothing.

    Example: autoresearch report --out night.html"""
    from harness.paths import repo_root
    from loop.report import write_report
    from loop.session import SessionPaths, sessions_dir

    root = repo_root()
    tag = tag or _report_tag(root)
    paths = SessionPaths.of(root, tag)
    if not paths.ledger.is_file():
        known = sorted(p.parent.name for p in sessions_dir(root).glob("*/results.tsv"))
        fail(f"session {tag!r} has no results at {paths.ledger}",
             f"sessions with results here: {', '.join(known)}" if known else
             "start one with `autoresearch session start TAG`")
    table = read_results_or_fail(paths.ledger)  # its warnings, once, before the page repeats them
    out_path = out_path or paths.directory / "report.html"
    written = write_report(root, tag, out_path, table)
    if table.problems:
        info(f"the page lists the {len(table.problems)} ledger problem(s) too")
    summary = written.summary
    info(f"wrote the report of session {tag}: {summary.experiments} experiments, "
         f"{len(written.kept)} kept, {summary.crashed} crashed -> {out_path.resolve().as_uri()}")
    if json_output:
        print_json(dict(written.to_dict(), path=str(out_path)))
    else:
        out.print(str(out_path), markup=False, highlight=False)


def _report_tag(root: Path) -> str:
    """The active session, else the one whose ledger changed last."""
    from loop.ratchet import active_tag
    from loop.session import sessions_dir

    tag = active_tag(root)
    if tag:
        return tag
    ledgers = sorted(sessions_dir(root).glob("*/results.tsv"), key=lambda p: p.stat().st_mtime)
    if not ledgers:
        fail(f"no session in {root}",
             "start one with `autoresearch session start TAG`; for a results.tsv alone, use `autoresearch results`")
    return ledgers[-1].parent.name


def register(app: typer.Typer) -> None:
    app.command(rich_help_panel="Research loop")(results)
    app.command(rich_help_panel="Research loop")(report)
