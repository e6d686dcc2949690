"""Verdicts that don't mistake noise for progress, in a real short session (the fake unigram trainer):
a run on a machine that slowed down is void, not judged; runs, speeds and the pooled sigma are in
the ledger; the verdicts' cost is reported.

The slowdown is simulated where the runner reads the machine's speed (AUTORESEARCH_TEST_SLOWDOWN,
"K:candidate": the probe around candidate runs reads a machine K times slower), so the trainer and
its score are untouched: an unchanged trainer that would be discarded on fair footing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ratchet_helpers import assert_clean_on_branch, cli, ledger, started_session

from loop.noise import decode

pytestmark = pytest.mark.slow


RECHECK_EVERY = 2  # the steady session's --recheck-every (the default, 5, costs three more experiments)


def start(tmp_path_factory: pytest.TempPathFactory, max_drift: str, *options: str) -> Path:
    return started_session(tmp_path_factory.mktemp("noise") / "repo", "--repeats", "2", "--max-drift", max_drift,
                           *options, TIME_BUDGET="2", WARMUP_ALLOWANCE="4")


@pytest.fixture(scope="module")
def session(test_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return start(tmp_path_factory, "80")  # a fiftyfold slowdown (-98 %) is far past it


@pytest.fixture(scope="module")
def steady(test_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session that never voids: its verdicts do not hang on this machine's other jobs."""
    return start(tmp_path_factory, "0", "--recheck-every", str(RECHECK_EVERY))


def add_comment(root: Path, text: str) -> None:
    trainer = root / "backends" / "cuda" / "train.py"
    trainer.write_text(trainer.read_text() + f"# {text}\n")


def test_the_baseline_rows_carry_their_runs_and_the_machines_speed(session):
    rows = ledger(session)
    assert [r.status for r in rows] == ["baseline", "baseline"]
    for row in rows:
        assert decode(row.runs) == [pytest.approx(row.val_bpb, abs=1e-6)]
        assert decode(row.speed)[0] > 0 and decode(row.speed_after)[0] > 0
    assert rows[-1].sigma_dof == 1


def test_an_unchanged_trainer_on_a_slowed_machine_is_void_not_judged(session):
    add_comment(session, "a null change")
    result = cli(session, "try", "-m", "a comment", AUTORESEARCH_TEST_SLOWDOWN="50:candidate")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("void "), result.stdout
    assert "speed drifted" in result.stdout and "try it again later" in result.stdout
    row = ledger(session)[-1]
    assert row.status == "void" and row.voids == 3 and row.val_bpb == 0.0
    assert_clean_on_branch(session)

    # Not judged means not tried: the same change may be tried again (and is then never kept: on
    # fair footing it is discarded; on this machine's real drift it may be void again).
    add_comment(session, "a null change")
    result = cli(session, "try", "-m", "the comment again")
    assert result.returncode == 0, result.stderr
    assert "reused_from" not in result.stdout and result.stdout.split()[0] in ("discard", "void"), result.stdout


def test_a_real_gain_is_confirmed_by_a_second_run_and_every_repeat_pools_into_sigma(steady):
    session = steady
    trainer = session / "backends" / "cuda" / "train.py"
    trainer.write_text(trainer.read_text().replace("LOGIT_SCALE = 0.5", "LOGIT_SCALE = 1.0"))
    result = cli(session, "try", "-m", "LOGIT_SCALE 0.5 -> 1.0")
    assert result.stdout.startswith("keep "), result.stdout + result.stderr
    kept = ledger(session)[-1]
    assert len(decode(kept.runs)) == 2  # an apparent keep is confirmed before it is kept
    for i in range(RECHECK_EVERY + 1):  # after RECHECK_EVERY experiments against one incumbent, it is re-run
        add_comment(session, f"null change {i}")
        result = cli(session, "try", "-m", f"a comment on the new best ({i})")
        assert result.returncode == 0 and result.stdout.startswith("discard "), result.stdout
    rows = ledger(session, rechecks=True)
    rechecks = [r for r in rows if r.status == "recheck"]
    assert [r.trainer_sha for r in rechecks] == [kept.trainer_sha]
    # Every repeated measurement pools into sigma: the baseline's, the confirmation's, the re-check's.
    status = json.loads(cli(session, "session", "status", "--json").stdout)
    assert status["sigma_dof"] == 1 + 1 + 1 and status["recheck_every"] == RECHECK_EVERY
    cost = status["cost"]
    n = RECHECK_EVERY + 2
    assert cost["experiments"] == n and cost["runs_per_experiment"] == pytest.approx((2 + (n - 1) + 1) / n)
