"""results.tsv: one row per experiment, append-only, readable by upstream's scripts.

The first five columns are upstream's exactly (`commit val_bpb memory_gb status description`), so
existing notebooks and `awk -F'\\t'` one-liners keep working; ours follow. Rows are written whole
with one `write` + flush + fsync; a torn last line (the process or the machine died mid-write) is
ignored on read and truncated before the next append, so the file only ever holds whole rows.
Reading finds columns by name (any order, columns added later included) and names every line it
cannot read; a file that is not a results table at all is refused (`read_results`).

Also here: the report behind `autoresearch results` (best, kept rate, gains by change, crashes by
reason) and the progress plot (upstream's analysis notebook figure, plus the noise band).
"""

from __future__ import annotations

import math
import os
import re
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, get_args, get_type_hints

from harness.files import fsync_dir

UPSTREAM_COLUMNS = ("commit", "val_bpb", "memory_gb", "status", "description")
RESULT_COLUMNS = UPSTREAM_COLUMNS + (
    "timestamp", "seconds", "num_steps", "tokens_per_sec", "backend", "device", "preset",
    "best_bpb", "noise_sigma", "reason", "trainer_sha", "holdout_bpb", "chain", "worker", "node",
    "sigma_dof", "runs", "speed", "speed_after", "voids", "energy_j", "mean_watts",
)
# keep|discard|crash are upstream's; `rejected`: the change touched a frozen file (never run);
# `baseline`: one of the session's repeats of the unchanged trainer that measure the noise floor.
# `recheck`: a run of the incumbent, to compare candidates with it under today's conditions; `void`:
# an experiment not judged, because the machine's speed drifted in every run of it (noise rule).
STATUSES = ("keep", "discard", "crash", "rejected", "baseline", "recheck", "void")
NOT_SCORED = ("crash", "rejected", "void")  # rows whose val_bpb is the 0.000000 placeholder
# Kept in the session's ledger, left out of the repository's copy that an agent reads: the holdout
# is scored for every experiment and never shown to the agent.
PRIVATE_COLUMNS = ("holdout_bpb",)
NOISE_Z = 2.0  # the band drawn around the running best: +-NOISE_Z * noise_sigma (the default rule)

_DESCRIPTION_LIMIT = 200
_REASON_LIMIT = 300
_WHITESPACE = re.compile(r"\s+")


def sanitize(text: object, limit: int = _DESCRIPTION_LIMIT) -> str:
    """One line without tabs: a tab would shift every later column, a newline would split the row."""
    cleaned = _WHITESPACE.sub(" ", str(text or "")).strip()
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3].rstrip() + "..."


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class ResultRow:
    commit: str
    val_bpb: float
    memory_gb: float
    status: str
    description: str
    timestamp: str = field(default_factory=_now)
    seconds: float | None = None
    num_steps: int | None = None
    tokens_per_sec: float | None = None
    backend: str = ""
    device: str = ""
    preset: str = ""
    best_bpb: float | None = None  # the best after this row was decided
    noise_sigma: float | None = None
    reason: str = ""  # why a crash crashed or a rejection was rejected
    trainer_sha: str = ""
    holdout_bpb: float | None = None  # the evaluator's score on the holdout (PRIVATE_COLUMNS)
    chain: str = ""  # SHA-256 linking this row to the one before (loop.integrity)
    worker: str = ""  # the parallel loop's worker that ran it (loop.parallel); "" when run in-process
    node: str = ""  # the machine that worker ran on
    sigma_dof: int | None = None  # degrees of freedom of noise_sigma (loop.noise)
    runs: str = ""  # the scores the verdict used, `;`-separated
    speed: str = ""  # machine speed before each of those runs, GFLOP/s (harness.scoring.speed)
    speed_after: str = ""  # and after each
    voids: int | None = None  # runs that did not count: the machine's speed had drifted
    energy_j: float | None = None  # the GPU's joules over the experiment's runs (the runner's reading)
    mean_watts: float | None = None

    def __post_init__(self) -> None:
        self.val_bpb = float(self.val_bpb if self.val_bpb is not None else 0.0)
        self.memory_gb = float(self.memory_gb if self.memory_gb is not None else 0.0)
        self.commit = sanitize(self.commit, 40)
        self.status = sanitize(self.status, 20).lower()
        self.description = sanitize(self.description)
        self.reason = sanitize(self.reason, _REASON_LIMIT)
        for name in ("timestamp", "backend", "device", "preset", "trainer_sha", "worker", "node"):
            setattr(self, name, sanitize(getattr(self, name), 80))
        if self.status in NOT_SCORED:  # upstream's placeholders for a run that produced no score
            self.val_bpb, self.memory_gb = 0.0, 0.0

    @property
    def scored(self) -> bool:
        return self.status not in NOT_SCORED and self.val_bpb > 0 and math.isfinite(self.val_bpb)

    def to_dict(self) -> dict:
        return asdict(self)

    def cells(self) -> dict[str, str]:
        """The row as TSV cells, upstream's formats for the first five columns."""
        return {
            "commit": self.commit,
            "val_bpb": f"{self.val_bpb:.6f}",
            "memory_gb": f"{self.memory_gb:.1f}",
            "status": self.status,
            "description": self.description,
            "timestamp": self.timestamp,
            "seconds": _fmt(self.seconds, ".1f"),
            "num_steps": "" if self.num_steps is None else str(int(self.num_steps)),
            "tokens_per_sec": _fmt(self.tokens_per_sec, ".0f"),
            "backend": self.backend,
            "device": self.device,
            "preset": self.preset,
            "best_bpb": _fmt(self.best_bpb, ".6f"),
            "noise_sigma": _fmt(self.noise_sigma, ".6f"),
            "reason": self.reason,
            "trainer_sha": self.trainer_sha,
            "holdout_bpb": _fmt(self.holdout_bpb, ".6f"),
            "chain": self.chain,
            "worker": self.worker,
            "node": self.node,
            "sigma_dof": "" if self.sigma_dof is None else str(int(self.sigma_dof)),
            "runs": self.runs,
            "speed": self.speed,
            "speed_after": self.speed_after,
            "voids": "" if self.voids is None else str(int(self.voids)),
            "energy_j": _fmt(self.energy_j, ".0f"),
            "mean_watts": _fmt(self.mean_watts, ".1f"),
        }


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


# -- writing --------------------------------------------------------------------------------------

def append_row(path: Path, row: ResultRow) -> None:
    """Append one whole row (header first if the file is new or empty), flushed and fsynced.

    A torn last line is truncated first. A file with another header (an upstream 5-column file)
    keeps it: the row is written with that file's columns only, so its readers stay consistent.
    If the write itself fails (a full disk), the file is cut back to its previous size.
    """
    if row.status not in STATUSES:
        raise ValueError(f"unknown status {row.status!r}: use one of {', '.join(STATUSES)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | getattr(os, "O_BINARY", 0), 0o644)
    try:
        columns = _prepare_for_append(fd)
        cells = row.cells()
        data = "\t".join(cells.get(name, "") for name in columns) + "\n"
        if columns is RESULT_COLUMNS and os.fstat(fd).st_size == 0:
            data = "\t".join(RESULT_COLUMNS) + "\n" + data
        size = os.fstat(fd).st_size
        try:
            _write_all(fd, data.encode("utf-8"))
            os.fsync(fd)
        except OSError:
            os.ftruncate(fd, size)  # never leave half a row behind
            raise
    finally:
        os.close(fd)
    if created:
        fsync_dir(path.parent)


def without_private_columns(text: str) -> str:
    """A results table without `PRIVATE_COLUMNS` (the repository's copy)."""
    lines = text.split("\n")
    header = lines[0].rstrip("\r").split("\t")
    keep = [i for i, name in enumerate(header) if name not in PRIVATE_COLUMNS]
    if len(keep) == len(header):
        return text
    return "\n".join("\t".join(cells[i] for i in keep if i < len(cells)) if line else line
                     for line in lines for cells in [line.rstrip("\r").split("\t")])


def _prepare_for_append(fd: int) -> tuple[str, ...]:
    """Repair a torn tail; return the columns rows must be written with."""
    size = os.fstat(fd).st_size
    if size == 0:
        return RESULT_COLUMNS
    os.lseek(fd, 0, os.SEEK_SET)
    data = b""
    while chunk := os.read(fd, 1 << 20):
        data += chunk
    text = data.decode("utf-8", errors="replace")
    columns, _ = _header(text.split("\n", 1)[0].rstrip("\r"))
    if not data.endswith(b"\n"):
        last_start = data.rfind(b"\n") + 1
        last = data[last_start:].decode("utf-8", errors="replace")
        if last_start == 0:  # a lone header without its newline: torn (or a file without rows)
            os.ftruncate(fd, 0)
            os.fsync(fd)
            return RESULT_COLUMNS
        if _complete_without_newline(last, columns):
            _write_all(fd, b"\n")
        else:
            os.ftruncate(fd, last_start)
        os.fsync(fd)
    return columns


def _complete_without_newline(line: str, columns: tuple[str, ...]) -> bool:
    # Our own rows always end in a newline, so a missing one means torn. A foreign file (an
    # upstream agent's echo) may simply lack the final newline: whole if every column is there.
    if len(columns) > len(UPSTREAM_COLUMNS):
        return False
    return len(line.rstrip("\r").split("\t")) == len(columns)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


# -- reading --------------------------------------------------------------------------------------

class NotAResultsTable(ValueError):
    """The file is not a results table at all (binary, or no header and no readable row)."""


@dataclass(frozen=True)
class LineProblem:
    """Something wrong on one line of a results file; `skipped`: the line was not read as a row."""

    line: int  # from 1, as an editor counts
    message: str
    skipped: bool

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}" + ("; skipped" if self.skipped else "")


@dataclass
class ResultsFile:
    """What a results file holds: its whole rows, where each came from, and what was wrong."""

    columns: tuple[str, ...]
    rows: list[ResultRow] = field(default_factory=list)
    line_numbers: list[int] = field(default_factory=list)  # rows[i] is line line_numbers[i]
    extra: list[dict[str, str]] = field(default_factory=list)  # rows[i]'s columns ResultRow has no field for
    problems: list[LineProblem] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return sum(1 for p in self.problems if p.skipped)

    def value(self, index: int, name: str) -> str:
        """Row `index`'s cell in column `name` as text, whether or not ResultRow has a field for it
        ("" when absent): columns other engineers add reach the report before the dataclass knows them."""
        if name in _ROW_FIELDS:
            value = getattr(self.rows[index], name)
            return "" if value is None else str(value)
        return self.extra[index].get(name, "")


def _header(first_line: str) -> tuple[tuple[str, ...], bool]:
    """The file's columns, and whether the first line is a header (else: upstream's five, no header)."""
    names = tuple(name.strip().lower() for name in first_line.lstrip("\ufeff").split("\t"))
    if names[0] == "commit" or {"commit", "status"} <= set(names):  # upstream's header starts with commit
        return (RESULT_COLUMNS if names == RESULT_COLUMNS else names), True
    return UPSTREAM_COLUMNS, False


def read_rows(path: Path) -> list[ResultRow]:
    """The whole rows of a results file, skipping what read_results reports as problems; [] for a
    file that is not a results table. Raises FileNotFoundError if the file does not exist."""
    try:
        return read_results(path).rows
    except NotAResultsTable:
        return []


def read_results(path: Path) -> ResultsFile:
    """Read a results file: ours, upstream's 5-column format, or any file whose header names
    upstream's five columns, in any order (columns are found by name; ResultRow's fields missing
    from the file are left empty, columns it has no field for are kept in `extra`). A file without a header is read as upstream's five.

    A line is skipped, with a LineProblem naming it, when its column count differs from the
    header's, its status is unknown, or a scored row's val_bpb is not a positive number; a torn
    last line (a write was interrupted) is skipped too. Blank lines are ignored. Raises
    NotAResultsTable for a binary file, a header without upstream's columns, or a file without a
    header in which no line reads as a row; FileNotFoundError if the file does not exist."""
    data = Path(path).read_bytes()
    if b"\x00" in data:
        raise NotAResultsTable(f"{path} is a binary file, not a results table (tab-separated text)")
    problems: list[LineProblem] = []
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        text = data.decode("utf-8", errors="replace")
        problems.append(LineProblem(data[: exc.start].count(b"\n") + 1,
                                    "not valid UTF-8; undecodable bytes are shown as \ufffd", False))
    if not text.strip():
        return ResultsFile(RESULT_COLUMNS, problems=problems)
    lines = text.split("\n")
    columns, has_header = _header(lines[0].rstrip("\r"))
    if has_header:
        missing = [name for name in UPSTREAM_COLUMNS if name not in columns]
        if missing and len(lines) == 1:  # a header cut short by an interrupted write: no rows yet
            return ResultsFile(RESULT_COLUMNS, problems=problems)
        if missing:
            raise NotAResultsTable(f"{path} has a header without the column(s) {', '.join(missing)}: "
                                   f"a results table starts with {' '.join(UPSTREAM_COLUMNS)} (tab-separated)")
    if text.endswith("\n"):
        lines.pop()  # the empty string after the final newline
    elif not (has_header and len(lines) == 1) and not _complete_without_newline(lines[-1], columns):
        problems.append(LineProblem(len(lines), "incomplete last line (a write was interrupted)", True))
        lines.pop()

    result = ResultsFile(columns, problems=problems)
    first = 2 if has_header else 1
    for number, line in enumerate(lines[first - 1:], start=first):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        values = line.split("\t")
        if len(values) != len(columns):
            shape = "header has" if has_header else "upstream format (no header) has"
            result.problems.append(LineProblem(number, f"{len(values)} column(s) where the {shape} {len(columns)}", True))
            continue
        record = {name: value.strip() for name, value in zip(columns, values)}
        parsed = _row_from_record(record, number)
        if isinstance(parsed, LineProblem):
            result.problems.append(parsed)
            continue
        row, notes = parsed
        result.problems.extend(notes)
        result.rows.append(row)
        result.line_numbers.append(number)
        result.extra.append({name: value for name, value in record.items() if name not in _ROW_FIELDS})
    if not has_header and not result.rows:
        raise NotAResultsTable(f"{path} is not a results table: no header line ({' '.join(UPSTREAM_COLUMNS)}, "
                               f"tab-separated) and no line reads as a row")
    result.problems.sort(key=lambda p: p.line)
    return result


_ROW_FIELDS = {f.name for f in fields(ResultRow)}
_SCORE_COLUMNS = ("val_bpb", "memory_gb")  # upstream's placeholders ("0.000000", "-") on unscored rows


def _field_types() -> dict[str, tuple[type, bool]]:
    """Each ResultRow field's value type (str, int or float) and whether it may be None, read from
    the dataclass itself, so that a field added to ResultRow is read without touching this code."""
    hints = get_type_hints(ResultRow)
    types = {}
    for f in fields(ResultRow):
        members = set(get_args(hints[f.name])) or {hints[f.name]}
        kind = int if int in members else float if float in members else str
        types[f.name] = (kind, type(None) in members)
    return types


def _row_from_record(record: dict[str, str], number: int) -> tuple[ResultRow, list[LineProblem]] | LineProblem:
    """A row from its cells by column name, or the problem that keeps the line from being one."""
    status = sanitize(record.get("status", ""), 20).lower()
    if status not in STATUSES:
        shown = f"unknown status {status!r}" if status else "no status"
        return LineProblem(number, f"{shown} (expected one of {', '.join(STATUSES)})", True)
    scored = status not in NOT_SCORED
    notes: list[LineProblem] = []
    values: dict[str, object] = {}
    for name, (kind, optional) in _FIELD_TYPES.items():
        text = record.get(name)
        if kind is str:
            values[name] = text or ""
            continue
        if not text or (not scored and name in _SCORE_COLUMNS):
            if optional or name in _SCORE_COLUMNS:
                values[name] = None
            continue  # a required number absent from the file: the field's default
        number_value = _number(text)
        if name == "val_bpb" and (number_value is None or not number_value > 0):
            return LineProblem(number, f"val_bpb {text!r} of a {status} row is not a positive number", True)
        if number_value is None:
            notes.append(LineProblem(number, f"{name} {text!r} is not a number; left empty", False))
            values[name] = None
            continue
        values[name] = int(number_value) if kind is int else number_value
    return ResultRow(**values), notes


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


_FIELD_TYPES = _field_types()


# -- the report -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Gain:
    """A kept change and what it bought: delta = its val_bpb - the best before it (negative)."""

    index: int  # the row's position in the file, from 1 (the table's `#`)
    commit: str
    val_bpb: float
    delta: float
    description: str


@dataclass(frozen=True)
class ResultsReport:
    experiments: int  # every row except the baseline repeats (upstream counts its baseline row)
    baseline_runs: int
    kept: int
    discarded: int
    crashed: int
    rejected: int
    kept_rate: float | None  # kept / (kept + discarded), as upstream's analysis notebook
    baseline_bpb: float | None
    best_bpb: float | None
    best_description: str
    best_commit: str
    improvement: float | None  # baseline - best (positive is better)
    improvement_pct: float | None
    noise_sigma: float | None
    gains: list[Gain]  # chronological
    crashes_by_reason: dict[str, int]
    energy_j: float | None = None  # over every row that recorded it (the runner's GPU counter)
    energy_per_keep_j: float | None = None  # that, per kept improvement

    @classmethod
    def from_rows(cls, rows: list[ResultRow]) -> "ResultsReport":
        counts = Counter(row.status for row in rows)
        baseline, baseline_index = baseline_of(rows)
        best_line = running_best(rows)
        gains = []
        for i, row in enumerate(rows):
            if row.status == "keep" and row.scored and i != baseline_index:
                before = best_line[i - 1] if i > 0 and best_line[i - 1] is not None else baseline
                if before is not None:
                    gains.append(Gain(i + 1, row.commit, row.val_bpb, row.val_bpb - before, row.description))
        best_row = min((r for r in rows if r.status == "keep" and r.scored), key=lambda r: r.val_bpb, default=None)
        best = best_row.val_bpb if best_row else baseline
        if best is not None and baseline is not None:
            best = min(best, baseline)
        decided = counts["keep"] + counts["discard"]
        improvement = baseline - best if baseline is not None and best is not None else None
        reasons = Counter(row.reason or "(no reason recorded)" for row in rows if row.status == "crash")
        joules = [row.energy_j for row in rows if row.energy_j is not None]
        energy = sum(joules) if joules else None
        return cls(
            experiments=len(rows) - counts["baseline"] - counts["recheck"],
            baseline_runs=counts["baseline"],
            kept=counts["keep"],
            discarded=counts["discard"],
            crashed=counts["crash"],
            rejected=counts["rejected"],
            kept_rate=counts["keep"] / decided if decided else None,
            baseline_bpb=baseline,
            best_bpb=best,
            best_description=best_row.description if best_row and best_row.val_bpb == best else "baseline",
            best_commit=best_row.commit if best_row and best_row.val_bpb == best else "",
            improvement=improvement,
            improvement_pct=100 * improvement / baseline if improvement is not None and baseline else None,
            noise_sigma=noise_sigma_of(rows),
            gains=gains,
            crashes_by_reason=dict(reasons.most_common()),
            energy_j=energy,
            energy_per_keep_j=energy / len(gains) if energy is not None and gains else None,
        )

    def to_dict(self) -> dict:
        return asdict(self)


def baseline_of(rows: list[ResultRow]) -> tuple[float | None, int | None]:
    """The baseline val_bpb and, for an upstream file, the index of the row that is the baseline.

    Ours: the mean of the `baseline` repeats. Upstream: the first scored row (its first run is the
    unchanged trainer, logged as `keep`)."""
    repeats = [row.val_bpb for row in rows if row.status == "baseline" and row.scored]
    if repeats:
        return statistics.fmean(repeats), None
    for i, row in enumerate(rows):
        if row.scored:
            return row.val_bpb, i
    return None, None


def noise_sigma_of(rows: list[ResultRow]) -> float | None:
    """The session's noise sigma: the latest recorded, else the spread of the baseline repeats."""
    for row in reversed(rows):
        if row.noise_sigma is not None:
            return row.noise_sigma
    repeats = [row.val_bpb for row in rows if row.status == "baseline" and row.scored]
    return statistics.stdev(repeats) if len(repeats) >= 2 else None


def running_best(rows: list[ResultRow]) -> list[float | None]:
    """The best val_bpb after each row: starts at the baseline, moves only on kept rows."""
    baseline, _ = baseline_of(rows)
    best, line = baseline, []
    for row in rows:
        if row.status == "keep" and row.scored:
            best = row.val_bpb if best is None else min(best, row.val_bpb)
        line.append(best)
    return line


def report(rows: list[ResultRow]) -> ResultsReport:
    return ResultsReport.from_rows(rows)


# -- the progress plot ----------------------------------------------------------------------------

_STATUS_STYLE = {  # colour, marker size, legend label, z-order
    "discard": ("#bbbbbb", 14, "Discarded", 2),
    "baseline": ("#3498db", 30, "Baseline", 3),
    "keep": ("#2ecc71", 55, "Kept", 4),
}
_UNSCORED_STYLE = {"crash": ("#e74c3c", "x", "Crashed"), "rejected": ("#8e44ad", "s", "Rejected")}
_MAX_VALUE_LABELS = 12  # off-scale points get their value written beside them up to this many


@dataclass(frozen=True)
class ProgressPlot:
    """What the progress figure shows, for the message that announces it and for tests."""

    title: str
    legend: list[str]
    y_range: tuple[float, float]
    off_scale: list[tuple[int, float]]  # (experiment #, val_bpb) of scores drawn on an edge
    unscored: list[int]  # experiment # of crashed and rejected rows (the strip under the axis)

    def describe(self) -> str:
        parts = []
        if self.off_scale:
            parts.append(f"{len(self.off_scale)} score(s) outside the y-range drawn on its edge with their value")
        if self.unscored:
            parts.append(f"{len(self.unscored)} run(s) without a score in the strip below")
        return "; ".join(parts)


def progress_figure(rows: list[ResultRow], z: float = NOISE_Z):
    """The progress figure (a matplotlib Figure: main axis, then the no-score strip) and its facts.

    val_bpb per experiment (discarded faint, kept highlighted and labelled), the running best as a
    step line and the noise band (+-z*sigma around it); x is the row number. Scores outside the
    y-range (a diverged run at 2.3 next to gains of 0.001) are triangles on the edge they fall
    beyond, with their value, counted in the legend. Crashed and rejected rows have no score: they
    sit in a strip of their own under the axis, never among the scores. The first row of an
    upstream file (its baseline, logged `keep`) is drawn as the baseline."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    summary = ResultsReport.from_rows(rows)
    if summary.baseline_bpb is None:
        raise ValueError("nothing to plot: no experiment in the file has a val_bpb yet")
    xs = list(range(1, len(rows) + 1))
    best_line = running_best(rows)
    baseline, best = summary.baseline_bpb, summary.best_bpb
    _, baseline_index = baseline_of(rows)
    sigma = summary.noise_sigma or 0.0

    spread = baseline - best
    margin = max(0.15 * spread, 1.5 * z * sigma, 1e-4 * baseline)
    low, high = best - margin, baseline + max(margin, z * sigma) + 0.5 * margin

    fig, (ax, strip) = plt.subplots(2, 1, figsize=(16, 9), sharex=True,
                                    gridspec_kw={"height_ratios": [12, 1], "hspace": 0.04})
    if sigma > 0:
        band_x = [x for x, b in zip(xs, best_line) if b is not None]
        band_y = [b for b in best_line if b is not None]
        ax.fill_between(band_x, [b - z * sigma for b in band_y], [b + z * sigma for b in band_y],
                        step="post", color="#27ae60", alpha=0.12, linewidth=0, zorder=1,
                        label=f"Noise band (±{z:g}σ, σ={sigma:.4g})")

    off_scale: list[tuple[int, float, str]] = []
    for status, (colour, size, label, order) in _STATUS_STYLE.items():
        points = [(x, r.val_bpb) for i, (x, r) in enumerate(zip(xs, rows))
                  if r.scored and ("baseline" if i == baseline_index else r.status) == status]
        inside = [(x, y) for x, y in points if low <= y <= high]
        off_scale += [(x, y, colour) for x, y in points if not low <= y <= high]
        if points:  # the legend names every status drawn, even one whose points are all off scale
            edge = {"edgecolors": "black", "linewidths": 0.5} if status != "discard" else {"alpha": 0.7}
            ax.scatter(*(zip(*inside) if inside else ([], [])), c=colour, s=size, zorder=order,
                       label=f"{label} ({len(points)})", **edge)
    for x, y, colour in off_scale:  # on the edge it falls beyond, pointing that way, with its value
        above = y > high
        edge_y = high - 0.012 * (high - low) if above else low + 0.012 * (high - low)
        ax.scatter([x], [edge_y], marker="^" if above else "v", s=60, c=colour, edgecolors="black",
                   linewidths=0.6, zorder=5)
        if len(off_scale) <= _MAX_VALUE_LABELS:
            ax.annotate(f"{y:.4f}", (x, edge_y), textcoords="offset points", xytext=(6, -3 if above else 3),
                        fontsize=8, color="#555555", ha="left", va="top" if above else "bottom")

    line_x = [x for x, b in zip(xs, best_line) if b is not None]
    line_y = [b for b in best_line if b is not None]
    if line_x:
        ax.step(line_x, line_y, where="post", color="#27ae60", linewidth=2, alpha=0.8, zorder=3,
                label="Running best")

    for gain in summary.gains:
        label = gain.description if len(gain.description) <= 45 else gain.description[:42] + "..."
        ax.annotate(label, (gain.index, gain.val_bpb), textcoords="offset points", xytext=(6, 6),
                    fontsize=8, color="#1a7a3a", rotation=30, ha="left", va="bottom")

    # Runs without a score get their own strip: a cross among the scores would read as one.
    unscored = [x for x, r in zip(xs, rows) if not r.scored]
    for status, (colour, marker, label) in _UNSCORED_STYLE.items():
        points = [x for x, r in zip(xs, rows) if not r.scored and r.status == status]
        if points:
            strip.scatter(points, [0.5] * len(points), marker=marker, c=colour, s=36, zorder=2)
            ax.scatter([], [], marker=marker, c=colour, s=36, label=f"{label} ({len(points)}): no score, strip below")
    if not unscored:
        strip.text(0.5, 0.5, "every run has a score", transform=strip.transAxes, ha="center", va="center",
                   fontsize=9, color="#777777")
    strip.set_ylim(0, 1)
    strip.set_yticks([])
    strip.set_ylabel("no score", rotation=0, ha="right", va="center", fontsize=10)
    strip.grid(True, axis="x", alpha=0.2)

    handles, labels = ax.get_legend_handles_labels()
    above = sum(1 for _, y, _ in off_scale if y > high)
    for marker, count, where in (("^", above, "above"), ("v", len(off_scale) - above, "below")):
        if count:
            handles.append(Line2D([], [], linestyle="none", marker=marker, markersize=8, markerfacecolor="#bbbbbb",
                                  markeredgecolor="black"))
            labels.append(f"Off scale ({count} {where} the y-range):\non the edge, value beside")
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, borderaxespad=0)

    improvements = len(summary.gains)
    experiments = f"{summary.experiments} experiments" + (" incl. the baseline" if baseline_index is not None else "")
    title = (f"Autoresearch progress: {experiments}, {improvements} kept "
             f"improvement{'s' if improvements != 1 else ''} over the baseline\n"
             f"baseline {baseline:.6f} → best {best:.6f} ({best - baseline:+.6f}); "
             f"discarded {summary.discarded}, crashed {summary.crashed}, rejected {summary.rejected}")
    ax.set_title(title, fontsize=13)
    ax.set_xlim(0, len(rows) + 1)
    ax.set_ylim(low, high)
    strip.set_xlabel("Experiment # (row of results.tsv)", fontsize=12)
    ax.set_ylabel("Validation BPB (lower is better)", fontsize=12)
    ax.grid(True, alpha=0.2)
    facts = ProgressPlot(title=title, legend=labels, y_range=(low, high),
                         off_scale=[(x, y) for x, y, _ in off_scale], unscored=unscored)
    return fig, facts


def plot_progress(rows: list[ResultRow], out: Path, z: float = NOISE_Z) -> ProgressPlot:
    """Draw the progress figure (progress_figure) into `out`: PNG, or SVG/PDF by its suffix (SVG
    keeps its text as text)."""
    import matplotlib.pyplot as plt

    fig, facts = progress_figure(rows, z)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with plt.rc_context({"svg.fonttype": "none"}):
        fig.savefig(out, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return facts


def rows_by_best(rows: Iterable[ResultRow]) -> list[ResultRow]:
    """Scored rows, lowest val_bpb first (ties keep file order)."""
    return sorted((r for r in rows if r.scored), key=lambda r: r.val_bpb)
