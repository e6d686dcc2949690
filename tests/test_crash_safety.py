"""`kill -9` at chosen moments, then `autoresearch session resume`: no row lost or doubled, git on
the best commit or the candidate, never half-reverted, the interrupted experiment recorded.

The process kills itself with SIGKILL where `AUTORESEARCH_TEST_KILL_AT` names a point: `training`
(while the trainer runs), `committed` (candidate committed, not yet run), `decided` (verdict
journaled, git not yet moved) and `reverted` (git moved, row not yet appended). Runs use the tiny
numpy trainer of ratchet_helpers.py (the real harness contract, seconds per run).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.processes import process_running
from loop.results import PRIVATE_COLUMNS, RESULT_COLUMNS, without_private_columns
from ratchet_helpers import (TAG, TRAINER, assert_clean_on_branch, best_commit, cli, cli_env, edit, git,
                             ledger, make_repo, session_paths, set_constant)

KILLED = -signal.SIGKILL


@pytest.fixture(scope="module")
def session(test_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session whose start was killed during its first baseline run, then resumed."""
    root = make_repo(tmp_path_factory.mktemp("crash-safety") / "repo", TIME_BUDGET="1")
    killed = cli(root, "session", "start", TAG, "--timeout", "10", AUTORESEARCH_TEST_KILL_AT="training")
    assert killed.returncode == KILLED, killed.stderr
    resumed = cli(root, "session", "resume")
    assert resumed.returncode == 0, resumed.stderr
    return root


def journal(root: Path) -> dict | None:
    path = session_paths(root).journal
    return json.loads(path.read_text()) if path.exists() else None


def assert_whole_rows(root: Path) -> None:
    public = [c for c in RESULT_COLUMNS if c not in PRIVATE_COLUMNS]
    for path, columns in ((session_paths(root).ledger, RESULT_COLUMNS), (root / "results.tsv", public)):
        text = path.read_text()
        assert text.endswith("\n")
        assert all(len(line.split("\t")) == len(columns) for line in text.splitlines())
    assert (root / "results.tsv").read_text() == without_private_columns(session_paths(root).ledger.read_text())


def marked_processes(marker: str) -> list[int]:
    """Live processes carrying an experiment's marker in their environment (Linux)."""
    needle = f"AUTORESEARCH_EXPERIMENT={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and needle in (entry / "environ").read_bytes().split(b"\0"):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_a_start_killed_during_the_baseline_is_finished_by_resume(session):
    rows = ledger(session)
    assert [r.status for r in rows] == ["baseline", "baseline"]
    assert journal(session) is None
    assert_clean_on_branch(session)
    assert_whole_rows(session)


def test_killed_after_the_commit_the_experiment_is_recorded_as_interrupted(session):
    before, best = ledger(session), best_commit(session)
    set_constant(session, "SMOOTHING", 3.0)
    killed = cli(session, "try", "-m", "smoothing 3", AUTORESEARCH_TEST_KILL_AT="committed")
    assert killed.returncode == KILLED
    candidate = best_commit(session)
    assert candidate != best and journal(session)["phase"] == "run"

    resumed = cli(session, "session", "resume")
    assert resumed.returncode == 0, resumed.stderr
    rows = ledger(session)
    assert rows[:-1] == before
    assert rows[-1].status == "crash" and rows[-1].reason.startswith("interrupted")
    assert rows[-1].commit == candidate[:7]
    assert best_commit(session) == best and journal(session) is None
    assert_clean_on_branch(session)
    assert_whole_rows(session)

    # An interrupted experiment was never scored: the same trainer may be tried again.
    set_constant(session, "SMOOTHING", 3.0)
    again = cli(session, "try", "-m", "smoothing 3, again")
    assert again.stdout.split()[0] in ("keep", "discard") and "reused_from" not in again.stdout


def test_killed_while_training_the_orphaned_trainer_is_stopped_by_resume(session):
    before, best = ledger(session), best_commit(session)
    edit(session, "    ctx = load_context()", "    ctx = load_context()\n    import time; time.sleep(600)")
    killed = cli(session, "try", "-m", "slow start", AUTORESEARCH_TEST_KILL_AT="training")
    assert killed.returncode == KILLED
    entry = journal(session)
    marker, trainer = entry["marker"], entry["trainer_pid"]  # the pid: how resume finds it on any OS
    assert process_running(trainer), "the trainer should still be running after its parent died"
    on_linux = sys.platform.startswith("linux")
    if on_linux:  # there the marker in its environment finds it too (and workers that left its group)
        assert trainer in marked_processes(marker)

    resumed = cli(session, "session", "resume")
    assert resumed.returncode == 0, resumed.stderr
    assert not process_running(trainer)
    if on_linux:
        assert marked_processes(marker) == []
    rows = ledger(session)
    assert rows[:-1] == before and rows[-1].status == "crash" and rows[-1].reason.startswith("interrupted")
    assert best_commit(session) == best
    assert_clean_on_branch(session)


def test_killed_while_reverting_a_crash_resume_finishes_the_revert(session):
    before, best = ledger(session), best_commit(session)
    edit(session, "    ctx = load_context()", "    raise RuntimeError('broken idea')")
    killed = cli(session, "try", "-m", "broken", AUTORESEARCH_TEST_KILL_AT="decided")
    assert killed.returncode == KILLED
    assert best_commit(session) != best  # still on the candidate: the revert had not begun

    assert cli(session, "session", "resume").returncode == 0
    rows = ledger(session)
    assert rows[:-1] == before
    assert rows[-1].status == "crash" and "RuntimeError: broken idea" in rows[-1].reason  # the real verdict
    assert best_commit(session) == best
    assert_clean_on_branch(session)


def test_killed_before_the_row_was_appended_resume_appends_it_once(session):
    before, best = ledger(session), best_commit(session)
    set_constant(session, "SMOOTHING", 100000.0)
    killed = cli(session, "try", "-m", "huge smoothing", AUTORESEARCH_TEST_KILL_AT="reverted")
    assert killed.returncode == KILLED
    assert best_commit(session) == best and ledger(session) == before  # reverted, not yet logged

    assert cli(session, "session", "resume").returncode == 0
    second = cli(session, "session", "resume")
    assert "nothing was in flight" in second.stderr
    rows = ledger(session)
    assert rows[:-1] == before and rows[-1].status == "discard" and rows[-1].description == "huge smoothing"
    assert_clean_on_branch(session)
    assert_whole_rows(session)


def test_killed_while_keeping_resume_lands_on_the_candidate(session):
    before = ledger(session)
    set_constant(session, "LOGIT_SCALE", 1.0)
    killed = cli(session, "try", "-m", "LOGIT_SCALE 1.0", AUTORESEARCH_TEST_KILL_AT="decided")
    assert killed.returncode == KILLED
    candidate = best_commit(session)

    assert cli(session, "session", "resume").returncode == 0
    rows = ledger(session)
    assert rows[:-1] == before and rows[-1].status == "keep" and rows[-1].commit == candidate[:7]
    assert best_commit(session) == candidate
    assert_clean_on_branch(session)


def test_a_killed_loop_is_continued_by_resume(session):
    before = ledger(session)
    killed = cli(session, "loop", "--agent", "mutate", "--max", "2", "--seed", "3",
                 AUTORESEARCH_TEST_KILL_AT="training")
    assert killed.returncode == KILLED

    resumed = cli(session, "session", "resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "continuing the loop" in resumed.stderr
    rows = ledger(session)
    assert rows[:len(before)] == before
    assert rows[len(before)].reason.startswith("interrupted")
    assert len(rows) == len(before) + 3  # the interrupted iteration, then the two of --max 2
    assert len(resumed.stdout.splitlines()) == 2
    state = json.loads(session_paths(session).loop_state.read_text())
    assert state["state"] == "finished" and state["done"] == 2
    assert git(session, "log", "-1", "--format=%H") == best_commit(session)
    assert_clean_on_branch(session)
    assert_whole_rows(session)
    for row in rows[len(before):]:  # each candidate changed the trainer and nothing else
        assert git(session, "show", "--name-only", "--format=", row.commit) == TRAINER


SLOW_AGENT = """
from pathlib import Path

trainer = Path("backends/cuda/train.py")
text = trainer.read_text().replace("    ctx = load_context()", "    ctx = load_context()\\n    import time; time.sleep(600)", 1)
trainer.write_text(text)
print("slow start")
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a process is a POSIX signal")
def test_ctrl_c_stops_the_loop_cleanly_and_resume_does_not_restart_it(session, tmp_path):
    agent = tmp_path / "slow_agent.py"
    agent.write_text(SLOW_AGENT)
    before, best = ledger(session), best_commit(session)
    loop = subprocess.Popen([sys.executable, "-m", "autoresearch", "loop", "--agent", f'"{sys.executable}" "{agent}"',
                             "--max", "5"], cwd=session, env=cli_env(session), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while (journal(session) or {}).get("phase") != "run" and time.monotonic() < deadline:
        time.sleep(0.1)
    marker = journal(session)["marker"]
    time.sleep(1.0)  # the trainer is asleep in its first lines
    loop.send_signal(signal.SIGINT)
    _, stderr = loop.communicate(timeout=60)
    assert loop.returncode == 130, stderr

    rows = ledger(session)
    assert rows[:-1] == before
    assert rows[-1].status == "crash" and rows[-1].reason.startswith("interrupted")
    assert rows[-1].description == "slow start"
    assert journal(session) is None and marked_processes(marker) == []
    assert best_commit(session) == best
    assert_clean_on_branch(session)
    assert json.loads(session_paths(session).loop_state.read_text())["state"] == "stopped"

    resumed = cli(session, "session", "resume")
    assert resumed.returncode == 0
    assert "nothing was in flight" in resumed.stderr and "continuing the loop" not in resumed.stderr
    assert ledger(session) == rows
