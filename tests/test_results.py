"""results.tsv: whole rows only, upstream-compatible, and the report/plot behind `autoresearch results`."""

from __future__ import annotations

import html
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from autoresearch.cli import app
from loop.results import (RESULT_COLUMNS, UPSTREAM_COLUMNS, ResultRow, ResultsReport, append_row, progress_figure,
                          read_results, read_rows, running_best)
from ratchet_helpers import cli

PROJECT = Path(__file__).resolve().parent.parent


def full_row(**overrides) -> ResultRow:
    values = dict(commit="a1b2c3d", val_bpb=0.987654321, memory_gb=37.25, status="keep",
                  description="halve TOTAL_BATCH_SIZE", timestamp="2026-03-05T01:02:03Z", seconds=301.04,
                  num_steps=953, tokens_per_sec=1650000.4, backend="cuda", device="cuda", preset="h100",
                  best_bpb=0.987654, noise_sigma=0.00031, reason="", trainer_sha="f" * 64)
    values.update(overrides)
    return ResultRow(**values)


def lines_of(path: Path) -> list[str]:
    text = path.read_text()
    assert text.endswith("\n")
    return text.split("\n")[:-1]


# -- writing and reading --------------------------------------------------------------------------

def test_append_then_read_round_trips_with_upstream_columns_first(tmp_path: Path):
    path = tmp_path / "results.tsv"
    append_row(path, full_row())
    append_row(path, full_row(commit="b2c3d4e", status="crash", val_bpb=1.7, memory_gb=12.0,
                              description="MoE 4 experts", reason="out of memory: CUDA OOM"))
    append_row(path, full_row(commit="c3d4e5f", status="discard", val_bpb=0.99, seconds=None, num_steps=None))

    lines = lines_of(path)
    assert lines[0].split("\t") == list(RESULT_COLUMNS)
    assert RESULT_COLUMNS[:5] == UPSTREAM_COLUMNS == ("commit", "val_bpb", "memory_gb", "status", "description")
    assert all(len(line.split("\t")) == len(RESULT_COLUMNS) for line in lines)
    # Upstream's formats: 6 decimals, memory to 0.1 GB, 0.000000 / 0.0 for a crash.
    assert lines[1].split("\t")[:5] == ["a1b2c3d", "0.987654", "37.2", "keep", "halve TOTAL_BATCH_SIZE"]
    assert lines[2].split("\t")[:5] == ["b2c3d4e", "0.000000", "0.0", "crash", "MoE 4 experts"]

    rows = read_rows(path)
    assert [r.commit for r in rows] == ["a1b2c3d", "b2c3d4e", "c3d4e5f"]
    first = rows[0]
    assert (first.val_bpb, first.memory_gb, first.num_steps, first.seconds) == (0.987654, 37.2, 953, 301.0)
    assert (first.backend, first.preset, first.noise_sigma, first.trainer_sha) == ("cuda", "h100", 0.00031, "f" * 64)
    assert rows[1].reason == "out of memory: CUDA OOM" and rows[1].val_bpb == 0.0
    assert rows[2].seconds is None and rows[2].num_steps is None


def test_new_rows_get_a_timestamp(tmp_path: Path):
    row = ResultRow("abc1234", 1.0, 1.0, "keep", "x")
    assert row.timestamp.endswith("Z") and len(row.timestamp) == 20


def test_torn_last_line_is_ignored_on_read_and_truncated_before_the_next_append(tmp_path: Path):
    path = tmp_path / "results.tsv"
    append_row(path, full_row(commit="aaaaaaa"))
    append_row(path, full_row(commit="bbbbbbb", status="discard"))
    with open(path, "ab") as f:  # what a kill -9 in the middle of a write leaves
        f.write(b"ccccccc\t0.98\t37.2\tkee")
    assert [r.commit for r in read_rows(path)] == ["aaaaaaa", "bbbbbbb"]

    append_row(path, full_row(commit="ddddddd", status="discard"))
    lines = lines_of(path)
    assert "ccccccc" not in path.read_text()
    assert [line.split("\t")[0] for line in lines] == ["commit", "aaaaaaa", "bbbbbbb", "ddddddd"]
    assert all(len(line.split("\t")) == len(RESULT_COLUMNS) for line in lines)


def test_a_row_torn_inside_its_last_column_is_not_taken_for_whole(tmp_path: Path):
    path = tmp_path / "results.tsv"
    append_row(path, full_row(commit="aaaaaaa"))
    whole = "\t".join(full_row(commit="bbbbbbb").cells()[c] for c in RESULT_COLUMNS)
    with open(path, "a") as f:
        f.write(whole[:-10])  # every column present, the trainer hash cut short
    assert [r.commit for r in read_rows(path)] == ["aaaaaaa"]


def test_a_torn_header_is_replaced_by_a_whole_one(tmp_path: Path):
    path = tmp_path / "results.tsv"
    path.write_text("commit\tval_bpb\tmemory_gb\tstatus\tdescrip")
    assert read_rows(path) == []
    append_row(path, full_row())
    lines = lines_of(path)
    assert lines[0].split("\t") == list(RESULT_COLUMNS) and len(lines) == 2


def test_a_failed_write_leaves_no_partial_row(tmp_path: Path):
    """A full disk (here: a file-size limit) in the middle of a row: the file is cut back."""
    pytest.importorskip("resource")
    path = tmp_path / "results.tsv"
    append_row(path, full_row(commit="aaaaaaa"))
    before = path.read_bytes()
    script = textwrap.dedent(f"""
        import os, resource, signal, sys
        sys.path.insert(0, {str(PROJECT)!r})
        from loop.results import ResultRow, append_row
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        size = os.path.getsize({str(path)!r})
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 40, size + 40))
        try:
            append_row({str(path)!r}, ResultRow("bbbbbbb", 1.0, 1.0, "discard", "x" * 150))
        except OSError as exc:
            print("OSError", exc.errno)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "OSError" in done.stdout, done.stderr
    assert path.read_bytes() == before
    assert [r.commit for r in read_rows(path)] == ["aaaaaaa"]


def test_descriptions_and_reasons_are_sanitized(tmp_path: Path):
    path = tmp_path / "results.tsv"
    append_row(path, full_row(description="SwiGLU\tactivation\nwith\r\ngates  ", status="crash",
                              reason="Traceback:\n  File x\tline 3\nValueError: boom"))
    append_row(path, full_row(description="y" * 500))
    lines = lines_of(path)
    assert len(lines) == 3 and all(len(line.split("\t")) == len(RESULT_COLUMNS) for line in lines)
    rows = read_rows(path)
    assert rows[0].description == "SwiGLU activation with gates"
    assert rows[0].reason == "Traceback: File x line 3 ValueError: boom"
    assert len(rows[1].description) <= 200 and rows[1].description.endswith("...")


def test_unknown_status_is_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="unknown status 'improved'"):
        append_row(tmp_path / "results.tsv", full_row(status="improved"))
    assert not (tmp_path / "results.tsv").exists() or read_rows(tmp_path / "results.tsv") == []


UPSTREAM = (
    "commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
    "a3f2c91\t0.997900\t44.0\tkeep\tbaseline\n"
    "b8e1d04\t0.993200\t44.2\tkeep\thalve batch 524K to 262K\n"
    "c1a5f30\t0.000000\t0.0\tcrash\tOOM: sequence length 4096\n"
    "d9e0f11\t0.994100\t44.1\tdiscard\tMoE 4-expert: marginal gain\n"
    "e2b3c44\t0.991000\t44.3\tKEEP\twarmdown 0.5 -> 0.7\n"
    "f5a6b77\t—\t—\tcrash\tGQA typo"  # no final newline, as an `echo -n` leaves it
)


def test_upstream_five_column_file_is_read_with_missing_columns_empty(tmp_path: Path):
    path = tmp_path / "results.tsv"
    path.write_text(UPSTREAM)
    rows = read_rows(path)
    assert [r.status for r in rows] == ["keep", "keep", "crash", "discard", "keep", "crash"]
    assert rows[1].val_bpb == 0.9932 and rows[1].memory_gb == 44.2
    assert rows[5].val_bpb == 0.0 and rows[5].description == "GQA typo"
    assert rows[0].backend == "" and rows[0].seconds is None and rows[0].timestamp == ""


def test_appending_to_an_upstream_file_keeps_its_five_columns(tmp_path: Path):
    path = tmp_path / "results.tsv"
    path.write_text(UPSTREAM)
    append_row(path, full_row(commit="0a0a0a0", val_bpb=0.99, status="discard", description="depth 9"))
    lines = lines_of(path)
    assert lines[0] == "\t".join(UPSTREAM_COLUMNS)
    assert lines[-2] == "f5a6b77\t—\t—\tcrash\tGQA typo"  # its missing newline was added, not cut
    assert lines[-1] == "0a0a0a0\t0.990000\t37.2\tdiscard\tdepth 9"
    assert len(read_rows(path)) == 7


# -- the report -----------------------------------------------------------------------------------

def write_session(path: Path) -> None:
    for row in (
        ResultRow("base001", 1.000, 2.0, "baseline", "baseline", noise_sigma=0.0014),
        ResultRow("base001", 1.002, 2.0, "baseline", "baseline", noise_sigma=0.0014),
        ResultRow("k000001", 0.990, 2.1, "keep", "MATRIX_LR 0.04 -> 0.06", noise_sigma=0.0014),
        ResultRow("d000001", 0.995, 2.1, "discard", "SEED 42 -> 137", noise_sigma=0.0014),
        ResultRow("c000001", 0.0, 0.0, "crash", "DEPTH 8 -> 40", reason="out of memory", noise_sigma=0.0014),
        ResultRow("k000002", 0.980, 2.3, "keep", "WARMDOWN_RATIO 0.5 -> 0.7", noise_sigma=0.0014),
        ResultRow("r000001", 0.0, 0.0, "rejected", "edit harness", reason="changed harness/scoring/evaluate.py"),
        ResultRow("d000002", 0.985, 2.2, "discard", "DEPTH 8 -> 9", noise_sigma=0.0014),
        ResultRow("c000002", 0.0, 0.0, "crash", "DEPTH 8 -> 40 again", reason="out of memory", noise_sigma=0.0014),
    ):
        append_row(path, row)


def test_report_numbers_on_a_session_file(tmp_path: Path):
    path = tmp_path / "results.tsv"
    write_session(path)
    report = ResultsReport.from_rows(read_rows(path))
    assert (report.experiments, report.baseline_runs, report.kept, report.discarded, report.crashed,
            report.rejected) == (7, 2, 2, 2, 2, 1)
    assert report.kept_rate == pytest.approx(0.5)
    assert report.baseline_bpb == pytest.approx(1.001)
    assert report.best_bpb == pytest.approx(0.980)
    assert (report.best_commit, report.best_description) == ("k000002", "WARMDOWN_RATIO 0.5 -> 0.7")
    assert report.improvement == pytest.approx(0.021)
    assert report.improvement_pct == pytest.approx(100 * 0.021 / 1.001)
    assert report.noise_sigma == pytest.approx(0.0014)
    assert [(g.index, g.commit) for g in report.gains] == [(3, "k000001"), (6, "k000002")]
    assert [g.delta for g in report.gains] == pytest.approx([-0.011, -0.010])
    assert report.crashes_by_reason == {"out of memory": 2}


def test_report_on_an_upstream_file_matches_the_analysis_notebook(tmp_path: Path):
    path = tmp_path / "results.tsv"
    path.write_text(UPSTREAM)
    report = ResultsReport.from_rows(read_rows(path))
    # Notebook: baseline = first row; kept counts it; keep rate = kept / (kept + discarded).
    assert (report.experiments, report.kept, report.discarded, report.crashed) == (6, 3, 1, 2)
    assert report.kept_rate == pytest.approx(3 / 4)
    assert report.baseline_bpb == pytest.approx(0.9979) and report.best_bpb == pytest.approx(0.991)
    assert [g.description for g in report.gains] == ["halve batch 524K to 262K", "warmdown 0.5 -> 0.7"]
    assert [g.delta for g in report.gains] == pytest.approx([-0.0047, -0.0022])
    assert report.noise_sigma is None
    assert report.crashes_by_reason == {"(no reason recorded)": 2}


def test_running_best_moves_only_on_kept_rows(tmp_path: Path):
    path = tmp_path / "results.tsv"
    write_session(path)
    assert running_best(read_rows(path)) == pytest.approx(
        [1.001, 1.001, 0.99, 0.99, 0.99, 0.98, 0.98, 0.98, 0.98])


# -- the command ----------------------------------------------------------------------------------

runner = CliRunner()


def test_results_table_and_summary(tmp_path: Path):
    path = tmp_path / "results.tsv"
    write_session(path)
    result = runner.invoke(app, ["results", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    text = result.stdout
    for expected in ("MATRIX_LR 0.04 -> 0.06", "SEED 42 -> 137", "out of memory", "7 experiments (+2 baseline runs)",
                     "kept 2, discarded 2, crashed 2, rejected 1", "kept rate: 50.0%",
                     "baseline 1.001000 -> best 0.980000", "Gains by change", "-0.011000"):
        assert expected in text, expected
    # Chronological by default.
    assert text.index("MATRIX_LR 0.04") < text.index("SEED 42") < text.index("DEPTH 8 -> 9")


def test_results_top_sorts_by_val_bpb_and_kept_only_filters(tmp_path: Path):
    path = tmp_path / "results.tsv"
    write_session(path)
    top = runner.invoke(app, ["results", str(path), "--top", "2"], env={"COLUMNS": "200"})
    assert top.exit_code == 0, top.output
    table = top.stdout.split("experiments")[0]
    assert table.index("WARMDOWN_RATIO 0.5 -> 0.7") < table.index("DEPTH 8 -> 9")
    assert "MATRIX_LR" not in table and "SEED 42" not in table

    kept = runner.invoke(app, ["results", str(path), "--kept-only"], env={"COLUMNS": "200"})
    table = kept.stdout.split("experiments")[0]
    assert "MATRIX_LR 0.04 -> 0.06" in table and "WARMDOWN_RATIO" in table
    assert "SEED 42" not in table and "DEPTH 8 -> 9" not in table and "baseline" not in table.split("rows)")[1]


def test_results_json_is_one_object(tmp_path: Path):
    path = tmp_path / "results.tsv"
    write_session(path)
    result = runner.invoke(app, ["results", str(path), "--json", "--kept-only", "--top", "1"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [r["commit"] for r in data["rows"]] == ["k000002"]
    assert data["rows"][0]["index"] == 6
    assert data["summary"]["best_bpb"] == pytest.approx(0.98)
    assert data["summary"]["kept"] == 2 and data["summary"]["experiments"] == 7
    assert data["summary"]["gains"][0]["description"] == "MATRIX_LR 0.04 -> 0.06"


def test_results_reads_upstream_files_and_defaults_to_the_repository_file(tmp_path: Path):
    (tmp_path / "results.tsv").write_text(UPSTREAM)
    result = runner.invoke(app, ["results", "--json"], env={"AUTORESEARCH_ROOT": str(tmp_path)})
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert len(data["rows"]) == 6 and data["summary"]["kept"] == 3


def test_results_on_a_missing_file_says_what_to_do(tmp_path: Path):
    result = runner.invoke(app, ["results", str(tmp_path / "nope.tsv")])
    message = " ".join(result.stderr.split())  # rich wraps long lines
    assert result.exit_code == 1
    assert "no results file" in message and "autoresearch try" in message


def test_plot_writes_a_real_png(tmp_path: Path):
    path = tmp_path / "results.tsv"
    write_session(path)
    png = tmp_path / "out" / "progress.png"
    result = runner.invoke(app, ["results", str(path), "--plot", str(png), "--json"])
    assert result.exit_code == 0, result.output
    json.loads(result.stdout)  # the plot's message goes to stderr, stdout stays one JSON object
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000


def test_plot_of_an_upstream_file_and_of_an_unscored_file(tmp_path: Path):
    upstream = tmp_path / "upstream.tsv"
    upstream.write_text(UPSTREAM)
    png = tmp_path / "upstream.png"
    assert runner.invoke(app, ["results", str(upstream), "--plot", str(png)]).exit_code == 0
    assert png.read_bytes()[:4] == b"\x89PNG"

    crashed = tmp_path / "crashed.tsv"
    append_row(crashed, ResultRow("c1", 0, 0, "crash", "boom", reason="SyntaxError"))
    result = runner.invoke(app, ["results", str(crashed), "--plot", str(tmp_path / "none.png")])
    assert result.exit_code == 1 and "nothing to plot" in result.stderr
    assert not (tmp_path / "none.png").exists()


# -- broken files: warned about by line, counted, or refused --------------------------------------

def results_cli(path: Path, *args: str) -> subprocess.CompletedProcess:
    """`autoresearch results PATH ...` in a real subprocess, as a user runs it."""
    return cli(path.parent, "results", str(path), *args, timeout=120)


def flat(text: str) -> str:
    return " ".join(text.split())  # messages may be wrapped off a terminal


BROKEN = (
    "commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
    "a1b2c3d\t0.990000\t44.0\tkeep\tbaseline\n"
    "this line lost its tabs\n"
    "b2c3d4e\tnot-a-number\t44.0\tkeep\tscore garbled\n"
    "c3d4e5f\t0.500000\t44.0\timproved\tstatus nobody knows\n"
    "\n"
    "d4e5f6a\t0.995000\tlots\tdiscard\tmemory garbled\n"
    "e5f6a7b\t0.980000\t44.1\tkeep\twarmdown 0.5 -> 0.7\n"
)


def test_results_warns_about_each_malformed_line_by_number_and_counts_the_skipped(tmp_path: Path):
    path = tmp_path / "results.tsv"
    path.write_text(BROKEN)
    done = results_cli(path)
    assert done.returncode == 0, done.stderr
    warnings = flat(done.stderr)
    assert "line 3: 1 column(s) where the header has 5; skipped" in warnings
    assert "line 4: val_bpb 'not-a-number' of a keep row is not a positive number; skipped" in warnings
    assert "line 5: unknown status 'improved'" in warnings
    assert "line 7: memory_gb 'lots' is not a number; left empty" in warnings
    assert "line 6" not in warnings  # a blank line is not a problem
    assert "3 line(s) of the file skipped" in done.stdout
    # Neither the garbled score nor the unknown status counts: the baseline is line 2, the best line 8.
    assert "3 experiments, kept 2, discarded 1" in done.stdout
    assert "baseline 0.990000 -> best 0.980000" in done.stdout

    data = json.loads(results_cli(path, "--json").stdout)
    assert data["skipped_lines"] == 3
    assert [(p["line"], p["skipped"]) for p in data["problems"]] == [(3, True), (4, True), (5, True), (7, False)]
    assert [r["line"] for r in data["rows"]] == [2, 7, 8]
    assert data["summary"]["best_bpb"] == pytest.approx(0.98) and data["summary"]["kept"] == 2


def test_results_refuses_a_binary_file(tmp_path: Path):
    path = tmp_path / "results.tsv"
    path.write_bytes(bytes(range(256)) * 40)
    done = results_cli(path)
    assert done.returncode == 1 and done.stdout == ""
    assert "is a binary file, not a results table" in flat(done.stderr)


@pytest.mark.parametrize("text, expected", [
    ("commit,val_bpb,memory_gb,status,description\na1,0.99,44.0,keep,baseline\n", "no header line"),
    ("just some notes\nabout a run\n", "no header line"),
    ("commit\tstatus\na1\tkeep\n", "without the column(s) val_bpb, memory_gb, description"),
])
def test_results_refuses_a_text_file_that_is_not_a_results_table(tmp_path: Path, text: str, expected: str):
    path = tmp_path / "results.tsv"
    path.write_text(text)
    done = results_cli(path)
    assert done.returncode == 1 and done.stdout == ""
    assert expected in flat(done.stderr)


def test_results_reads_upstream_and_full_files_without_a_warning(tmp_path: Path):
    upstream = tmp_path / "upstream" / "results.tsv"
    upstream.parent.mkdir()
    upstream.write_text(UPSTREAM)
    done = results_cli(upstream)
    assert done.returncode == 0 and done.stderr == ""
    assert "6 experiments, kept 3, discarded 1, crashed 2" in done.stdout

    ours = tmp_path / "ours" / "results.tsv"
    write_session(ours)
    done = results_cli(ours)
    assert done.returncode == 0 and done.stderr == ""
    assert "7 experiments (+2 baseline runs)" in done.stdout


def test_columns_are_found_by_name_and_unknown_ones_kept(tmp_path: Path):
    """Reordered columns, and columns added after this code was written, read without a warning."""
    path = tmp_path / "results.tsv"
    path.write_text("status\tcommit\tholdout_bpb\tdescription\tmemory_gb\tval_bpb\tnum_steps\n"
                    "keep\ta1b2c3d\t1.012\tbaseline\t44.0\t0.990000\t953\n"
                    "discard\tb2c3d4e\t\tdepth 9\t44.2\t0.995000\t900\n")
    table = read_results(path)
    assert table.problems == []
    assert [(r.commit, r.val_bpb, r.num_steps) for r in table.rows] == [("a1b2c3d", 0.99, 953), ("b2c3d4e", 0.995, 900)]
    assert [table.value(i, "holdout_bpb") for i in range(2)] == ["1.012", ""]
    done = results_cli(path)
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_a_torn_last_line_is_named_and_many_problems_are_capped(tmp_path: Path):
    path = tmp_path / "results.tsv"
    write_session(path)
    with open(path, "a") as f:
        f.write("ccccccc\t0.98\t37.2\tkee")
    done = results_cli(path)
    assert done.returncode == 0
    assert "line 11: incomplete last line (a write was interrupted); skipped" in flat(done.stderr)

    noisy = tmp_path / "noisy.tsv"
    noisy.write_text(UPSTREAM + "\n" + "garbage\n" * 50)
    done = results_cli(noisy)
    warnings = flat(done.stderr)
    assert done.returncode == 0 and warnings.count("column(s) where the header has 5") == 20
    assert "... and 30 more problem line(s)" in warnings
    assert "50 line(s) of the file skipped" in done.stdout


# -- the plot: nothing on it may mislead ----------------------------------------------------------

def svg_text(path: Path) -> str:
    """The text of an SVG written with its text kept as text (plot_progress does so)."""
    return html.unescape(" ".join(re.findall(r"<text[^>]*>([^<]*)</text>", path.read_text())))


def outlier_session(path: Path) -> None:
    """write_session plus two diverged runs far above the chart's range."""
    write_session(path)
    append_row(path, ResultRow("d000003", 1.450, 2.1, "discard", "LR x10", noise_sigma=0.0014))
    append_row(path, ResultRow("d000004", 2.300, 2.2, "discard", "no warmup", noise_sigma=0.0014))


def test_the_plot_title_does_not_count_the_baseline_as_an_improvement(tmp_path: Path):
    upstream = tmp_path / "results.tsv"
    upstream.write_text(UPSTREAM)  # its first row, the baseline, is logged `keep`
    svg = tmp_path / "progress.svg"
    done = results_cli(upstream, "--plot", str(svg))
    assert done.returncode == 0, done.stderr
    text = svg_text(svg)
    assert "6 experiments incl. the baseline, 2 kept improvements over the baseline" in text
    assert "Baseline (1)" in text and "Kept (2)" in text  # the baseline row is drawn as the baseline


def test_off_scale_scores_are_marked_valued_counted_and_in_the_legend(tmp_path: Path):
    path = tmp_path / "results.tsv"
    outlier_session(path)
    svg = tmp_path / "progress.svg"
    done = results_cli(path, "--plot", str(svg))
    assert done.returncode == 0, done.stderr
    assert "2 score(s) outside the y-range drawn on its edge with their value" in done.stderr
    text = svg_text(svg)
    assert "Off scale (2 above the y-range):" in text and "1.4500" in text and "2.3000" in text
    assert "Discarded (4)" in text  # the two off-scale runs are counted with the rest


def test_crashes_sit_in_their_own_strip_never_among_the_scores(tmp_path: Path):
    path = tmp_path / "results.tsv"
    outlier_session(path)
    svg = tmp_path / "progress.svg"
    done = results_cli(path, "--plot", str(svg))
    assert "3 run(s) without a score in the strip below" in done.stderr
    text = svg_text(svg)
    assert "Crashed (2): no score, strip below" in text and "Rejected (1): no score, strip below" in text
    assert "no score" in text.replace("strip below", "")  # the strip's own label

    import matplotlib.pyplot as plt

    rows = read_rows(path)
    fig, facts = progress_figure(rows)
    try:
        scores, strip = fig.axes
        unscored = [i + 1 for i, r in enumerate(rows) if r.status in ("crash", "rejected")]
        assert facts.unscored == unscored == [5, 7, 9]
        on_scores = {round(x) for c in scores.collections for x, _ in c.get_offsets()}
        on_strip = {round(x) for c in strip.collections for x, _ in c.get_offsets()}
        assert on_strip == set(unscored) and not on_scores & set(unscored)
        assert facts.off_scale == [(10, 1.45), (11, 2.3)]
        low, high = facts.y_range
        assert all(low <= r.val_bpb <= high for r in rows if r.scored and r.val_bpb < 1.1)
    finally:
        plt.close(fig)
