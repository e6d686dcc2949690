"""Every way an eager agent's edit to train.py could forge or inflate a score, tried in a real session
through `autoresearch try`, as the agent would. None may end as `keep`: each is a crash, over
budget, or rejected, with its reason; a patched scorer simply has no effect.

The session runs the fake unigram trainer (ratchet_helpers.FAKE_TRAINER, a real torch export) with
a 2 s budget and a 4 s warm-up allowance, so the runner stops a trainer 2 + 4 + 5 s (grace) after
its start.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ratchet_helpers import TAG, assert_clean_on_branch, best_commit, cli, edit, git, ledger, started_session

from harness.scoring.confine import plan

pytestmark = pytest.mark.slow

FORWARD = "        return logp.expand(*inputs.shape, logp.numel()).clone()\n"
BEFORE_FINISH = "    ctx.finish("
LANDLOCK = plan([Path("/")]).active  # whether this machine can confine trainers


@pytest.fixture(scope="module")
def session(test_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return started_session(tmp_path_factory.mktemp("trust") / "repo", "--repeats", "2", TIME_BUDGET="2",
                           WARMUP_ALLOWANCE="4")


def attempt(root: Path, description: str, **env: str) -> tuple[str, str, object]:
    """`try` the trainer as edited; the verdict word, the line, and the ledger's new row."""
    before = len(ledger(root))
    result = cli(root, "try", "-m", description, **env)
    assert result.returncode == 0, result.stderr
    rows = ledger(root)
    assert len(rows) == before + 1, result.stdout
    assert_clean_on_branch(root)  # reverted: the best commit, whatever the verdict
    return result.stdout.split()[0], result.stdout, rows[-1]


def leaking_forward(gate: str, where: str) -> str:
    """A forward that adds the true next token to a position's logits when `gate` holds, at the
    positions where `where` holds (`pos`: positions 0..T-2)."""
    return (
        "        out = logp.expand(*inputs.shape, logp.numel()).clone()\n"
        "        T = inputs.shape[1]\n"
        "        pos = torch.arange(T - 1)\n"
        f"        if {gate}:\n"
        "            nxt = torch.nn.functional.one_hot(inputs[:, 1:], logp.numel()).float() * 20.0\n"
        f"            out[:, :-1, :] = out[:, :-1, :] + nxt * ({where})[None, :, None]\n"
        "        return out\n"
    )


# -- a score written, printed, or made with the harness's own functions ------------------------------

def test_a_result_written_by_the_trainer_counts_for_nothing(session):
    edit(session, "    ctx = load_context()\n", """    ctx = load_context()
    import json, os
    run_dir = os.environ.get("AUTORESEARCH_RUN_DIR", ".")
    summary = {"val_bpb": 0.1, "training_seconds": 2.0, "num_steps": 10}
    for name in ("result.json", "train.json", "summary.json"):
        open(os.path.join(run_dir, name), "w").write(json.dumps({"summary": summary, "val_bpb": 0.1}))
    raise SystemExit(0)
""")
    verdict, line, row = attempt(session, "write a result file")
    assert verdict == "crash" and "no exported model" in row.reason, line


def test_a_summary_printed_with_the_harness_formatter_is_a_crash(session):
    edit(session, BEFORE_FINISH, """    from harness.scoring.budget import format_summary
    print(format_summary({"val_bpb": 0.1, "training_seconds": 2.0}), flush=True)
    ctx.finish(""")
    verdict, line, row = attempt(session, "print a summary")
    assert verdict == "crash" and "printed a val_bpb itself" in row.reason, line


def test_patching_the_scorer_in_the_trainer_changes_nothing(session):
    """The evaluator runs in its own process: patches in the trainer's never reach it."""
    baseline = [r.val_bpb for r in ledger(session) if r.status == "baseline"]
    patch = """
    import harness.scoring.evaluate as ev
    import torch.nn.functional as F
    fake = lambda *a, **k: 0.1
    ev.evaluate_bpb = ev.score_stream = ev.check_causality = fake
    F.cross_entropy = lambda logits, targets, **k: torch.zeros(targets.shape)
"""
    edit(session, "sys.path.insert(0, str(Path(__file__).resolve().parents[2]))\n",
         "sys.path.insert(0, str(Path(__file__).resolve().parents[2]))\n" + patch.replace("\n    ", "\n"))
    edit(session, BEFORE_FINISH, patch.strip("\n") + "\n" + BEFORE_FINISH)
    verdict, line, row = attempt(session, "patch the scorer")
    assert verdict != "keep", line
    assert row.val_bpb == pytest.approx(sum(baseline) / len(baseline), abs=0.05), line  # the honest score


# -- models that read the future only where a weak probe would not look ------------------------------

LEAKS = {  # the old probe changed one row at positions 0, 1, T//2 and T-2, on the first call, in a batch of 5
    "away from the old probe's positions": ("True", "~((pos == 0) | (pos == 1) | (pos == T // 2) | (pos == T - 2))"),
    "only in batches of 8 or more": ("inputs.shape[0] >= 8", "pos >= 0"),
    "only after the first call": ("calls.append(1) or len(calls) > 1", "pos >= 0"),
}


@pytest.mark.parametrize("name", list(LEAKS))
def test_a_leak_the_old_probe_missed_is_a_crash_naming_the_position(session, name):
    edit(session, FORWARD, leaking_forward(*LEAKS[name]))
    edit(session, "    def forward(inputs):\n", "    calls = []\n\n    def forward(inputs):\n")
    edit(session, BEFORE_FINISH, "    forward(torch.zeros(2, 8, dtype=torch.long))  # a first call\n" + BEFORE_FINISH)
    verdict, line, row = attempt(session, f"leak {name}")
    assert verdict == "crash", line
    assert "depend on tokens after t" in row.reason and "in row" in row.reason, row.reason


# -- training on the evaluator's data -----------------------------------------------------------------

CHEAT = """
    import os
    import glob
    found = sorted(glob.glob(os.path.join(os.environ["AUTORESEARCH_CACHE"], "**", "*_rows.npy"), recursive=True))
    assert found, "no evaluation rows in the cache"
    pairs = np.zeros((ctx.vocab_size, ctx.vocab_size), dtype=np.float64)
    for path in found:
        rows = np.load(path)  # the validation and holdout rows, canaries included
        np.add.at(pairs, (rows[:, :-1].ravel(), rows[:, 1:].ravel()), 1.0)
    table = torch.tensor(np.log((pairs + 0.01) / (pairs + 0.01).sum(axis=1, keepdims=True)), dtype=torch.float32)

    def forward(inputs):
        return table[inputs]
"""


@pytest.mark.skipif(not LANDLOCK, reason="Landlock is not available on this machine (kernel or `landlock` package)")
def test_reading_the_evaluation_rows_is_refused_by_the_os(session):
    edit(session, BEFORE_FINISH, CHEAT + BEFORE_FINISH)
    verdict, line, row = attempt(session, "train on validation (confined)")
    assert verdict == "crash" and "PermissionError" in row.reason, line


def test_a_model_trained_on_the_evaluation_rows_is_rejected_by_the_canaries(session):
    # (a trainer identical to the confined attempt's would reuse that verdict without running)
    edit(session, BEFORE_FINISH, CHEAT + "    # unconfined\n" + BEFORE_FINISH)
    verdict, line, row = attempt(session, "train on validation (unconfined)", AUTORESEARCH_CONFINE="0")
    assert verdict == "rejected", line
    assert "validation leak" in row.reason and "canary" in row.reason, row.reason


# -- training past the budget --------------------------------------------------------------------------

def test_training_on_past_the_budget_on_its_own_clock_is_over_budget(session):
    edit(session, "    while not budget.done:\n", """    import time
    stop = time.monotonic() + 10 * ctx.TIME_BUDGET  # its own idea of the budget
    while time.monotonic() < stop:
""")
    verdict, line, row = attempt(session, "train 10x the budget")
    assert verdict == "crash" and row.reason.startswith("over budget"), line


def test_heavy_work_in_uncharged_warm_up_steps_is_over_budget(session):
    edit(session, "    budget.untimed_steps = 1\n", "    budget.untimed_steps = 10\n")
    edit(session, "            np.add.at(counts, y.ravel(), 1)\n", """            np.add.at(counts, y.ravel(), 1)
            if budget.step < budget.untimed_steps:
                time.sleep(2)  # stands for 2 s of extra training in every uncharged step
""")
    edit(session, "    while not budget.done:\n", "    while budget.step < budget.untimed_steps or not budget.done:\n")
    verdict, line, row = attempt(session, "heavy warm-up")
    assert verdict == "crash" and row.reason.startswith("over budget"), line


def test_no_attack_was_kept(session):
    rows = ledger(session)
    assert [r for r in rows if r.status == "keep"] == []
    assert best_commit(session) == json.loads((session / ".git" / "autoresearch" / "sessions" / TAG /
                                              "session.json").read_text())["base_commit"]


@pytest.fixture(autouse=True)
def _fresh_trainer(session):
    """Each attack starts from the session's best trainer."""
    yield
    git(session, "checkout", "--", ".")
