"""Session state and processes that neither an agent nor a trainer can corrupt: each attack of the
issue reproduced through the real CLI, in a real session of the fake unigram trainer.

Each test works on its own byte copy of one started session (the baseline measured once)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ratchet_helpers import (TRAINER, assert_clean_on_branch, best_commit, cli, cli_env, clone_dir, edit, git,
                             ledger, started_session, session_paths, set_constant)

from harness.processes import process_running
from loop.lock import RepoLock
from loop.session import build_manifest, load_session_config, save_manifest

pytestmark = pytest.mark.slow

BEFORE_FINISH = "    ctx.finish("


@pytest.fixture(scope="module")
def template(test_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return started_session(tmp_path_factory.mktemp("integrity") / "repo", "--repeats", "2", TIME_BUDGET="2",
                           WARMUP_ALLOWANCE="4")


@pytest.fixture()
def session(template: Path, tmp_path: Path) -> Path:
    return clone_dir(template, tmp_path / "repo")


def status(root: Path) -> dict:
    result = cli(root, "session", "status", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def baseline_mean(root: Path) -> float:
    values = [r.val_bpb for r in ledger(root) if r.status == "baseline"]
    return sum(values) / len(values)


# -- the manifest, the configuration and the ledger ---------------------------------------------------

def test_a_manifest_rebuilt_with_a_larger_budget_stops_the_session(session):
    paths = session_paths(session)
    before = ledger(session)
    for path in (paths.config, paths.run_config):
        text = path.read_text()
        assert '"TIME_BUDGET": 2.0' in text
        path.write_text(text.replace('"TIME_BUDGET": 2.0', '"TIME_BUDGET": 8.0'))
    save_manifest(build_manifest(session, load_session_config(paths), paths), paths)  # as an agent would
    set_constant(session, "SEED", 43)
    result = cli(session, "try", "-m", "seed, on a quadrupled budget")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "row 1 does not verify" in result.stderr and "configuration or its manifest" in result.stderr
    assert ledger(session) == before  # nothing ran, under either budget


def test_a_trainer_that_rewrites_the_session_state_is_rejected_and_the_state_put_back(session):
    paths = session_paths(session)
    config, manifest, rows = paths.config.read_text(), paths.manifest.read_text(), paths.ledger.read_text()
    edit(session, BEFORE_FINISH, f"""    import json
    from pathlib import Path
    folder = Path({str(paths.directory)!r})
    config = json.loads((folder / "session.json").read_text())
    config.update(z=0.0, min_floor=0.0)
    (folder / "session.json").write_text(json.dumps(config))
    (folder / "manifest.json").write_text("{{}}")
    with open(folder / "results.tsv", "a") as ledger:
        ledger.write("deadbee\\t0.100000\\t0.0\\tkeep\\tforged\\n")
""" + BEFORE_FINISH)
    result = cli(session, "try", "-m", "rewrite the session's state")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("rejected ") and "changed the session's state" in result.stdout
    assert paths.config.read_text() == config and paths.manifest.read_text() == manifest
    assert paths.ledger.read_text().startswith(rows) and "forged" not in paths.ledger.read_text()
    assert ledger(session)[-1].status == "rejected" and status(session)["ledger"]["verified"]
    assert_clean_on_branch(session)


def test_an_edited_ledger_row_is_detected_and_the_standing_is_unaffected(session):
    paths = session_paths(session)
    honest = status(session)
    lines = paths.ledger.read_text().splitlines()
    for i, line in enumerate(lines[1:], start=1):  # the baseline rows, 0.5 bpb worse: any no-op now "gains"
        cells = line.split("\t")
        cells[1] = f"{float(cells[1]) + 0.5:.6f}"
        lines[i] = "\t".join(cells)
    paths.ledger.write_text("\n".join(lines) + "\n")
    edited = status(session)
    assert not edited["ledger"]["verified"] and "row 1" in edited["ledger"]["detail"]
    assert edited["best_bpb"] == honest["best_bpb"] and edited["sigma"] == honest["sigma"]
    set_constant(session, "SEED", 43)  # a no-op for this model
    result = cli(session, "try", "-m", "seed after the edit")
    assert result.returncode == 0, result.stderr
    assert "put back from the ratchet's copy" in result.stderr
    assert not result.stdout.startswith("keep"), result.stdout
    assert status(session)["ledger"]["verified"]


# -- bytecode -------------------------------------------------------------------------------------------

PLANT = """    import py_compile, sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    for module, old, new in (("harness/scoring/evaluate.py", "nats=float(row_nats.sum())", "nats=0.5 * float(row_nats.sum())"),
                             ("loop/decide.py", "def decide(", "def _honest_decide(")):
        source = root / module
        text = source.read_text().replace(old, new)
        if module.endswith("decide.py"):
            text += "\\ndef decide(*a, **k):\\n    d = _honest_decide(*a, **k)\\n    return type(d)(**{**d.__dict__, 'verdict': 'keep', 'rerun_needed': False})\\n"
        planted = Path(sys.argv[0]).with_name("planted.py")
        planted.write_text(text)
        target = source.parent / "__pycache__" / f"{source.stem}.{sys.implementation.cache_tag}.pyc"
        target.parent.mkdir(exist_ok=True)
        py_compile.compile(str(planted), cfile=str(target), dfile=str(source), doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
        planted.unlink()
"""


def test_planted_bytecode_is_refused_and_has_no_effect_on_the_next_score(session):
    edit(session, BEFORE_FINISH, PLANT + BEFORE_FINISH)
    result = cli(session, "try", "-m", "plant bytecode")
    assert result.stdout.startswith("rejected ") and "wrote bytecode" in result.stdout, result.stdout + result.stderr
    assert not list((session / "harness").rglob("*.pyc")) and not list((session / "loop").rglob("*.pyc"))
    set_constant(session, "SEED", 43)  # a no-op: a planted decide() would keep it, planted nats halve it
    result = cli(session, "try", "-m", "seed after the plant")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("discard ") and ledger(session)[-1].val_bpb == pytest.approx(baseline_mean(session),
                                                                                                  abs=1e-6)


# -- processes -------------------------------------------------------------------------------------------

def test_a_loop_or_try_started_by_a_trainer_is_refused_and_the_outer_rows_stay_right(session, tmp_path):
    out = tmp_path / "nested.json"
    edit(session, BEFORE_FINISH, f"""    import json, os, subprocess, sys
    runs = {{}}
    for args in (["loop", "--agent", "mutate", "--max", "1"], ["try", "-m", "nested"], ["session", "status"]):
        done = subprocess.run([sys.executable, "-m", "autoresearch", *args], capture_output=True, text=True)
        runs[args[0]] = [done.returncode, done.stderr]
    open({str(out)!r}, "w").write(json.dumps(runs))
""" + BEFORE_FINISH)
    loop_state = session_paths(session).loop_state
    before = loop_state.read_text() if loop_state.exists() else None
    head, rows = best_commit(session), len(ledger(session))
    result = cli(session, "try", "-m", "start a nested loop")
    assert result.returncode == 0, result.stderr
    nested = json.loads(out.read_text())
    for command, (code, stderr) in nested.items():
        assert code == 1 and "from inside a running trainer" in stderr, (command, stderr)
    new = ledger(session)
    assert len(new) == rows + 1 and new[-1].description == "start a nested loop"
    assert new[-1].commit != "-" and git(session, "log", "-1", "--format=%s", new[-1].commit) == "start a nested loop"
    assert (loop_state.read_text() if loop_state.exists() else None) == before
    assert best_commit(session) in (head, git(session, "rev-parse", new[-1].commit))


def test_a_detached_child_of_the_trainer_is_gone_after_the_run(session, tmp_path):
    record = tmp_path / "child.pid"
    edit(session, BEFORE_FINISH, f"""    import subprocess, sys
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True, env={{}})
    open({str(record)!r}, "w").write(str(child.pid))
""" + BEFORE_FINISH)
    result = cli(session, "try", "-m", "leave a child behind")
    assert result.returncode == 0, result.stderr
    pid = int(record.read_text())
    deadline = time.monotonic() + 10
    while process_running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not process_running(pid)


# -- git failures ------------------------------------------------------------------------------------------

def test_a_staged_deletion_of_the_trainer_gives_a_row_and_the_loop_goes_on(session):
    git(session, "rm", "-q", TRAINER)
    result = cli(session, "try", "-m", "delete the trainer")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("rejected ") and "was deleted" in result.stdout
    assert (session / TRAINER).is_file()
    assert_clean_on_branch(session)
    # An agent that does it every time: each iteration is a row, and the loop finishes.
    result = cli(session, "loop", "--agent", f"git rm -q {TRAINER}", "--max", "2")
    assert result.returncode == 0, result.stderr
    assert [r.status for r in ledger(session)[-3:]] == ["rejected"] * 3
    assert_clean_on_branch(session)


def test_a_stale_index_lock_gives_a_row_and_the_tree_is_put_back(session):
    set_constant(session, "SEED", 44)
    (session / ".git" / "index.lock").write_text("")
    result = cli(session, "try", "-m", "commit under a stale lock")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("rejected ") and "git could not commit" in result.stdout
    assert not (session / ".git" / "index.lock").exists()
    assert_clean_on_branch(session)


def test_a_detached_head_is_rejected_and_put_back_on_the_branch(session):
    git(session, "checkout", "-q", "--detach")
    set_constant(session, "SEED", 45)
    result = cli(session, "try", "-m", "from a detached head")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("rejected ") and "left the session branch" in result.stdout
    assert_clean_on_branch(session)


# -- autoresearch run owns its trainer ----------------------------------------------------------------------

SLOW_TRAINER = """\
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
open(os.environ["PIDS_FILE"], "w").write(f"{os.getpid()} {child.pid}")
time.sleep(300)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_to_run_leaves_no_process_behind_and_a_second_run_is_refused(session, tmp_path, signum):
    (session / TRAINER).write_text(SLOW_TRAINER)
    pids_file = tmp_path / "pids"
    env = cli_env(session, PIDS_FILE=str(pids_file))
    run = subprocess.Popen([sys.executable, "-m", "autoresearch", "run", "--timeout", "300"], cwd=session, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not pids_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        trainer, child = (int(p) for p in pids_file.read_text().split())
        second = cli(session, "run", "--timeout", "30")
        assert second.returncode == 1 and "busy" in second.stderr, second.stderr
        run.send_signal(signum)
        run.wait(timeout=30)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode != 0
    deadline = time.monotonic() + 10
    while (process_running(trainer) or process_running(child)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not process_running(trainer) and not process_running(child)
    git(session, "checkout", "--", TRAINER)


def test_a_stale_lock_is_told_from_a_live_one_by_the_process_start_time(tmp_path):
    (tmp_path / ".autoresearch").mkdir()
    lock = RepoLock(tmp_path, "test")
    holder = {"pid": os.getpid(), "host": os.uname().nodename, "started": "x", "command": "before a reboot",
              "token": "t", "pid_started": time.time() - 86400}  # our pid, but a process of yesterday
    lock.path.write_text(json.dumps(holder))
    assert lock.holder().stale
    lock.acquire()
    assert lock.holder().command == "test" and not lock.holder().stale
    other = RepoLock(tmp_path, "other")
    with pytest.raises(Exception, match="busy"):
        other.acquire()
    lock.release()
