"""`autoresearch report`: the morning page of a session, built from a real session (real git, real
runs of the fast fake trainer) through the real CLI, and looked at in a real headless Chromium."""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from harness.config import EvaluatorConstants, RunConfig
from loop.results import RESULT_COLUMNS, ResultRow, read_results
from loop.session import SessionConfig, SessionPaths, save_session_config
from ratchet_helpers import TAG, TRAINER, cli, edit, git, ledger, make_repo, session_paths, set_constant

CRASH = "    raise RuntimeError('simulated out of memory')\n    ctx = load_context()"


@pytest.fixture(scope="module")
def night(test_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short real session: 2 baseline runs, a kept change, a discarded one, two crashes with
    the same reason and a rejected change."""
    root = make_repo(tmp_path_factory.mktemp("report") / "repo", TIME_BUDGET="1")
    started = cli(root, "session", "start", TAG, "--timeout", "30")
    assert started.returncode == 0, started.stderr

    def attempt(message: str, expected: str) -> None:
        done = cli(root, "try", "-m", message)
        assert done.returncode == 0 and done.stdout.startswith(expected), done.stdout + done.stderr

    set_constant(root, "LOGIT_SCALE", 1.0)
    attempt("LOGIT_SCALE 0.5 -> 1.0", "keep")
    set_constant(root, "SEED", 43)
    attempt("SEED 42 -> 43", "discard")
    edit(root, "    ctx = load_context()", CRASH)
    attempt("allocate everything", "crash")
    edit(root, "    ctx = load_context()", CRASH)
    set_constant(root, "SMOOTHING", 3.0)
    attempt("allocate everything, smoother", "crash")
    (root / "program.md").write_text((root / "program.md").read_text() + "\n# be bolder\n")
    set_constant(root, "SMOOTHING", 2.0)
    attempt("edit the program", "rejected")
    return root


def report_of(root: Path, *args: str) -> tuple[subprocess.CompletedProcess, str]:
    done = cli(root, "report", *args, timeout=120)
    assert done.returncode == 0, done.stderr
    return done, Path(done.stdout.strip()).read_text(encoding="utf-8")


def text_of(page: str) -> str:
    """The page's visible text, roughly: tags dropped, entities decoded, whitespace folded."""
    page = re.sub(r'src="data:[^"]*"', "", page)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page)).split())


def test_report_of_a_real_session(night: Path, tmp_path: Path):
    out = tmp_path / "night.html"
    done, page = report_of(night, "--out", str(out))
    assert done.stdout.strip() == str(out)
    assert "wrote the report of session t: 5 experiments, 1 kept, 2 crashed" in " ".join(done.stderr.split())
    rows = ledger(night)
    kept = next(r for r in rows if r.status == "keep")
    baseline = sum(r.val_bpb for r in rows if r.status == "baseline") / 2
    text = text_of(page)

    # The plot, embedded: a PNG in a data: URL, nothing fetched from anywhere.
    match = re.search(r'<img class="plot"[^>]* src="data:image/png;base64,([^"]+)"', page)
    assert match and base64.b64decode(match.group(1))[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r'(src|href)="(https?:)?//', page)

    # The kept change: its commit, gain and the trainer's diff against its parent, nothing else.
    assert f"{kept.val_bpb - baseline:+.6f} #3 {kept.commit} LOGIT_SCALE 0.5 -> 1.0" in text
    assert "-LOGIT_SCALE = 0.5" in text and "+LOGIT_SCALE = 1.0" in text
    assert re.findall(r"diff --git a/(\S+)", text) == [TRAINER]

    # Crashes grouped by their reason, each with the end of its log; the rejection apart.
    crashes = [r for r in rows if r.status == "crash"]
    assert crashes[0].reason == crashes[1].reason and "simulated out of memory" in crashes[0].reason
    assert f"2 × crashed: {crashes[0].reason} #5 {crashes[0].commit} allocate everything" in text
    assert page.count("end of its log") == 2 and "RuntimeError: simulated out of memory" in text
    assert "1 × rejected:" in text and "program.md" in text

    # The noise floor, the holdout (as far as the ledger records one), throughput and cost.
    sigma = rows[-1].noise_sigma
    assert f"noise σ (run-to-run spread) {sigma:.6f}" in text
    assert f"noise floor {max(2 * sigma, 3e-4):.6f} = max(2σ, 0.0003)" in text
    table = read_results(session_paths(night).ledger)
    holdout = [table.value(i, "holdout_bpb") for i in range(len(rows))]
    if any(holdout):
        assert f"({sum(map(bool, holdout))} run(s) recorded a holdout_bpb)" in text
    else:
        assert "Holdout check: no holdout recorded." in text
    assert re.search(r"experiments per hour \d+\.\d\d", text)
    timed = [r.seconds for r in rows if r.seconds is not None]
    shown = re.search(rf"device hours \(CPU\) \d\.\d{{4}} h \((\d+) s\) over {len(timed)} timed run\(s\)", text)
    assert shown and abs(int(shown.group(1)) - sum(timed)) <= 1
    assert "energy not recorded" in text and "mean power not recorded" in text


def test_report_defaults_to_the_session_folder_and_leaves_the_tree_clean(night: Path):
    done, page = report_of(night)
    assert Path(done.stdout.strip()) == session_paths(night).directory / "report.html"
    assert git(night, "status", "--porcelain") == ""

    as_json = cli(night, "report", "--json")
    data = json.loads(as_json.stdout)
    assert data["tag"] == TAG and [k["description"] for k in data["kept"]] == ["LOGIT_SCALE 0.5 -> 1.0"]
    assert data["path"] == done.stdout.strip() and data["summary"]["crashed"] == 2


def test_report_without_a_session_says_what_to_do(tmp_path: Path):
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q")
    done = cli(root, "report")
    assert done.returncode == 1
    assert "no session in" in done.stderr and "autoresearch session start TAG" in " ".join(done.stderr.split())

    hand_made_session(tmp_path / "other", None)
    done = cli(tmp_path / "other", "report", "--tag", "nope")
    assert done.returncode == 1 and "session 'nope' has no results" in done.stderr
    assert "sessions with results here: h" in done.stderr


# -- columns the ledger gains later: holdout and energy --------------------------------------------

def hand_made_session(root: Path, holdout: list[str] | None, extra_line: str = "") -> None:
    """A real git repository with a session whose ledger has holdout and energy columns (none
    of them when `holdout` is None)."""
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.email", "test@example.com")
    git(root, "config", "user.name", "test")
    trainer = root / TRAINER
    trainer.parent.mkdir(parents=True)
    trainer.write_text("DEPTH = 8\nLR = 0.04\n")
    (root / "README.md").write_text("x\n")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "start")
    base = git(root, "rev-parse", "HEAD")
    trainer.write_text("DEPTH = 8\nLR = 0.06\n")
    (root / "README.md").write_text("y\n")  # same commit, another file: not in the report's diff
    git(root, "commit", "-qam", "LR 0.04 -> 0.06")
    kept = git(root, "rev-parse", "--short=7", "HEAD")

    paths = SessionPaths.of(root, "h")
    evaluator = EvaluatorConstants(MAX_SEQ_LEN=256, EVAL_TOKENS=8192, TIME_BUDGET=300, VOCAB_SIZE=4096,
                                   DATA_SOURCE="builtin", EVAL_BATCH_SIZE=32, BASELINE_REPEATS=2)
    run = RunConfig(backend="cuda", device="cuda", preset="h100", evaluator=evaluator, data_dir="d",
                    tokenizer_dir="t", tokens_dir="k", unigram_bpb=2.7)
    save_session_config(SessionConfig(tag="h", branch="autoresearch/h", backend="cuda", preset="h100", rule="noise",
                                      z=2.0, min_floor=3e-4, repeats=2, timeout=900, trainer=TRAINER,
                                      base_commit=base, run=run, created="2026-03-05T00:00:00Z"), paths)
    rows = [ResultRow(base[:7], 1.000, 40.0, "baseline", "baseline", timestamp="2026-03-05T00:05:00Z", seconds=300,
                      device="cuda", noise_sigma=0.001),
            ResultRow(base[:7], 1.002, 40.0, "baseline", "baseline", timestamp="2026-03-05T00:10:00Z", seconds=300,
                      device="cuda", noise_sigma=0.001),
            ResultRow(kept, 0.990, 41.0, "keep", "LR 0.04 -> 0.06", timestamp="2026-03-05T00:15:00Z", seconds=300,
                      device="cuda", noise_sigma=0.001),
            ResultRow("c0ffee0", 0.0, 0.0, "crash", "DEPTH 8 -> 40", timestamp="2026-03-05T01:00:00Z", seconds=60,
                      device="cuda", reason="out of memory", noise_sigma=0.001)]
    energy = [("108000", "360"), ("108000", "360"), ("120000", "400"), ("", "")]
    later = ("holdout_bpb", "energy_j", "mean_watts") if holdout is not None else ()
    columns = tuple(dict.fromkeys(RESULT_COLUMNS + later))
    lines = ["\t".join(columns)]
    for row, held, (joules, watts) in zip(rows, holdout or [""] * len(rows), energy):
        cells = dict(row.cells(), **dict(zip(later, (held, joules, watts))))
        lines.append("\t".join(cells.get(name, "") for name in columns))
    paths.ledger.write_text("\n".join(lines) + "\n" + extra_line)


@pytest.mark.parametrize("holdout, verdict", [
    (["1.010000", "1.012000", "1.002000", ""], "the validation gain holds on the holdout"),
    (["1.010000", "1.012000", "1.013000", ""], "the validation gain does not hold on the holdout"),
])
def test_report_reads_holdout_and_energy_columns_by_name(tmp_path: Path, holdout: list[str], verdict: str):
    root = tmp_path / "repo"
    hand_made_session(root, holdout, extra_line="garbage without tabs\n")
    done, page = report_of(root, "--out", str(tmp_path / "h.html"))
    text = text_of(page)
    holdout_gain = 1.011 - float(holdout[2])
    assert f"holdout 1.011000 {holdout[2]} {holdout_gain:.6f}" in text
    assert f"validation 1.001000 0.990000 {0.011:.6f}" in text
    assert f"Holdout check: {verdict}" in text and "(3 run(s) recorded a holdout_bpb)" in text
    # Energy: 336 kJ = 0.0933 kWh; power weighted by run time; device time 960 s.
    assert "energy 0.093 kWh" in text and "mean power 373 W" in text
    assert "GPU-hours 0.27 h over 4 timed run(s)" in text
    assert "experiments per hour 2.00" in text  # 2 experiments (a keep, a crash) in one hour
    # The diff is the trainer's only, though the kept commit also changed README.md.
    assert "-LR = 0.04" in text and "+LR = 0.06" in text and "README" not in text
    assert "1 × crashed: out of memory #4 c0ffee0 DEPTH 8 -> 40" in text
    # The malformed line: warned about on stderr and listed on the page.
    assert "line 6: 1 column(s)" in " ".join(done.stderr.split())
    assert "Ledger problems" in text and "line 6: 1 column(s)" in text


def test_report_says_what_was_not_recorded(tmp_path: Path):
    root = tmp_path / "repo"
    hand_made_session(root, None)
    done, page = report_of(root, "--tag", "h", "--out", str(tmp_path / "h.html"))
    text = text_of(page)
    assert "Holdout check: no holdout recorded." in text
    assert "energy not recorded" in text and "mean power not recorded" in text
    assert "GPU-hours 0.27 h over 4 timed run(s)" in text and done.stderr.count("Warning") == 0


# -- in a real browser ------------------------------------------------------------------------------

def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(chromium() is None, reason="chromium is not installed (Debian: apt-get install chromium)")
def test_the_page_renders_in_headless_chromium(night: Path, tmp_path: Path):
    from PIL import Image

    page = tmp_path / "night.html"
    report_of(night, "--out", str(page))
    shot = tmp_path / "night.png"
    done = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2600",
                           f"--screenshot={shot}", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert shot.is_file(), done.stderr
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 2600)
    colours = {colour for _, colour in image.getcolors(maxcolors=1 << 20)}
    # The embedded plot was decoded (the running best's green, the kept marker's) and the
    # stylesheet applied (the diff's added and removed line backgrounds).
    for name, target in {"plot: running best": (0x27, 0xAE, 0x60), "plot: kept marker": (0x2E, 0xCC, 0x71),
                         "diff: added line": (0xE6, 0xFF, 0xEC), "diff: removed line": (0xFF, 0xEB, 0xE9)}.items():
        assert any(sum(abs(a - b) for a, b in zip(colour, target)) <= 12 for colour in colours), name
