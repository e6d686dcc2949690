"""Per-step metrics and the optional tracker: the harness writes each run's training curve, and with
AUTORESEARCH_TRACK=trackio every experiment lands in a local trackio project (a real trackio, its
SQLite store in a temporary TRACKIO_DIR), while stdout keeps only the verdict line."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from ratchet_helpers import TAG, cli, ledger, started_session, set_constant

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def session(test_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return started_session(tmp_path_factory.mktemp("tracking") / "repo", "--repeats", "1", TIME_BUDGET="2",
                           WARMUP_ALLOWANCE="4")


def test_each_experiment_keeps_its_curve_and_the_tracker_logs_it_while_stdout_stays_one_line(session, tmp_path):
    pytest.importorskip("trackio", reason="the [track] extra is not installed")
    store = tmp_path / "trackio"
    set_constant(session, "SMOOTHING", 3.0)
    result = cli(session, "try", "-m", "smoothing 3", AUTORESEARCH_TRACK="trackio", TRACKIO_DIR=str(store))
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 1 and result.stdout.split()[0] in ("keep", "discard")
    assert "logged" in result.stderr and "to trackio" in result.stderr

    row = ledger(session)[-1]
    curves = sorted((session / ".git" / "autoresearch" / "sessions" / TAG / "runs").glob(f"*{row.commit}*/curve.jsonl"))
    assert curves, "no training curve for the experiment"
    first = curves[0].read_text().splitlines()[0]
    assert all(key in first for key in ('"step"', '"loss"', '"tokens_per_sec"', '"lrm"'))

    database = store / f"autoresearch-{TAG}.db"
    assert database.is_file(), sorted(p.name for p in store.iterdir())
    with sqlite3.connect(database) as db:
        tables = {name for (name,) in db.execute("select name from sqlite_master where type='table'")}
        assert "metrics" in tables
        logged = " ".join(value.decode() if isinstance(value, bytes) else str(value)
                          for row in db.execute("select * from metrics") for value in row)
    assert '"loss"' in logged and '"val_bpb"' in logged, logged[:2000]


def test_an_unknown_tracker_is_named_before_anything_runs(session):
    result = cli(session, "try", "-m", "nothing changed", AUTORESEARCH_TRACK="wandb")
    assert "AUTORESEARCH_TRACK='wandb': the trackers are trackio; experiments are not tracked" in result.stderr
