"""results.tsv: one row per experiment, append-only, readable by upstream's scripts.

The first five columns are upstream's exactly (`commit val_bpb memory_gb status description`), so
existing notebooks and `awk -F'\\t'` one-liners keep working; ours follow. Rows are written whole
with one `write` + flush + fsync; a torn last line (the process or the machine died mid-write) is
ignored on read and truncated before the next append, so the file only ever holds whole rows.

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
from typing import Iterable

from harness.files import fsync_dir

UPSTREAM_COLUMNS = ("commit", "val_bpb", "memory_gb", "status", "description")
RESULT_COLUMNS = UPSTREAM_COLUMNS + (
    "timestamp", "seconds", "num_steps", "tokens_per_sec", "backend", "device", "preset",
    "best_bpb", "noise_sigma", "reason", "trainer_sha",
)
# keep|discard|crash are upstream's; `rejected`: the change touched a frozen file (never run);
# `baseline`: one of the session's repeats of the unchanged trainer that measure the noise floor.
STATUSES = ("keep", "discard", "crash", "rejected", "baseline")
NOT_SCORED = ("crash", "rejected")  # rows whose val_bpb is the 0.000000 placeholder
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

    def __post_init__(self) -> None:
        self.val_bpb = float(self.val_bpb if self.val_bpb is not None else 0.0)
        self.memory_gb = float(self.memory_gb if self.memory_gb is not None else 0.0)
        self.commit = sanitize(self.commit, 40)
        self.status = sanitize(self.status, 20).lower()
        self.description = sanitize(self.description)
        self.reason = sanitize(self.reason, _REASON_LIMIT)
        for name in ("timestamp", "backend", "device", "preset", "trainer_sha"):
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
    if columns is RESULT_COLUMNS:
        return False
    return len(line.rstrip("\r").split("\t")) == len(columns)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


# -- reading --------------------------------------------------------------------------------------

def _header(first_line: str) -> tuple[tuple[str, ...], bool]:
    """The file's columns, and whether the first line is a header (else: our columns, no header)."""
    names = tuple(name.strip().lower() for name in first_line.split("\t"))
    if names and names[0] == "commit" and "status" in names:
        return (RESULT_COLUMNS if names == RESULT_COLUMNS else names), True
    return RESULT_COLUMNS, False


def read_rows(path: Path) -> list[ResultRow]:
    """Every whole row of a results file: ours, upstream's 5-column format, or any file with a
    `commit ... status ...` header (missing columns are left empty). A torn last line is ignored;
    lines without a status are skipped. Raises FileNotFoundError if the file does not exist."""
    text = Path(path).read_bytes().decode("utf-8", errors="replace")
    if not text:
        return []
    lines = text.split("\n")
    columns, has_header = _header(lines[0].rstrip("\r"))
    if text.endswith("\n"):
        lines.pop()  # the empty string after the final newline
    elif not _complete_without_newline(lines[-1], columns):
        lines.pop()  # torn
    rows = []
    for line in lines[1 if has_header else 0:]:
        values = line.rstrip("\r").split("\t")
        record = dict(zip(columns, values))
        if not record.get("status", "").strip():
            continue
        rows.append(_row_from_record(record))
    return rows


_ROW_FIELDS = {f.name for f in fields(ResultRow)}


def _row_from_record(record: dict[str, str]) -> ResultRow:
    values = {name: value.strip() for name, value in record.items() if name in _ROW_FIELDS}
    return ResultRow(
        commit=values.get("commit", ""),
        val_bpb=_float(values.get("val_bpb")) or 0.0,  # upstream crash rows hold 0.000000 or a dash
        memory_gb=_float(values.get("memory_gb")) or 0.0,
        status=values.get("status", ""),
        description=values.get("description", ""),
        timestamp=values.get("timestamp", ""),
        seconds=_float(values.get("seconds")),
        num_steps=_int(values.get("num_steps")),
        tokens_per_sec=_float(values.get("tokens_per_sec")),
        backend=values.get("backend", ""),
        device=values.get("device", ""),
        preset=values.get("preset", ""),
        best_bpb=_float(values.get("best_bpb")),
        noise_sigma=_float(values.get("noise_sigma")),
        reason=values.get("reason", ""),
        trainer_sha=values.get("trainer_sha", ""),
    )


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None


def _int(text: str | None) -> int | None:
    value = _float(text)
    return int(value) if value is not None and math.isfinite(value) else None


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
        return cls(
            experiments=len(rows) - counts["baseline"],
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

def plot_progress(rows: list[ResultRow], out: Path, z: float = NOISE_Z) -> Path:
    """Draw val_bpb per experiment (discarded faint, kept highlighted and labelled), the running
    best as a step line and the noise band (+-z*sigma around it) into a PNG; x is the row number."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot
    import matplotlib.pyplot as plt

    summary = ResultsReport.from_rows(rows)
    if summary.baseline_bpb is None:
        raise ValueError("nothing to plot: no experiment in the file has a val_bpb yet")
    xs = list(range(1, len(rows) + 1))
    best_line = running_best(rows)
    baseline, best = summary.baseline_bpb, summary.best_bpb
    sigma = summary.noise_sigma or 0.0

    spread = baseline - best
    margin = max(0.15 * spread, 1.5 * z * sigma, 1e-4 * baseline)
    low, high = best - margin, baseline + max(margin, z * sigma) + 0.5 * margin

    fig, ax = plt.subplots(figsize=(16, 8))
    if sigma > 0:
        band_x = [x for x, b in zip(xs, best_line) if b is not None]
        band_y = [b for b in best_line if b is not None]
        ax.fill_between(band_x, [b - z * sigma for b in band_y], [b + z * sigma for b in band_y],
                        step="post", color="#27ae60", alpha=0.12, linewidth=0, zorder=1,
                        label=f"Noise band (±{z:g}σ, σ={sigma:.4g})")

    def scatter(status: str, **style) -> None:
        points = [(x, r.val_bpb) for x, r in zip(xs, rows) if r.status == status and r.scored]
        inside = [(x, y) for x, y in points if y <= high]
        above = [x for x, y in points if y > high]
        if inside:
            ax.scatter(*zip(*inside), **style)
        if above:  # off the chart: pinned under the top edge so they are not silently lost
            ax.scatter(above, [high - 0.015 * (high - low)] * len(above), marker="^", s=40, c=style["c"],
                       edgecolors="#777777", linewidths=0.5, zorder=style.get("zorder", 2))

    scatter("discard", c="#bbbbbb", s=14, alpha=0.6, zorder=2, label="Discarded")
    scatter("baseline", c="#3498db", s=30, zorder=3, label="Baseline runs", edgecolors="black", linewidths=0.4)
    scatter("keep", c="#2ecc71", s=55, zorder=4, label="Kept", edgecolors="black", linewidths=0.5)
    failed = [x for x, r in zip(xs, rows) if r.status in NOT_SCORED]
    if failed:
        ax.scatter(failed, [low + 0.04 * (high - low)] * len(failed), marker="x", c="#e74c3c", s=16,
                   alpha=0.6, zorder=2, label="Crashed / rejected")

    line_x = [x for x, b in zip(xs, best_line) if b is not None]
    line_y = [b for b in best_line if b is not None]
    if line_x:
        ax.step(line_x, line_y, where="post", color="#27ae60", linewidth=2, alpha=0.8, zorder=3,
                label="Running best")

    for gain in summary.gains:
        label = gain.description if len(gain.description) <= 45 else gain.description[:42] + "..."
        ax.annotate(label, (gain.index, gain.val_bpb), textcoords="offset points", xytext=(6, 6),
                    fontsize=8, color="#1a7a3a", rotation=30, ha="left", va="bottom")

    ax.set_xlim(0, len(rows) + 1)
    ax.set_ylim(low, high)
    ax.set_xlabel("Experiment #", fontsize=12)
    ax.set_ylabel("Validation BPB (lower is better)", fontsize=12)
    ax.set_title(f"Autoresearch Progress: {summary.experiments} Experiments, "
                 f"{summary.kept} Kept Improvements", fontsize=14)
    ax.legend(loc="upper right", fontsize=9)
    ax.grid(True, alpha=0.2)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return out


def rows_by_best(rows: Iterable[ResultRow]) -> list[ResultRow]:
    """Scored rows, lowest val_bpb first (ties keep file order)."""
    return sorted((r for r in rows if r.scored), key=lambda r: r.val_bpb)
