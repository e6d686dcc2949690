"""A whole session with the reference trainer (backends/cuda/train.py on device cpu, the cpu-tiny
preset, the builtin corpus) in a real temporary git repository: the baseline, three iterations of
the built-in `mutate` proposer, and the trainer breakages that must end as `crash` with their
reason. One session serves every test, so the number of real training runs stays small."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from ratchet_helpers import TAG, TRAINER, assert_clean_on_branch, best_commit, cli, edit, git, ledger, make_repo

pytestmark = pytest.mark.slow


# A quarter of the preset's batch: the same trainer, a quarter of the work in its ten untimed steps.
SMALL_BATCH = {"DEVICE_BATCH_SIZE": 4, "TOTAL_BATCH_SIZE": 1024}


@pytest.fixture(scope="module")
def real_session(test_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_repo(tmp_path_factory.mktemp("real-session") / "repo", trainer_source=None,
                     constants=SMALL_BATCH, TIME_BUDGET="2")
    result = cli(root, "session", "start", TAG, "--repeats", "2", "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["baseline_runs"] and len(status["baseline_runs"]) == 2
    return root


def test_the_baseline_measures_the_noise_floor(real_session):
    rows = ledger(real_session)
    assert [r.status for r in rows] == ["baseline", "baseline"]
    values = [r.val_bpb for r in rows]
    assert all(1.0 < v < 4.0 for v in values)  # learned something, in bits per byte
    assert rows[-1].noise_sigma == pytest.approx(statistics.stdev(values), abs=2e-6)
    assert {r.preset for r in rows} == {"cpu-tiny"} and {r.backend for r in rows} == {"cuda"}


def test_three_mutate_iterations_agree_with_the_branch(real_session):
    root = real_session
    base = best_commit(root)
    result = cli(root, "loop", "--agent", "mutate", "--max", "3", "--seed", "11")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    rows = ledger(root)
    assert len(lines) == 3 and len(rows) == 5
    best, best_bpb = base, statistics.fmean(r.val_bpb for r in rows[:2])
    for line, row in zip(lines, rows[2:]):
        assert line.split()[0] == row.status and row.status in ("keep", "discard", "crash")
        assert " -> " in row.description  # what mutate changed, e.g. `MATRIX_LR 0.04 -> 0.05`
        # The candidate is one commit on top of the best of its time, changing only the trainer.
        full = git(root, "rev-parse", row.commit)
        assert git(root, "rev-parse", f"{full}^") == best
        assert git(root, "log", "-1", "--format=%s", full) == row.description
        assert git(root, "show", "--name-only", "--format=", full) == TRAINER
        if row.status == "keep":
            best, best_bpb = full, row.val_bpb
        assert row.best_bpb == pytest.approx(best_bpb, abs=2e-6)
    # The branch ends on the last kept commit (or the base); discarded ones are not on it.
    assert best_commit(root) == best
    for row in rows[2:]:
        on_branch = git(root, "branch", "--contains", row.commit, "--list", f"autoresearch/{TAG}") != ""
        assert on_branch == (row.status == "keep")
    assert_clean_on_branch(root)
    assert (root / "results.tsv").read_text().count("\n") == 6  # header + 5 rows


REAL_CRASHES = {
    "returns a NaN loss": ("loss = train_model(x, y)", "loss = train_model(x, y) * float('nan')",
                           "diverged"),
    "uses non-causal attention": ("is_causal=True", "is_causal=False", "depend on tokens after t"),
    "raises": ("    ctx = load_context()\n", "    ctx = load_context()\n    raise RuntimeError('out of ideas')\n",
               "RuntimeError: out of ideas"),
}


@pytest.mark.parametrize("case", list(REAL_CRASHES))
def test_a_broken_reference_trainer_ends_as_crash(real_session, case):
    old, new, reason = REAL_CRASHES[case]
    root = real_session
    head, before = best_commit(root), len(ledger(root))
    edit(root, old, new)
    result = cli(root, "try", "-m", f"trainer that {case}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("crash "), result.stdout
    row = ledger(root)[-1]
    assert len(ledger(root)) == before + 1
    assert row.status == "crash" and reason in row.reason, row.reason
    assert best_commit(root) == head
    assert_clean_on_branch(root)
