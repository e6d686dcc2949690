"""`autoresearch loop --workers N` through the real CLI: Ray started by the loop on this machine
with a small fixed CPU count, real git worktrees, real trainer runs (the fake unigram trainer of
ratchet_helpers, with two more constants), a real evaluator per worker.

Each loop test works on its own byte copy of one started session (the baseline measured once)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ratchet_helpers import (FAKE_TRAINER, TAG, TRAINER, assert_clean_on_branch, best_commit, cli, cli_env, clone_dir,
                             git, ledger, started_session, session_paths)

from harness.files import sha256_file
from loop.cluster import worker_resources
from loop.integrity import anchor, check_chain
from loop.parallel import in_flight_path, wave_descriptions, with_in_flight
from loop.workers import SessionPackage, localise, node_folder, verify_node
from loop.worktrees import Worktrees

ray = pytest.importorskip("ray", reason="the parallel loop needs the [ray] extra")

# The fake trainer, with its logit scale also set through two constants the tests move on their own
# lines: MATRIX_LR (so that `mutate` finds real gains: x1.25, x1.5, x2 raise the scale towards 1)
# and TEMPERATURE (five lines below LOGIT_SCALE: a change to it re-applies cleanly on top of one
# to LOGIT_SCALE). It counts all of its TRAIN_STEPS batches even when three trainers share two cores
# and start-up eats the 1 s budget, so a trainer scores the same under any load.
TRAINER_SOURCE = FAKE_TRAINER.replace("    while not budget.done:\n",
                                      "    while not budget.done or budget.step < TRAIN_STEPS:\n").replace(
    "SEED = 42  # this model has no randomness; a seed change is a no-op\n",
    "SEED = 42  # this model has no randomness; a seed change is a no-op\n"
    "TEMPERATURE = 1.0  # divides the logit scale\n"
    "MATRIX_LR = 0.04  # multiplies the logit scale by MATRIX_LR / 0.04\n",
).replace("torch.tensor(LOGIT_SCALE * np.log", "torch.tensor(LOGIT_SCALE * (MATRIX_LR / 0.04) / TEMPERATURE * np.log")
assert TRAINER_SOURCE.count("TEMPERATURE") == 2 and TRAINER_SOURCE.count("MATRIX_LR") == 3
assert "budget.step < TRAIN_STEPS:" in TRAINER_SOURCE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def template(test_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return started_session(tmp_path_factory.mktemp("parallel") / "repo", "--repeats", "2",
                           trainer_source=TRAINER_SOURCE, TIME_BUDGET="1", WARMUP_ALLOWANCE="8")


@pytest.fixture()
def session(template: Path, tmp_path: Path) -> Path:
    return clone_dir(template, tmp_path / "repo")


def experiments(root: Path):
    return [r for r in ledger(root) if r.status != "baseline"]


def leftovers(root: Path) -> list[str]:
    """Live processes a parallel loop started for this repository: Ray's servers, agents and
    workers carry its AUTORESEARCH_ROOT, trainers the marker of a parallel experiment (`t:x...`)."""
    needle = f"AUTORESEARCH_ROOT={root}".encode()
    marker = f"AUTORESEARCH_EXPERIMENT={TAG}:x".encode()
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
            if needle in environ or any(item.startswith(marker) for item in environ):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(f"{entry.name} {(entry / 'cmdline').read_bytes()[:100]!r}")
        except OSError:
            continue
    return found


def wait_gone(root: Path, timeout: float = 15.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while (found := leftovers(root)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return found


def assert_consistent(root: Path) -> None:
    """Git on the best, every kept commit a child of the best before it, the ledger whole and
    verifying, nothing left in flight: no worktree, no in-flight file, no process."""
    paths = session_paths(root)
    rows = ledger(root)
    assert check_chain(rows, anchor(paths.config, paths.manifest)).broken_at is None
    best = rows[0].commit
    best_full = git(root, "rev-parse", best)
    for row in rows:
        if row.status == "keep":
            commit = git(root, "rev-parse", row.commit)
            assert git(root, "rev-parse", f"{commit}^") == best_full, f"{row.commit} is not a child of the best before it"
            best_full = commit
    assert best_commit(root) == best_full
    assert_clean_on_branch(root)
    assert git(root, "worktree", "list", "--porcelain").count("worktree ") == 1
    assert not (paths.directory / "worktrees").exists()
    assert not in_flight_path(paths).exists()
    assert wait_gone(root) == []


# -- the loop ------------------------------------------------------------------------------------------

def test_two_workers_run_six_experiments_on_one_ratchet(session):
    result = cli(session, "loop", "--agent", "mutate", "--workers", "2", "--max", "6", "--seed", "7", timeout=240)
    assert result.returncode == 0, result.stderr
    rows = experiments(session)
    assert len(rows) == 6, result.stdout
    assert len(result.stdout.splitlines()) == 6
    assert {r.worker for r in rows} == {"w1", "w2"}
    assert all(r.node for r in rows)
    assert all(r.status in ("keep", "discard") for r in rows), [(r.status, r.reason) for r in rows]
    for row in rows:  # each candidate changed the trainer and nothing else
        assert git(session, "show", "--name-only", "--format=", row.commit) == TRAINER
    assert_consistent(session)
    state = json.loads(session_paths(session).loop_state.read_text())
    assert state["state"] == "finished" and state["done"] == 6 and state["workers"] == 2


AGENT = """
import sys, time
from pathlib import Path

plan = dict(arg.split("=", 1) for arg in sys.argv[1:])  # worktree name -> NAME=VALUE[@delay]
prompt = sys.stdin.read()


def change(folder, what):
    what, _, delay = what.partition("@")
    time.sleep(float(delay or 0))
    name, value = what.split("=")
    trainer = folder / "backends/cuda/train.py"
    lines = [f"{name} = {value}  # set by the agent" if line.startswith(f"{name} = ") else line
             for line in trainer.read_text().splitlines()]
    trainer.write_text("\\n".join(lines) + "\\n")
    return f"{name} -> {value}"


here = Path.cwd()
if here.name == "worktrees":  # a wave: one call, one change per worktree the prompt lists
    assert "This call is a wave" in prompt, prompt[-500:]
    for slot, what in plan.items():
        assert str(here / slot / "backends/cuda/train.py") in prompt
        print(f"{slot}: {change(here / slot, what)}")
elif here.name in plan:
    print(change(here, plan[here.name]))
else:
    print("nothing to do here")
"""


def test_a_candidate_whose_base_went_stale_is_reapplied_and_run_again_or_discarded(session, tmp_path):
    """w1 keeps LOGIT_SCALE 0.7 first. w2's TEMPERATURE 0.5 and w3's LOGIT_SCALE 0.9, proposed on
    the old best, beat it when they finish: w2's change is cherry-picked onto the new best and run
    again there; w3's no longer applies (the same line changed) and is discarded as stale."""
    agent = tmp_path / "agent.py"
    agent.write_text(AGENT)
    command = f'"{sys.executable}" "{agent}" w1=LOGIT_SCALE=0.7 w2=TEMPERATURE=0.5@4 w3=LOGIT_SCALE=0.9@4'
    base = best_commit(session)
    result = cli(session, "loop", "--agent", command, "--workers", "3", "--max", "3", timeout=240)
    assert result.returncode == 0, result.stderr
    rows = {r.description: r for r in experiments(session)}
    assert len(rows) == 3, result.stdout

    first = rows["LOGIT_SCALE -> 0.7"]
    assert first.status == "keep" and first.worker == "w1"
    # Judged as the one-worker loop judges: kept after a confirming run, against the pooled sigma.
    assert len(first.runs.split(";")) == 2 and first.sigma_dof is not None, (first.runs, first.reason)
    kept = git(session, "rev-parse", first.commit)
    assert git(session, "rev-parse", f"{kept}^") == base

    reapplied = rows["TEMPERATURE -> 0.5"]
    assert f"re-applied on {kept[:7]}" in reapplied.reason, reapplied.reason
    assert reapplied.status in ("keep", "discard")
    assert git(session, "rev-parse", f"{reapplied.commit}^") == kept  # measured on top of the best it met
    assert "LOGIT_SCALE = 0.7" in git(session, "show", f"{reapplied.commit}:{TRAINER}")

    stale = rows["LOGIT_SCALE -> 0.9"]
    assert stale.status == "discard" and stale.reason.startswith("stale: its change no longer applies"), stale.reason
    assert_consistent(session)


def test_a_worker_killed_mid_run_gives_one_worker_lost_crash_and_one_retry_elsewhere(session, tmp_path):
    """The two candidates come from one agent call (a wave); while they run, `session status`
    lists them with their workers; then one worker is killed."""
    agent = tmp_path / "agent.py"
    agent.write_text(AGENT)
    command = f'"{sys.executable}" "{agent}" w1=LOGIT_SCALE=0.6 w2=SMOOTHING=2.0'
    loop = subprocess.Popen([sys.executable, "-m", "autoresearch", "loop", "--agent", command, "--wave",
                             "--workers", "2", "--max", "2"], cwd=session, env=cli_env(session),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        listed: list[str] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and loop.poll() is None:
            status = cli(session, "session", "status", "--json")
            listed = json.loads(status.stdout)["experiments_in_flight"] if status.returncode == 0 else []
            if len(listed) == 2 and all(" training " in line for line in listed):
                break
            time.sleep(0.2)
        assert len(listed) == 2 and all(" training " in line for line in listed), listed
        assert {line.split("(")[1].split()[0] for line in listed} == {"w1", "w2"}
        data = json.loads(in_flight_path(session_paths(session)).read_text())
        victim = next((slot, w["pid"]) for slot, w in data["workers"].items() if w["phase"] == "training")
        os.kill(victim[1], signal.SIGKILL)
    finally:
        stdout, stderr = loop.communicate(timeout=180)
    assert loop.returncode == 0, stderr

    rows = experiments(session)
    lost = [r for r in rows if r.reason.startswith("worker lost")]
    assert len(lost) == 1 and lost[0].status == "crash" and lost[0].worker == victim[0], [r.reason for r in rows]
    assert "queued once more" in lost[0].reason
    retries = [r for r in rows if r.description == lost[0].description and r is not lost[0]]
    assert len(retries) == 1 and retries[0].status in ("keep", "discard"), [(r.status, r.reason) for r in rows]
    assert retries[0].worker != victim[0]  # elsewhere
    assert retries[0].trainer_sha == lost[0].trainer_sha
    assert len(rows) == 3  # two experiments, one of them twice
    assert {r.description for r in rows} == {"LOGIT_SCALE -> 0.6", "SMOOTHING -> 2.0"}  # the wave's lines
    assert [p.name for p in session_paths(session).logs.glob("agent-*.log")] == ["agent-0003-w1-w2.log"]
    assert_consistent(session)


def test_the_head_killed_then_resumed_loses_no_row_and_leaves_nothing_running(session, tmp_path, test_cache):
    """`kill -9` of the head just after its first verdict (a discard, decided on one run) was
    journaled, while the other worker is still training. The workers run here as on another node: from a copy of the session's tree the
    head ships them (not a worktree), with their logs sent back."""
    agent = tmp_path / "agent.py"
    agent.write_text(AGENT)
    command = f'"{sys.executable}" "{agent}" w1=LOGIT_SCALE=0.4 w2=SMOOTHING=2.0@3'
    before = ledger(session)
    killed = cli(session, "loop", "--agent", command, "--workers", "2", "--max", "2",
                 AUTORESEARCH_TEST_KILL_AT="parallel-decided", AUTORESEARCH_TEST_SHIP_TREE="1", timeout=180)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = json.loads(in_flight_path(session_paths(session)).read_text())
    states = {e["description"]: e for e in left["experiments"]}
    assert states["LOGIT_SCALE -> 0.4"]["state"] == "decided" and states["SMOOTHING -> 2.0"]["state"] == "running"
    assert ledger(session) == before  # journaled, not yet appended
    decided = states["LOGIT_SCALE -> 0.4"]
    shipped = session_paths(session).logs / f"{decided['number']:04d}-{decided['commit'][:7]}-{decided['slot']}.log"
    assert "val_bpb:" in shipped.read_text()  # the log of a shipped run came back with its result
    trees = node_folder(test_cache, TAG, str(session_paths(session).directory))
    assert (trees / decided["slot"] / "tree" / TRAINER).is_file()

    resumed = cli(session, "session", "resume", timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    assert "continuing the loop" in resumed.stderr
    rows = ledger(session)
    assert rows[:len(before)] == before
    new = rows[len(before):]
    assert new[0].description == "LOGIT_SCALE -> 0.4" and new[0].status == decided["row"]["status"]  # once
    assert new[1].description == "SMOOTHING -> 2.0" and new[1].status == "crash"
    assert new[1].reason.startswith("interrupted: the head died") and new[1].worker == "w2"
    # The resumed loop's two iterations: LOGIT_SCALE 0.4 again is not run twice; SMOOTHING 2.0 runs.
    assert [r.description for r in new[2:]] == ["SMOOTHING -> 2.0"] and new[2].status in ("keep", "discard")
    assert sum(r.description == "LOGIT_SCALE -> 0.4" for r in rows) == 1
    state = json.loads(session_paths(session).loop_state.read_text())
    assert state["state"] == "finished" and state["done"] == 2
    assert not trees.exists()
    assert_consistent(session)


# -- the parts, without Ray ----------------------------------------------------------------------------

def test_a_node_whose_artefacts_differ_refuses_naming_them(template, tmp_path):
    """verify_node checks the tree and the data outside it against the manifest; a node with its own
    cache (another path) is checked there."""
    paths = session_paths(template)
    manifest = json.loads(paths.manifest.read_text())
    config = json.loads(paths.config.read_text())
    cache = Path(os.environ["AUTORESEARCH_CACHE"])
    key = lambda p: p.relative_to(template).as_posix()  # noqa: E731
    package = SessionPackage(
        tag=TAG, backend="cuda", device="cpu", trainer=TRAINER, session_config=paths.config.read_text(),
        run_config=paths.run_config.read_text(), manifest=manifest, config_key=key(paths.config),
        run_config_key=key(paths.run_config), eval_set=config["eval_set"], cache=str(cache),
        session_dir=str(paths.directory), head_host="elsewhere", eval_batch_size=1, framework="torch", timeout=60)
    assert verify_node(package, template, cache) == []

    node_cache = tmp_path / "node-cache"  # another node's cache, filled by the same setup
    import shutil
    shutil.copytree(cache, node_cache)
    assert verify_node(package, template, node_cache) == []
    tokenizer = Path(config["run"]["tokenizer_dir"])
    victim = sorted(p for p in tokenizer.iterdir() if p.is_file())[0]
    moved = localise(str(victim), str(cache), node_cache)
    assert moved != victim and moved.is_file()
    moved.write_bytes(moved.read_bytes() + b"x")
    problems = verify_node(package, template, node_cache)
    assert problems == [f"{victim} (changed)"]

    tree = tmp_path / "tree"
    shutil.copytree(template / "harness", tree / "harness")
    (tree / "harness" / "scoring" / "extra.py").write_text("x = 1\n")
    problems = verify_node(package, tree, cache)
    assert "harness/scoring/extra.py (added)" in problems and "loop/ratchet.py (missing)" in problems


def test_cherry_pick_reapplies_a_change_or_says_it_no_longer_applies(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    (root / "train.py").write_text("A = 1\nB = 2\nC = 3\nD = 4\nE = 5\n")
    git(root, "add", "-A")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base")
    base = git(root, "rev-parse", "HEAD")
    trees = Worktrees(root, tmp_path / "state" / "worktrees")
    one, two = trees.add("w1", base), trees.add("w2", base)
    (one / "train.py").write_text("A = 10\nB = 2\nC = 3\nD = 4\nE = 5\n")
    best = trees.commit_file(one, base, "train.py", "A 10")
    (two / "train.py").write_text("A = 1\nB = 2\nC = 3\nD = 4\nE = 50\n")
    other = trees.commit_file(two, base, "train.py", "E 50")
    picked = trees.cherry_pick(two, best, other)
    assert picked and git(root, "rev-parse", f"{picked}^") == best
    assert (two / "train.py").read_text() == "A = 10\nB = 2\nC = 3\nD = 4\nE = 50\n"

    (two / "train.py").write_text("A = 20\nB = 2\nC = 3\nD = 4\nE = 5\n")
    trees.reset(two, base)
    (two / "train.py").write_text("A = 20\nB = 2\nC = 3\nD = 4\nE = 5\n")
    clash = trees.commit_file(two, base, "train.py", "A 20")
    assert trees.cherry_pick(two, best, clash) is None
    assert trees.head(two) == best and trees.changes_since(two, best) == []
    assert set(trees.listed()) == {"w1", "w2"}
    trees.remove_all()
    assert trees.listed() == {} and not trees.folder.exists()
    assert sha256_file(root / "train.py")  # the main tree is untouched


def test_prompts_name_the_experiments_in_flight_and_waves_read_one_line_per_worktree():
    prompt = "# program\n\n## Your task now\n\nMake ONE change."
    shown = with_in_flight(prompt, ["MATRIX_LR 0.04 -> 0.05 (on abc1234, running)"])
    assert shown.index("Experiments in flight now") < shown.index("## Your task now")
    assert "MATRIX_LR 0.04 -> 0.05" in shown
    assert with_in_flight(prompt, []) == prompt
    assert wave_descriptions("Done.\nw1: DEPTH 8 -> 10\n- w2: `SwiGLU`\nw1: again\n") == \
        {"w1": "DEPTH 8 -> 10", "w2": "SwiGLU"}


def test_workers_get_one_accelerator_each_or_a_share_of_the_cpus():
    assert worker_resources("cuda", 8, 64, 8).num_gpus == 1
    shared = worker_resources("cuda", 4, 16, 1)
    assert shared.num_gpus == 0.25 and "share" in shared.reason
    cpu = worker_resources("cpu", 2, 2, 0)
    assert (cpu.num_cpus, cpu.num_gpus, cpu.threads) == (1, 0, 1)
    assert worker_resources("cpu", 3, 16, 0).threads == 5


def test_without_ray_more_than_one_worker_says_what_to_install(monkeypatch):
    from loop.cluster import require_ray
    from loop.errors import SessionError

    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    with pytest.raises(SessionError) as caught:
        require_ray()
    assert "autoresearch[ray]" in caught.value.hint


def test_a_wave_without_workers_is_a_usage_error(session):
    result = cli(session, "loop", "--agent", "mutate", "--wave", "--max", "1")
    assert result.returncode == 2 and "--wave needs more than one worker" in result.stderr
    assert experiments(session) == []
