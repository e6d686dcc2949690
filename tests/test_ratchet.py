"""The ratchet's rules, in real temporary git repositories through the real CLI.

The experiments here are run by the tiny numpy trainer of `ratchet_helpers.py` (the whole harness
contract, a second or two per run). `tests/test_session.py` drives the reference trainer.
Also here: the manifest and the lock as units.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PROJECT
from harness.config import EvaluatorConstants, RunConfig
from harness.scoring.evalset import EvalSet, Stream
from loop.session import (
    SessionConfig,
    SessionPaths,
    build_manifest,
    save_manifest,
    save_session_config,
    verify_manifest,
)
from loop.errors import SessionError
from loop.results import without_private_columns
from loop.lock import LOCK_TOKEN_ENV, RepoLock
from ratchet_helpers import (TAG, TRAINER, assert_clean_on_branch, best_commit, cli, clone_dir, edit, git,
                             ledger, make_repo, session_paths, set_constant)

TIMEOUT_S = 12  # the fake trainer finishes in a few seconds; the hang test waits this long


# -- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def template(test_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A set-up, committed repository with the fake trainer and no session."""
    return make_repo(tmp_path_factory.mktemp("ratchet-template") / "repo", TIME_BUDGET="1")


@pytest.fixture(scope="module")
def session(template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One started session (2 baseline runs) shared by the tests below; each leaves it clean."""
    root = clone_dir(template, tmp_path_factory.mktemp("ratchet-session") / "repo")
    result = cli(root, "session", "start", TAG, "--timeout", str(TIMEOUT_S))
    assert result.returncode == 0, result.stderr
    return root


# -- the manifest -------------------------------------------------------------------------------

def _config(root: Path, outside: Path) -> tuple[SessionConfig, SessionPaths]:
    evaluator = EvaluatorConstants(MAX_SEQ_LEN=256, EVAL_TOKENS=8192, TIME_BUDGET=1, VOCAB_SIZE=4096,
                                   DATA_SOURCE="builtin", EVAL_BATCH_SIZE=32, BASELINE_REPEATS=2)
    run = RunConfig(backend="cuda", device="cpu", preset="cpu-tiny", evaluator=evaluator,
                    data_dir=str(outside / "data"), tokenizer_dir=str(outside / "tokenizer"),
                    tokens_dir=str(outside / "tokens"), unigram_bpb=2.7)
    config = SessionConfig(tag="m", branch="autoresearch/m", backend="cuda", preset="cpu-tiny", rule="noise",
                           z=2.0, min_floor=3e-4, repeats=2, timeout=60, trainer=TRAINER, base_commit="0" * 40,
                           run=run, eval_set=str(outside / "eval"))
    return config, SessionPaths(outside / "session")


def _eval_set(directory: Path) -> None:
    """A (tiny, unscoreable) evaluation set description with its files, as the manifest sees it."""
    directory.mkdir(parents=True)
    for name in ("val_rows.npy", "token_bytes.npy"):
        (directory / name).write_bytes(b"\x01\x02")
    EvalSet(directory=directory, seq_len=4, vocab_size=8, bos_id=7,
            streams={"val": Stream(rows_file="val_rows.npy", num_rows=1, canary_rows=(), canary_pool=4)}).save()


def test_the_manifest_names_every_changed_added_or_missing_frozen_file(tmp_path):
    root, outside = tmp_path / "repo", tmp_path / "cache"
    for path, text in {"harness/scoring/evaluate.py": "x = 1\n", "harness/sub/deep.py": "", "presets/tiny.toml": "a = 1\n",
                       "program.md": "# program\n", "pyproject.toml": "[project]\n", TRAINER: "LR = 1\n"}.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    for path in ("tokenizer/tokenizer.pkl", "tokenizer/token_bytes.npy", "tokens/train.bin"):
        (outside / path).parent.mkdir(parents=True, exist_ok=True)
        (outside / path).write_bytes(b"\x01\x02")
    _eval_set(outside / "eval")
    config, paths = _config(root, outside)
    save_session_config(config, paths)
    save_manifest(build_manifest(root, config, paths), paths)
    assert verify_manifest(root, config, paths) == []

    # What the agent may change, and caches, are not frozen.
    (root / TRAINER).write_text("LR = 2\n")
    (root / "harness" / "__pycache__").mkdir()
    (root / "harness" / "__pycache__" / "evaluate.cpython-311.pyc").write_bytes(b"\0")
    (outside / "tokens" / "train.bin").write_bytes(b"more training data")
    assert verify_manifest(root, config, paths) == []

    (root / "harness/scoring/evaluate.py").write_text("x = 2\n")
    (root / "harness/new.py").write_text("")
    (root / "presets/tiny.toml").unlink()
    (root / "uv.lock").write_text("lock\n")
    (outside / "tokenizer/token_bytes.npy").write_bytes(b"\x09")
    (outside / "eval/val_rows.npy").write_bytes(b"\x09")
    found = {m.path: (m.problem, m.in_tree) for m in verify_manifest(root, config, paths)}
    assert found == {
        "harness/scoring/evaluate.py": ("changed", True),
        "harness/new.py": ("added", True),
        "presets/tiny.toml": ("missing", True),
        "uv.lock": ("added", True),
        str(outside / "tokenizer/token_bytes.npy"): ("changed", False),
        str(outside / "eval/val_rows.npy"): ("changed", False),
    }


def test_the_session_config_itself_is_pinned(tmp_path):
    root, outside = tmp_path / "repo", tmp_path / "cache"
    (root / "harness").mkdir(parents=True)
    config, paths = _config(root, outside)
    save_session_config(config, paths)
    save_manifest(build_manifest(root, config, paths), paths)
    data = json.loads(paths.config.read_text())
    data["z"] = 0.1  # a laxer keep rule, written behind the session's back
    paths.config.write_text(json.dumps(data))
    assert [str(m) for m in verify_manifest(root, config, paths)] == [f"{paths.config} (changed)"]


# -- the lock -----------------------------------------------------------------------------------

def test_a_live_holder_keeps_the_lock_and_is_named(tmp_path):
    with RepoLock(tmp_path, "autoresearch loop --agent mutate"):
        with pytest.raises(SessionError) as caught:
            RepoLock(tmp_path, "autoresearch try").acquire()
        assert f"pid {os.getpid()}" in str(caught.value)
        assert "autoresearch loop --agent mutate" in str(caught.value)
    with RepoLock(tmp_path, "autoresearch try"):  # released on exit
        pass


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    # A real process takes the lock and dies without releasing it (as kill -9 would leave it).
    code = ("import sys, os; sys.path.insert(0, sys.argv[1]); from pathlib import Path; "
            "from loop.lock import RepoLock; RepoLock(Path(sys.argv[2]), 'doomed').acquire(); os._exit(0)")
    subprocess.run([sys.executable, "-c", code, str(PROJECT), str(tmp_path)], check=True)
    lock = RepoLock(tmp_path, "autoresearch session resume")
    assert lock.holder() is not None and lock.holder().stale
    with lock:
        assert lock.holder().pid == os.getpid()


def test_an_agent_started_by_the_loop_shares_its_lock(tmp_path, monkeypatch):
    with RepoLock(tmp_path, "autoresearch loop") as outer:
        monkeypatch.setenv(LOCK_TOKEN_ENV, outer.token)
        with RepoLock(tmp_path, "autoresearch try") as inner:
            assert inner.nested
        assert outer.path.exists()  # the nested release leaves the loop's lock alone


# -- starting a session ---------------------------------------------------------------------------

def test_start_refuses_a_dirty_tree_listing_the_files(template, tmp_path):
    root = clone_dir(template, tmp_path / "repo")
    (root / "notes.txt").write_text("ideas\n")
    edit(root, "SEED = 42", "SEED = 7")
    result = cli(root, "session", "start", "x")
    assert result.returncode == 1
    assert "uncommitted changes" in result.stderr
    assert "notes.txt" in result.stderr and TRAINER in result.stderr
    assert git(root, "branch", "--list", "autoresearch/*") == ""


def test_start_refuses_an_existing_branch_and_suggests_another_tag(template, tmp_path):
    root = clone_dir(template, tmp_path / "repo")
    git(root, "branch", "autoresearch/x")
    result = cli(root, "session", "start", "x")
    assert result.returncode == 1
    assert "branch autoresearch/x already exists" in result.stderr
    assert "session start x-2" in result.stderr


def test_start_requires_setup(template, tmp_path):
    root = clone_dir(template, tmp_path / "repo")
    (root / ".git" / "autoresearch" / "setup.json").unlink()
    result = cli(root, "session", "start", "x")
    assert result.returncode == 1 and "autoresearch setup" in result.stderr


def test_a_failed_baseline_leaves_nothing_behind(template, tmp_path):
    root = clone_dir(template, tmp_path / "repo")
    edit(root, "    ctx = load_context()", "    raise RuntimeError('broken before the session')")
    git(root, "commit", "-qam", "broken trainer")
    result = cli(root, "session", "start", "x")
    assert result.returncode == 1
    assert "baseline run failed" in result.stderr and "broken before the session" in result.stderr
    assert git(root, "rev-parse", "--abbrev-ref", "HEAD") == "main"
    assert git(root, "branch", "--list", "autoresearch/*") == ""
    assert not session_paths(root, "x").directory.exists()  # the tag can be used again
    assert "no active session" in cli(root, "session", "status").stderr


def test_start_measures_the_baseline_and_freezes_the_evaluator(session):
    rows = ledger(session)
    base = git(session, "rev-parse", "main")
    assert [r.status for r in rows] == ["baseline", "baseline"]
    assert {r.commit for r in rows} == {base[:7]}
    values = [r.val_bpb for r in rows]
    assert rows[-1].best_bpb == pytest.approx(sum(values) / 2, abs=2e-6)
    assert rows[-1].noise_sigma == pytest.approx(abs(values[0] - values[1]) / 2**0.5, abs=2e-6)
    assert best_commit(session) == base
    assert_clean_on_branch(session)
    paths = session_paths(session)
    manifest = json.loads(paths.manifest.read_text())
    assert "harness/scoring/evaluate.py" in manifest and "program.md" in manifest
    assert json.loads(paths.run_config.read_text())["preset"] == "cpu-tiny"
    # The repository's results.tsv is the ledger's copy without the holdout (never shown to the
    # agent), and git ignores it.
    assert "holdout_bpb" in paths.ledger.read_text() and all(r.holdout_bpb for r in rows)
    assert (session / "results.tsv").read_text() == without_private_columns(paths.ledger.read_text())
    assert "holdout_bpb" not in (session / "results.tsv").read_text()


def test_a_second_session_waits_for_the_first_to_end(session):
    result = cli(session, "session", "start", "other")
    assert result.returncode == 1 and "session 't' is still active" in result.stderr


# -- try ----------------------------------------------------------------------------------------

def test_editing_the_harness_stops_the_session_naming_the_file(session):
    before, head = ledger(session), best_commit(session)
    set_constant(session, "SEED", 43)
    (session / "harness" / "scoring" / "evaluate.py").write_text((session / "harness" / "scoring" / "evaluate.py").read_text() + "# tweak\n")
    result = cli(session, "try", "-m", "seed and a tweak to the evaluator")
    assert result.returncode == 3
    assert "harness/scoring/evaluate.py (changed)" in result.stderr
    # Untouched: no row, no commit, the edits still there for a human to look at.
    assert ledger(session) == before and best_commit(session) == head
    assert "SEED = 43" in (session / TRAINER).read_text()
    assert (session / "harness" / "scoring" / "evaluate.py").read_text().endswith("# tweak\n")
    git(session, "checkout", "--", ".")

    config = session_paths(session).config
    original = config.read_text()
    config.write_text(original.replace('"rule": "noise"', '"rule": "strict"'))
    result = cli(session, "try", "-m", "anything")
    assert result.returncode == 3 and f"{config.relative_to(session)} (changed)" in result.stderr
    config.write_text(original)
    assert_clean_on_branch(session)


def test_editing_the_validation_shard_stops_the_session_naming_it(session):
    eval_set = EvalSet.load(Path(json.loads(session_paths(session).config.read_text())["eval_set"]))
    val_file = Path(eval_set.source["val_file"])
    before, head = ledger(session), best_commit(session)
    original = val_file.read_bytes()  # in the cache every test shares: put back whatever happens
    set_constant(session, "SEED", 43)
    try:
        val_file.write_bytes(original + b"\0")
        result = cli(session, "try", "-m", "seed, scored on other validation text")
    finally:
        val_file.write_bytes(original)
    assert result.returncode == 3 and f"{val_file} (changed)" in result.stderr
    assert ledger(session) == before and best_commit(session) == head
    git(session, "checkout", "--", ".")
    assert_clean_on_branch(session)


@pytest.mark.parametrize("frozen", ["program.md", "presets/cpu-tiny.toml", "presets/new-tier.toml"])
def test_a_change_outside_the_trainer_is_rejected_and_reverted(session, frozen):
    before, head = len(ledger(session)), best_commit(session)
    original = (session / TRAINER).read_text()
    set_constant(session, "SMOOTHING", 2.0)
    path = session / frozen
    path.write_text((path.read_text() if path.exists() else "") + "\n# edited\n")
    result = cli(session, "try", "-m", f"smoothing and {frozen}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("rejected ")
    rows = ledger(session)
    assert len(rows) == before + 1
    assert rows[-1].status == "rejected" and frozen in rows[-1].reason and rows[-1].commit == "-"
    # The whole change is reverted, the new file removed; nothing was committed.
    assert best_commit(session) == head
    assert_clean_on_branch(session)
    assert (session / TRAINER).read_text() == original


def test_an_agents_own_commits_touching_frozen_files_are_rejected(session):
    head = best_commit(session)
    (session / "presets" / "cpu-tiny.toml").write_text("# mine now\n")
    git(session, "commit", "-qam", "agent: edit the preset")
    result = cli(session, "try", "-m", "preset edit")
    assert result.stdout.startswith("rejected ")
    assert best_commit(session) == head
    assert_clean_on_branch(session)


def test_a_kept_change_advances_the_branch_and_squashes_the_agents_commits(session):
    head, before = best_commit(session), len(ledger(session))
    set_constant(session, "LOGIT_SCALE", 0.75)
    git(session, "commit", "-qam", "agent wip")
    set_constant(session, "LOGIT_SCALE", 1.0)
    result = cli(session, "try", "-m", "LOGIT_SCALE 0.5 -> 1.0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("keep "), result.stdout
    assert "noise_floor=" in result.stdout and "delta=-" in result.stdout
    rows = ledger(session)
    assert len(rows) == before + 1 and rows[-1].status == "keep"
    new_head = best_commit(session)
    assert rows[-1].commit == new_head[:7]
    assert git(session, "rev-parse", f"{new_head}^") == head  # one commit on top of the best
    assert git(session, "log", "-1", "--format=%s") == "LOGIT_SCALE 0.5 -> 1.0"
    assert rows[-1].best_bpb == rows[-1].val_bpb < rows[-2].best_bpb
    assert_clean_on_branch(session)


def test_a_worse_change_is_discarded_and_an_identical_one_is_not_run_again(session):
    head, before = best_commit(session), len(ledger(session))
    set_constant(session, "SMOOTHING", 100000.0)
    result = cli(session, "try", "-m", "huge smoothing", "--json")
    data = json.loads(result.stdout)
    assert data["verdict"] == "discard" and data["delta"] > 0
    discarded = ledger(session)[-1]
    assert discarded.status == "discard" and len(ledger(session)) == before + 1
    assert best_commit(session) == head
    assert git(session, "cat-file", "-t", data["commit"]) == "commit"  # the candidate stays findable

    set_constant(session, "SMOOTHING", 100000.0)
    again = json.loads(cli(session, "try", "-m", "huge smoothing, again", "--json").stdout)
    assert again["verdict"] == "discard" and again["reused_from"] == discarded.commit
    assert len(ledger(session)) == before + 1  # not an experiment: no row
    assert best_commit(session) == head
    assert_clean_on_branch(session)


def test_nothing_to_try_changes_nothing(session):
    before = len(ledger(session))
    result = cli(session, "try", "-m", "no edit")
    assert result.stdout.startswith("unchanged ") and len(ledger(session)) == before


CRASHES = {
    "raises": ("    ctx = load_context()", "    raise RuntimeError('bad idea')", "RuntimeError: bad idea"),
    "syntax error": ("def main() -> None:", "def main() -> None", "SyntaxError"),
    "import error": ("import numpy as np", "import numpy as np\nimport numpyy", "No module named 'numpyy'"),
    "prints its own score": ("    ctx = load_context()", "    print('val_bpb: 0.1')\n    ctx = load_context()",
                             "printed a val_bpb itself"),
    "runs out of memory": ("    ctx = load_context()",
                           "    raise MemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')",
                           "out of memory"),
    "nan loss": ("    logp = torch.tensor(", "    counts[0] = float('nan')\n    logp = torch.tensor(", "not finite"),
    "hangs": ("    ctx = load_context()", "    import time; time.sleep(600)", f"timed out after {TIMEOUT_S} s"),
    "sees the future": ("return logp.expand(*inputs.shape, logp.numel()).clone()",
                        "out = logp.expand(*inputs.shape, logp.numel()).clone(); "
                        "out[:, :-1, :] += inputs[:, 1:, None] * 1e-3; return out",
                        "depend on tokens after t"),
}


@pytest.mark.parametrize("case", list(CRASHES))
def test_a_broken_trainer_ends_as_crash_with_the_reason(session, case):
    old, new, reason = CRASHES[case]
    head, before = best_commit(session), len(ledger(session))
    edit(session, old, new)
    result = cli(session, "try", "-m", case)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("crash "), result.stdout
    row = ledger(session)[-1]
    assert len(ledger(session)) == before + 1
    assert row.status == "crash" and reason in row.reason, row.reason
    assert row.val_bpb == 0.0 and row.commit != "-"
    assert best_commit(session) == head
    assert_clean_on_branch(session)


AGENT = """
import re
import sys
from pathlib import Path

prompt = sys.stdin.read()
Path(sys.argv[1]).write_text(prompt)
trainer = Path("backends/cuda/train.py")
trainer.write_text(re.sub(r"^SMOOTHING = .*$", "SMOOTHING = 1.5", trainer.read_text(), flags=re.M))
print("SMOOTHING -> 1.5")
print("(more chatter the harness ignores)")
"""


def test_an_external_agent_gets_the_prompt_and_its_reply_names_the_change(session, tmp_path):
    script, prompt_copy = tmp_path / "agent.py", tmp_path / "prompt.md"
    script.write_text(AGENT)
    before = ledger(session)
    result = cli(session, "loop", "--agent", f'"{sys.executable}" "{script}" "{prompt_copy}"', "--max", "1")
    assert result.returncode == 0, result.stderr
    rows = ledger(session)
    assert len(rows) == len(before) + 1
    assert rows[-1].description == "SMOOTHING -> 1.5" and rows[-1].status in ("keep", "discard")
    prompt = prompt_copy.read_text()
    assert "## Rules" in prompt  # program.md
    assert f"file to edit: {TRAINER}" in prompt and f"{before[-1].best_bpb:.6f}" in prompt
    assert "what has been tried" in prompt
    assert re.search(r"memory ceiling \(soft\): \d+\.\d GB", prompt)  # the RAM, for device cpu
    assert all(row.description in prompt for row in before if row.status != "baseline")
    assert_clean_on_branch(session)


SELF_TRYING_AGENT = """
import subprocess, sys
from pathlib import Path

trainer = Path("backends/cuda/train.py")
trainer.write_text(trainer.read_text() + "# a comment, tried by the agent itself\\n")
done = subprocess.run([sys.executable, "-m", "autoresearch", "try", "-m", "a comment"],
                      capture_output=True, text=True)
print("tried it myself" if done.returncode == 0 else "try failed: " + done.stderr.replace("\\n", " "))
"""


def test_an_agent_started_by_the_loop_may_call_try_itself(session, tmp_path):
    script = tmp_path / "agent.py"
    script.write_text(SELF_TRYING_AGENT)
    before = ledger(session)
    result = cli(session, "loop", "--agent", f'"{sys.executable}" "{script}"', "--max", "1")
    assert result.returncode == 0, result.stderr
    rows = ledger(session)
    assert len(rows) == len(before) + 1, rows[-1].reason  # the agent's own try; the loop's found no change
    assert rows[-1].description == "a comment"
    assert result.stdout.startswith("unchanged ")
    assert_clean_on_branch(session)


def test_status_reports_the_session(session):
    data = json.loads(cli(session, "session", "status", "--json").stdout)
    rows = ledger(session)
    assert data["tag"] == TAG and data["rule"] == "noise" and data["in_flight"] is None
    assert data["experiments"] == len(rows) - 2
    assert data["best_commit"] == best_commit(session)[:7]
    assert data["noise_floor"] == pytest.approx(max(2 * data["sigma"], 3e-4))


def test_ending_a_session_keeps_its_branch_and_results(session):
    rows = ledger(session)
    result = cli(session, "session", "end")
    assert result.returncode == 0 and "ended" in result.stdout
    assert ledger(session) == rows
    assert git(session, "branch", "--list", f"autoresearch/{TAG}")
    assert "no active session" in cli(session, "try", "-m", "x").stderr
