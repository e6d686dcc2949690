"""The morning report: one self-contained HTML page of a session (`autoresearch report`).

What a user opens at 7 am instead of `awk` on results.tsv: the progress plot (an embedded PNG), the
kept changes each with its diff (the kept commit against its parent, restricted to the session's
trainer) and gain, the crashes grouped by reason with the tail of their logs, the noise floor and
the holdout check, and what the night cost: experiments per hour, device hours, energy.

Everything is read from the session's files (`sessions/TAG/`: session.json, results.tsv, logs/)
and from git; nothing is written but the page. Columns the ledger may gain later (`holdout_bpb`,
`energy_j`, `mean_watts`) are read by name when present and said to be missing otherwise. The page
loads nothing from the network: styles inline, the plot as a data: URL.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
import statistics
import subprocess
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from loop.decide import noise_floor
from loop.holdout import check_floor, holdout_check as check_rows
from loop.results import NOT_SCORED, ResultsFile, ResultsReport, read_results
from loop.session import SessionPaths, load_session_config, now_utc

MAX_DIFF_LINES = 400  # a rewrite of the whole trainer is shown in part; the page stays readable
LOG_TAIL_LINES = 12


@dataclass(frozen=True)
class KeptChange:
    index: int  # the row's `#` in `autoresearch results`
    commit: str
    description: str
    val_bpb: float
    delta: float  # against the best before it (negative: better)
    holdout_bpb: float | None
    diff: str  # unified diff of the trainer, "" when unavailable (see diff_note)
    diff_note: str = ""


@dataclass(frozen=True)
class Failure:
    index: int
    commit: str
    description: str
    log_tail: str


@dataclass(frozen=True)
class FailureGroup:
    """Crashed (or rejected) experiments that share one reason."""

    status: str
    reason: str
    failures: list[Failure]


@dataclass(frozen=True)
class NoiseFloor:
    rule: str | None
    sigma: float | None
    z: float | None
    min_floor: float | None
    floor: float | None  # the gain a change had to beat (noise rule); None when unknown
    baseline_runs: list[float]


@dataclass(frozen=True)
class HoldoutCheck:
    """Does the validation gain hold on data nobody tuned on? None fields: not recorded."""

    recorded: int  # rows with a holdout_bpb
    baseline_holdout: float | None
    best_holdout: float | None
    val_gain: float | None  # baseline - best on validation (positive: better)
    holdout_gain: float | None
    verdict: str


@dataclass(frozen=True)
class Cost:
    started: str
    finished: str
    wall_hours: float | None
    experiments_per_hour: float | None
    device: str
    device_hours: float | None  # the summed run time of every row that records it
    runs_timed: int
    energy_kwh: float | None
    mean_watts: float | None


@dataclass(frozen=True)
class SessionReport:
    tag: str
    branch: str
    backend: str
    preset: str
    trainer: str
    results_path: str
    generated: str
    summary: ResultsReport
    kept: list[KeptChange]
    failures: list[FailureGroup]
    noise: NoiseFloor
    holdout: HoldoutCheck
    cost: Cost
    problems: list[str] = field(default_factory=list)  # lines of the ledger that were skipped or odd

    def to_dict(self) -> dict:
        return asdict(self)


# -- gathering ------------------------------------------------------------------------------------

def build_report(root: Path, tag: str, table: ResultsFile | None = None) -> SessionReport:
    """Everything the page shows, from the session's files and git (`table`: its ledger, if read
    already). Raises FileNotFoundError when the session has no ledger, NotAResultsTable when its
    ledger is not one."""
    paths = SessionPaths.of(root, tag)
    table = table if table is not None else read_results(paths.ledger)
    rows = table.rows
    try:
        config = load_session_config(paths)
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        config = None  # an old or damaged session.json: report what the ledger alone says
    trainer = config.trainer if config else ""
    summary = ResultsReport.from_rows(rows)

    kept = []
    for gain in summary.gains:
        diff, note = trainer_diff(root, gain.commit, trainer)
        kept.append(KeptChange(gain.index, gain.commit, gain.description, gain.val_bpb, gain.delta,
                               _number(table.value(gain.index - 1, "holdout_bpb")), diff, note))

    sigma = summary.noise_sigma
    repeats = [r.val_bpb for r in rows if r.status == "baseline" and r.scored]
    floor = None
    if config and config.rule == "noise" and sigma is not None:
        floor = noise_floor(sigma, config.z, config.min_floor)
    noise = NoiseFloor(config.rule if config else None, sigma, config.z if config else None,
                       config.min_floor if config else None, floor, repeats)

    return SessionReport(
        tag=tag, branch=config.branch if config else f"autoresearch/{tag}",
        backend=config.backend if config else _common(r.backend for r in rows),
        preset=config.preset if config else _common(r.preset for r in rows),
        trainer=trainer, results_path=str(paths.ledger), generated=now_utc(), summary=summary, kept=kept,
        failures=failure_groups(table, paths), noise=noise, holdout=holdout_check(table, summary),
        cost=cost_of(table, summary, config.created if config else ""),
        problems=[str(p) for p in table.problems],
    )


def trainer_diff(root: Path, commit: str, trainer: str) -> tuple[str, str]:
    """The kept commit against its parent, restricted to the trainer (the whole commit when the
    trainer is unknown); ("", why) when git cannot show it."""
    if not re.fullmatch(r"[0-9a-fA-F]{4,40}", commit):  # a ledger cell, never passed to git as an option
        return "", f"{commit or '(no commit)'!r} is not a commit hash"
    resolved = _git(root, "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}")
    if resolved is None:
        return "", f"commit {commit} is not in this repository"
    sha = resolved.strip()
    parents = (_git(root, "rev-list", "--parents", "-n", "1", sha) or "").split()[1:]
    limit = ["--", trainer] if trainer else []
    if parents:
        diff = _git(root, "diff", "--no-color", "--no-ext-diff", parents[0], sha, *limit)
    else:
        diff = _git(root, "show", "--no-color", "--no-ext-diff", "--format=", sha, *limit)
    if diff is None:
        return "", f"git could not show commit {commit}"
    if not diff.strip():
        return "", f"commit {commit} does not change {trainer or 'any file'}"
    lines = diff.splitlines()
    if len(lines) > MAX_DIFF_LINES:
        return "\n".join(lines[:MAX_DIFF_LINES]), f"first {MAX_DIFF_LINES} of {len(lines)} lines: `git show {commit}` has all"
    return diff, ""


def failure_groups(table: ResultsFile, paths: SessionPaths) -> list[FailureGroup]:
    """Crashed, then rejected, experiments grouped by their reason, largest group first."""
    groups: dict[tuple[str, str], list[Failure]] = defaultdict(list)
    for i, row in enumerate(table.rows):
        if row.status in NOT_SCORED:
            groups[(row.status, row.reason or "(no reason recorded)")].append(
                Failure(i + 1, row.commit, row.description, _log_tail(paths, i + 1)))
    ordered = sorted(groups.items(), key=lambda item: (item[0][0] != "crash", -len(item[1]), min(f.index for f in item[1])))
    return [FailureGroup(status, reason, failures) for (status, reason), failures in ordered]


def holdout_check(table: ResultsFile, summary: ResultsReport) -> HoldoutCheck:
    """Baseline against best on the holdout, beside the same pair on validation, judged as
    `autoresearch results` judges it (loop.holdout)."""
    recorded = sum(r.holdout_bpb is not None for r in table.rows)
    if not recorded:
        return HoldoutCheck(0, None, None, None, None, "no holdout recorded")
    check = check_rows(table.rows, check_floor(summary.noise_sigma))
    if check is None:
        return HoldoutCheck(recorded, None, None, summary.improvement, None,
                            "holdout recorded, but not for both the baseline and the best")
    verdict = check.verdict if summary.gains else "no change was kept: nothing to check"
    return HoldoutCheck(recorded, check.baseline_holdout, check.best_holdout, summary.improvement,
                        check.holdout_gain, verdict)


def cost_of(table: ResultsFile, summary: ResultsReport, created: str) -> Cost:
    rows = table.rows
    stamps = [t for t in (_time(r.timestamp) for r in rows) if t is not None]
    start = _time(created)
    if start is None and stamps:  # the first row is stamped when its run ended
        first = next(r for r in rows if _time(r.timestamp) is not None)
        start = stamps[0].timestamp() - (first.seconds or 0.0)
        start = datetime.fromtimestamp(start, timezone.utc)
    end = stamps[-1] if stamps else None
    hours = (end - start).total_seconds() / 3600 if start and end and end > start else None
    timed = [r.seconds for r in rows if r.seconds is not None]
    devices = sorted({r.device for r in rows if r.device})
    energy = [_number(table.value(i, "energy_j")) for i in range(len(rows))]
    energy = [e for e in energy if e is not None]
    watts = [(_number(table.value(i, "mean_watts")), r.seconds) for i, r in enumerate(rows)]
    watts = [(w, s) for w, s in watts if w is not None]
    if watts and all(s for _, s in watts):
        mean_watts = sum(w * s for w, s in watts) / sum(s for _, s in watts)  # time-weighted
    else:
        mean_watts = statistics.fmean(w for w, _ in watts) if watts else None
    return Cost(
        started=start.strftime("%Y-%m-%d %H:%M UTC") if start else "",
        finished=end.strftime("%Y-%m-%d %H:%M UTC") if end else "",
        wall_hours=hours,
        experiments_per_hour=summary.experiments / hours if hours else None,
        device=", ".join(devices),
        device_hours=sum(timed) / 3600 if timed else None,
        runs_timed=len(timed),
        energy_kwh=sum(energy) / 3.6e6 if energy else None,
        mean_watts=mean_watts,
    )


def _log_tail(paths: SessionPaths, index: int) -> str:
    """The end of the last log of experiment `index` (its re-run's, if it had one)."""
    logs = sorted(paths.logs.glob(f"{index:04d}-*.log")) if paths.logs.is_dir() else []
    if not logs:
        return ""
    text = logs[-1].read_text(encoding="utf-8", errors="replace")
    return "\n".join(text.rstrip().splitlines()[-LOG_TAIL_LINES:])


def _git(root: Path, *args: str) -> str | None:
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, errors="replace")
    return done.stdout if done.returncode == 0 else None


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _time(stamp: str) -> datetime | None:
    try:
        return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    except (TypeError, ValueError):
        return None


def _common(values) -> str:
    return ", ".join(sorted({v for v in values if v}))


# -- the page -------------------------------------------------------------------------------------

def progress_png(rows) -> bytes | None:
    """The progress figure as PNG bytes, None when nothing has a score yet."""
    import matplotlib.pyplot as plt

    from loop.results import progress_figure

    try:
        fig, _ = progress_figure(rows)
    except ValueError:
        return None
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def render_html(report: SessionReport, plot: bytes | None) -> str:
    s = report.summary
    e = html.escape
    title = f"autoresearch · session {report.tag}"
    cards = [
        ("best val_bpb", _f(s.best_bpb), f"baseline {_f(s.baseline_bpb)}"),
        ("improvement", _f(s.improvement), f"{s.improvement_pct:.2f}% of the baseline" if s.improvement_pct is not None else ""),
        ("experiments", str(s.experiments), f"+{s.baseline_runs} baseline runs" if s.baseline_runs else ""),
        ("kept", str(len(report.kept)), f"kept rate {100 * s.kept_rate:.0f}%" if s.kept_rate is not None else ""),
        ("crashed", str(s.crashed), f"rejected {s.rejected}" if s.rejected else ""),
        ("experiments / hour", _f(report.cost.experiments_per_hour, ".1f"), _hours(report.cost.wall_hours)),
    ]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title>",
        f"<style>{_CSS}</style></head><body><main>",
        f"<h1>Session <code>{e(report.tag)}</code></h1>",
        f'<p class="meta">branch <code>{e(report.branch)}</code> · {e(report.backend or "?")} / '
        f'{e(report.preset or "?")}{" · " + e(report.cost.device) if report.cost.device else ""} · '
        f'{e(report.cost.started or "?")} → {e(report.cost.finished or "?")} · ledger <code>{e(report.results_path)}</code></p>',
        '<section class="cards">' + "".join(
            f'<div class="card"><div class="label">{e(label)}</div><div class="value">{e(value)}</div>'
            f'<div class="sub">{e(sub)}</div></div>' for label, value, sub in cards) + "</section>",
    ]
    if report.problems:
        items = "".join(f"<li>{e(p)}</li>" for p in report.problems[:50])
        parts.append(f'<section class="warn"><h2>Ledger problems</h2><p>{len(report.problems)} line(s) of the '
                     f"ledger were skipped or partly read; the figures below leave them out.</p><ul>{items}</ul></section>")
    parts.append('<section id="progress"><h2>Progress</h2>')
    if plot:
        parts.append(f'<img class="plot" alt="progress plot: val_bpb per experiment, running best and noise band" '
                     f'src="data:image/png;base64,{base64.b64encode(plot).decode("ascii")}">')
    else:
        parts.append("<p>Nothing to plot yet: no experiment has a score.</p>")
    parts.append("</section>")
    parts += [_kept_section(report), _failures_section(report), _noise_section(report), _cost_section(report)]
    parts.append(f'<footer>Written {e(report.generated)} by <code>autoresearch report</code>.</footer>')
    parts.append("</main></body></html>")
    return "\n".join(parts) + "\n"


def _kept_section(report: SessionReport) -> str:
    e = html.escape
    out = ['<section id="kept"><h2>Kept changes</h2>']
    if not report.kept:
        out.append("<p>No change beat the baseline.</p></section>")
        return "\n".join(out)
    total = sum(k.delta for k in report.kept)
    out.append(f"<p>{len(report.kept)} change(s), {total:+.6f} val_bpb in all"
               f"{' (trainer <code>' + e(report.trainer) + '</code>)' if report.trainer else ''}.</p>")
    for k in report.kept:
        holdout = f' · holdout {k.holdout_bpb:.6f}' if k.holdout_bpb is not None else ""
        out.append(f'<details class="change" open><summary><span class="gain">{k.delta:+.6f}</span> '
                   f'<b>#{k.index}</b> <code>{e(k.commit)}</code> {e(k.description)} '
                   f'<span class="dim">→ {k.val_bpb:.6f}{holdout}</span></summary>')
        if k.diff:
            out.append(f'<pre class="diff">{_diff_html(k.diff)}</pre>')
        if k.diff_note:
            out.append(f'<p class="dim">{e(k.diff_note)}</p>')
        out.append("</details>")
    out.append("</section>")
    return "\n".join(out)


def _failures_section(report: SessionReport) -> str:
    e = html.escape
    out = ['<section id="crashes"><h2>Crashes by reason</h2>']
    if not report.failures:
        out.append("<p>No experiment crashed or was rejected.</p></section>")
        return "\n".join(out)
    for group in report.failures:
        label = "crashed" if group.status == "crash" else "rejected"
        out.append(f'<div class="failure {e(group.status)}"><h3>{len(group.failures)} × {label}: '
                   f'{e(group.reason)}</h3><ul>')
        for f in group.failures:
            out.append(f"<li><b>#{f.index}</b> <code>{e(f.commit)}</code> {e(f.description)}")
            if f.log_tail:
                out.append(f'<details><summary>end of its log</summary><pre class="log">{e(f.log_tail)}</pre></details>')
            out.append("</li>")
        out.append("</ul></div>")
    out.append("</section>")
    return "\n".join(out)


def _noise_section(report: SessionReport) -> str:
    e = html.escape
    n, h = report.noise, report.holdout
    rows = [("keep rule", e(n.rule) if n.rule else "unknown (no session.json)"),
            ("baseline runs", ", ".join(f"{v:.6f}" for v in n.baseline_runs) or "none"),
            ("noise σ (run-to-run spread)", _f(n.sigma))]
    if n.floor is not None:
        rows.append(("noise floor", f"{n.floor:.6f} = max({n.z:g}σ, {n.min_floor:g}): a kept change beat this"))
    elif n.rule == "strict":
        rows.append(("noise floor", "none: the strict rule keeps any lower score"))
    out = ['<section id="noise"><h2>Noise floor and holdout</h2><table class="facts">']
    out += [f"<tr><th>{e(k)}</th><td>{v}</td></tr>" for k, v in rows]
    out.append("</table>")
    if not h.recorded:
        out.append('<p class="holdout none">Holdout check: no holdout recorded.</p>')
    else:
        good = h.verdict.startswith("the validation gain holds")
        out.append('<table class="facts"><tr><th></th><th>baseline</th><th>best</th><th>gain</th></tr>'
                   f"<tr><th>validation</th><td>{_f(report.summary.baseline_bpb)}</td><td>{_f(report.summary.best_bpb)}</td>"
                   f"<td>{_f(h.val_gain)}</td></tr>"
                   f"<tr><th>holdout</th><td>{_f(h.baseline_holdout)}</td><td>{_f(h.best_holdout)}</td>"
                   f"<td>{_f(h.holdout_gain)}</td></tr></table>")
        out.append(f'<p class="holdout {"ok" if good else "bad"}">Holdout check: {e(h.verdict)} '
                   f"({h.recorded} run(s) recorded a holdout_bpb).</p>")
    out.append("</section>")
    return "\n".join(out)


def _cost_section(report: SessionReport) -> str:
    e = html.escape
    c = report.cost
    gpu = c.device and not all(d.lower().startswith("cpu") for d in c.device.split(", "))
    kind = "GPU-hours" if gpu else "device hours (CPU)" if c.device else "device hours"
    energy = (f"{c.energy_kwh:.3f} kWh" if c.energy_kwh is not None else "not recorded")
    rows = [("wall clock", f"{e(c.started or '?')} → {e(c.finished or '?')} ({_hours(c.wall_hours) or 'unknown'})"),
            ("experiments per hour", _f(c.experiments_per_hour, ".2f")),
            (kind, (f"{_device_time(c.device_hours)} over {c.runs_timed} timed run(s)" if c.device_hours is not None
                    else "not recorded")),
            ("energy", energy),
            ("mean power", f"{c.mean_watts:.0f} W" if c.mean_watts is not None else "not recorded")]
    return ('<section id="cost"><h2>Throughput and cost</h2><table class="facts">'
            + "".join(f"<tr><th>{e(k)}</th><td>{v}</td></tr>" for k, v in rows) + "</table></section>")


def _diff_html(diff: str) -> str:
    out = []
    for line in diff.splitlines():
        kind = ("meta" if line.startswith(("diff ", "index ", "+++", "---")) else "hunk" if line.startswith("@@")
                else "add" if line.startswith("+") else "del" if line.startswith("-") else "ctx")
        out.append(f'<span class="{kind}">{html.escape(line) or " "}</span>')
    return "".join(out)  # each line is a block of its own: a newline between them would double it


def _f(value: float | None, spec: str = ".6f") -> str:
    return "–" if value is None else format(value, spec)


def _device_time(hours: float) -> str:
    return f"{hours:.2f} h" if hours >= 0.1 else f"{hours:.4f} h ({3600 * hours:.0f} s)"


def _hours(hours: float | None) -> str:
    if hours is None:
        return ""
    return f"{hours:.1f} h" if hours >= 1 else f"{60 * hours:.0f} min"


_CSS = """
:root { --fg: #1f2328; --dim: #667085; --line: #d8dee4; --green: #1a7f37; --red: #cf222e; --bg2: #f6f8fa; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff;
       font: 15px/1.5 -apple-system, "Segoe UI", "DejaVu Sans", Helvetica, Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 26px; margin: 0 0 4px; } h2 { font-size: 19px; margin: 32px 0 10px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
h3 { font-size: 15px; margin: 8px 0; } h1 code { font-size: inherit; }
code, pre { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 13px; }
.meta, .dim, footer { color: var(--dim); }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(150px, 1fr)); gap: 10px; margin-top: 16px; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; background: var(--bg2); }
.card .label { color: var(--dim); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .value { font-size: 22px; font-weight: 600; font-variant-numeric: tabular-nums; }
.card .sub { color: var(--dim); font-size: 12px; min-height: 1em; }
img.plot { width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px; }
details.change { border: 1px solid var(--line); border-radius: 6px; margin: 8px 0; padding: 6px 10px; }
details.change > summary { cursor: pointer; }
.gain { color: var(--green); font-weight: 600; font-variant-numeric: tabular-nums; }
pre { background: var(--bg2); border-radius: 6px; padding: 8px 10px; overflow-x: auto; margin: 6px 0; }
pre.diff .add { color: var(--green); background: #e6ffec; display: block; }
pre.diff .del { color: var(--red); background: #ffebe9; display: block; }
pre.diff .hunk { color: #8250df; display: block; } pre.diff .meta { color: var(--dim); display: block; }
pre.diff .ctx { display: block; }
.failure { border-left: 4px solid var(--red); padding: 2px 12px; margin: 10px 0; }
.failure.rejected { border-left-color: #8e44ad; }
table.facts { border-collapse: collapse; margin: 8px 0; }
table.facts th, table.facts td { text-align: left; padding: 4px 14px 4px 0; border-bottom: 1px solid var(--line);
                                 font-variant-numeric: tabular-nums; vertical-align: top; }
table.facts th { color: var(--dim); font-weight: 500; }
.holdout { padding: 8px 12px; border-radius: 6px; background: var(--bg2); }
.holdout.ok { border-left: 4px solid var(--green); } .holdout.bad { border-left: 4px solid var(--red); }
.holdout.none { border-left: 4px solid var(--line); }
.warn { border: 1px solid #d4a72c; background: #fff8c5; border-radius: 6px; padding: 4px 14px; }
footer { margin-top: 40px; font-size: 13px; }
"""


def write_report(root: Path, tag: str, out: Path, table: ResultsFile | None = None) -> SessionReport:
    """Build the report of session `tag` and write its page to `out` (`table`: its ledger, if read
    already)."""
    table = table if table is not None else read_results(SessionPaths.of(root, tag).ledger)
    report = build_report(root, tag, table)
    page = render_html(report, progress_png(table.rows))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return report
