"""The ratchet: sessions, `try` one change, keep or revert with git, and survive `kill -9`.

One session per repository is active at a time (`state_dir/active-session.json`), and one process
at a time works on it (`state_dir/session.lock`: pid, host, start time, command; a lock whose
process is dead on this host is stale and taken over). A `try` launched by an agent that `loop`
started inherits the loop's lock through `AUTORESEARCH_LOCK_TOKEN`, so agents may call `try`
themselves too.

`try` is the one atomic step of the search. In order:

1. the manifest is verified: a changed file under `harness/` or outside the working tree (session
   config, tokenizer, validation tokens) stops the session, naming the file, with nothing touched;
2. a change to anything but the session's trainer (tracked, untracked, committed by the agent,
   or a move off the session branch) is `rejected` and reverted, tracked and untracked files alike
   (the frozen files inside the tree, `program.md`, `presets/`, `pyproject.toml`, are restored
   this way: git holds them);
3. a trainer whose SHA-256 was tried before is not run again: the earlier verdict is reused and
   no row is appended (it was not an experiment; the line printed says which commit it repeats).
   An earlier `keep` that has since been beaten is reused as `discard`; `crash` stays `crash`.
   Interrupted experiments and rejected changes are not reused;
4. the trainer is committed on the session branch (the agent's own commits are squashed into it);
5. it runs with the session's hard timeout, and under the session's own copy of the run config;
6. the verdict comes from `loop.decide` (a close call under the noise rule is run once more);
   the manifest is checked again first: a run that changed a frozen file is `rejected`;
7. on discard or crash the branch is reset to the best commit; the tree is then exactly the best
   commit (untracked files a run left behind are removed, ignored files are kept);
8. the row is appended to the session ledger and the repository's `results.tsv` is refreshed;
9. the caller prints one line.

Crash safety: before anything irreversible, the experiment in flight is written to the session's
journal (atomic replace + fsync), phase by phase:

    baseline  the baseline runs are under way (their rows are appended one by one)
    commit    about to commit the candidate (best commit, description, trainer hash)
    run       the candidate commit exists and is being trained (its runs so far)
    decided   the verdict and its whole row are known; git is being moved to the target commit
              (candidate on keep, best otherwise) and the row appended

Recovery (`session resume`, and the start of every `try` and `loop`) reads the journal: `baseline`
finishes the missing baseline runs; `commit` and `run` record the experiment as a `crash` with
reason "interrupted ..." (it was never scored; its trainer may be tried again) and go on as
`decided`; `decided` resets git to the target commit and appends the row unless it is already the
ledger's last. A trainer orphaned by the dead process is killed first (found by the marker in its
environment, on Linux). So after `kill -9` at any moment git is on the best commit or on the
candidate, results hold whole rows only, and no earlier row is lost. A full disk fails the
append; the journal keeps the row, and `resume` appends it once space is back. Ctrl-C is held
during the short git/journal/ledger steps, so it lands in a run (the trainer is killed and the
experiment recorded as interrupted) or between steps, never inside one.

State lives in the ledger (`sessions/TAG/results.tsv`, outside the working tree, so neither an
agent's edits nor `git clean` touch it): the best is the last `keep` row (else the mean of the `baseline` rows), sigma is the
spread of the baseline rows, the tried trainers are the rows' `trainer_sha`. The repository's
`results.tsv` is a copy, rewritten whole after every append.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import statistics
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from harness.config import default_config_path, load_config
from harness.paths import state_dir, trainer_path
from harness.runner import RunOutcome, run_experiment
from harness.session import (
    Mismatch,
    SessionConfig,
    SessionPaths,
    atomic_write_text,
    build_manifest,
    load_session_config,
    now_utc,
    save_manifest,
    save_session_config,
    sessions_dir,
    sha256_file,
    verify_manifest,
)
from loop.decide import DEFAULT_MIN_FLOOR, DEFAULT_Z, RULES, decide, noise_floor
from loop.results import ResultRow, append_row, read_rows, sanitize

ACTIVE_FILE = "active-session.json"
LOCK_FILE = "session.lock"
RESULTS_NAME = "results.tsv"
LOCK_TOKEN_ENV = "AUTORESEARCH_LOCK_TOKEN"
MARKER_ENV = "AUTORESEARCH_EXPERIMENT"  # in every trainer's environment, to find orphans
KILL_AT_ENV = "AUTORESEARCH_TEST_KILL_AT"  # tests: SIGKILL this process at the named point
INTERRUPTED = "interrupted"
NO_COMMIT = "-"  # the commit column of a row whose change was never committed

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


class SessionError(Exception):
    """Something the user must fix; `hint` says how."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class FrozenEvaluatorError(SessionError):
    """A frozen file changed: the session stops until it is restored."""

    exit_code = 2

    def __init__(self, mismatches: list[Mismatch], best_commit: str, when: str = "before this experiment"):
        names = ", ".join(str(m) for m in mismatches)
        in_tree = [m.path for m in mismatches if m.in_tree]
        hint = "Nothing was run or recorded. " if when == "before this experiment" else ""
        if in_tree:
            hint += (f"Restore the file(s) with `git checkout {best_commit[:7]} -- {' '.join(in_tree)}`, then "
                     "`autoresearch try` again (or `autoresearch session resume` to continue a loop). ")
        if len(in_tree) < len(mismatches):
            hint += "Files outside the repository cannot be restored by git: re-run `autoresearch setup` and start a new session. "
        hint += "Changing the evaluator means a new session (a new comparison track)."
        super().__init__(f"the frozen evaluator changed {when}: {names}", hint.strip())
        self.mismatches = mismatches


class BaselineFailed(SessionError):
    """The unchanged trainer did not run; `log_tail` keeps the end of its log (a failed start
    removes the session's files, logs included)."""

    def __init__(self, outcome: RunOutcome):
        super().__init__(f"a baseline run failed ({outcome.status}): {outcome.reason}",
                         "the unchanged trainer must run before a session can measure anything: fix it, commit, "
                         "and start again (`autoresearch run` runs it alone)")
        self.log_tail = outcome.log_tail(20)


def _test_kill_point(name: str) -> None:
    """Let tests kill this process at a chosen moment, as `kill -9` would."""
    if os.environ.get(KILL_AT_ENV) == name:
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


@contextmanager
def _deferred_interrupt() -> Iterator[None]:
    """Hold Ctrl-C until a short critical section (git + journal + ledger) is done, so that an
    interrupt lands between phases, never inside one. No-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


# -- the lock -------------------------------------------------------------------------------------

def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    if pid <= 0:
        return False
    if os.name == "nt":
        import ctypes

        handle = ctypes.windll.kernel32.OpenProcess(0x1000, False, pid)  # QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        ctypes.windll.kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        ctypes.windll.kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


@dataclass(frozen=True)
class LockHolder:
    pid: int
    host: str
    started: str
    command: str
    token: str

    @property
    def stale(self) -> bool:
        return self.host == socket.gethostname() and not pid_alive(self.pid)

    def describe(self) -> str:
        return f"`{self.command}` (pid {self.pid} on {self.host}, since {self.started})"


class RepoLock:
    """One process at a time works on a repository's session. Created with O_EXCL; a lock left by
    a dead process on this host is taken over. Use as a context manager."""

    CREATING_GRACE_S = 10.0  # an empty lock file younger than this is being written right now

    def __init__(self, root: Path, command: str):
        self.path = state_dir(root) / LOCK_FILE
        self.command = command
        self.token = secrets.token_hex(8)
        self.nested = False
        self.held = False

    def holder(self) -> LockHolder | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return LockHolder(int(data["pid"]), str(data["host"]), str(data["started"]),
                              str(data.get("command", "?")), str(data.get("token", "")))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def acquire(self) -> "RepoLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        inherited = os.environ.get(LOCK_TOKEN_ENV)
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder()
                if holder is not None and inherited and holder.token == inherited and not holder.stale:
                    self.nested = True  # called by an agent that our own loop started
                    return self
                if holder is None and self._young():
                    time.sleep(0.2)
                    continue
                if holder is None or holder.stale:
                    self.path.unlink(missing_ok=True)
                    continue
                raise SessionError(
                    f"the session is busy: {holder.describe()} is working on it",
                    f"wait for it or stop it; if that process no longer exists, delete {self.path}",
                )
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": now_utc(),
                           "command": self.command, "token": self.token}, f)
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            return self
        raise SessionError(f"could not take the session lock {self.path}", "try again in a moment")

    def _young(self) -> bool:
        try:
            return time.time() - self.path.stat().st_mtime < self.CREATING_GRACE_S
        except OSError:
            return False

    def release(self) -> None:
        if self.held:
            holder = self.holder()
            if holder is not None and holder.token == self.token:
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "RepoLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# -- the journal ----------------------------------------------------------------------------------

def read_journal(paths: SessionPaths) -> dict | None:
    try:
        return json.loads(paths.journal.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError:
        return None  # a torn journal cannot exist (atomic replace); an unreadable one says nothing


def write_journal(paths: SessionPaths, entry: dict) -> None:
    atomic_write_text(paths.journal, json.dumps(entry, indent=1, sort_keys=True))


def clear_journal(paths: SessionPaths) -> None:
    paths.journal.unlink(missing_ok=True)


def kill_marked_processes(marker: str) -> int:
    """Kill the process groups of processes whose environment holds `MARKER_ENV=marker`: a
    trainer orphaned when the loop died. Linux only (reads /proc); elsewhere an orphan runs to its
    own end (its budget plus evaluation) and its result is ignored. Returns how many it killed."""
    proc = Path("/proc")
    if not marker or not proc.is_dir() or os.name == "nt":
        return 0
    needle = f"{MARKER_ENV}={marker}".encode()
    victims = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                victims.append(int(entry.name))
        except OSError:
            continue
    for pid in victims:
        try:
            group = os.getpgid(pid)
            if group == os.getpgrp():
                os.kill(pid, signal.SIGKILL)
            else:
                os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            continue
    deadline = time.monotonic() + 5
    while victims and time.monotonic() < deadline:
        victims = [pid for pid in victims if _running(pid)]
        time.sleep(0.05)
    return len(victims)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


# -- git --------------------------------------------------------------------------------------------

class Git:
    """The few git operations the ratchet needs (GitPython), with errors that say what to do."""

    def __init__(self, root: Path):
        import git

        self._git = git
        try:
            self.repo = git.Repo(root)
        except (git.InvalidGitRepositoryError, git.NoSuchPathError):
            raise SessionError(f"{root} is not a git repository",
                               "a session lives on a git branch: `git init && git add -A && git commit -m start`") from None
        self.root = Path(self.repo.working_tree_dir or root)

    def _run(self, *args: str, **kwargs) -> str:
        return getattr(self.repo.git, args[0])(*args[1:], **kwargs)

    def head(self) -> str | None:
        try:
            return self.repo.head.commit.hexsha
        except ValueError:
            return None

    def branch(self) -> str | None:
        return None if self.repo.head.is_detached else self.repo.active_branch.name

    def branch_exists(self, name: str) -> bool:
        return name in {h.name for h in self.repo.heads}

    def valid_branch_name(self, name: str) -> bool:
        try:
            self._run("check_ref_format", "--branch", name)
            return True
        except self._git.GitCommandError:
            return False

    def dirty(self) -> list[str]:
        """Every path that differs from HEAD, untracked (not ignored) files included."""
        changed = _split(self._run("diff", "--name-only", "--no-renames", "-z", "HEAD"))
        return sorted(set(changed) | set(self.untracked()))

    def tracked(self, path: str) -> bool:
        return bool(self._run("ls_files", "--", path).strip())

    def untracked(self) -> list[str]:
        return _split(self._run("ls_files", "--others", "--exclude-standard", "-z"))

    def changes_since(self, commit: str) -> list[str]:
        """Paths where the working tree differs from `commit` (committed, staged or not, untracked)."""
        changed = _split(self._run("diff", "--name-only", "--no-renames", "-z", commit))
        return sorted(set(changed) | set(self.untracked()))

    def create_branch(self, name: str) -> None:
        self._run("checkout", "-b", name)

    def ensure_ignored(self, name: str) -> None:
        """Make git ignore `name` in this clone (through .git/info/exclude) if nothing does yet."""
        try:
            self._run("check_ignore", "-q", name)
            return
        except self._git.GitCommandError:
            pass
        exclude = Path(self.repo.git_dir) / "info" / "exclude"
        exclude.parent.mkdir(parents=True, exist_ok=True)
        text = exclude.read_text() if exclude.exists() else ""
        exclude.write_text(text + ("" if text.endswith("\n") or not text else "\n") + f"/{name}\n")

    def commit_file(self, base: str, path: str, message: str) -> str:
        """Commit `path` as it is in the working tree on top of `base` (the agent's own commits
        since `base` are squashed into this one); returns the new commit's sha."""
        if self.head() != base:
            self._run("reset", "--soft", base)
        self._run("add", "-A", "--", path)
        with self.repo.git.custom_environment(**self._identity()):
            self.repo.git(c="commit.gpgsign=false").commit("--no-verify", "--allow-empty", "-q",
                                                           "-m", message, "--", path)
        return self.head() or ""

    def _identity(self) -> dict[str, str]:
        env: dict[str, str] = {}
        reader = self.repo.config_reader()
        for key, default in (("name", "autoresearch"), ("email", "autoresearch@localhost")):
            try:
                reader.get_value("user", key)
            except Exception:  # configparser errors: no such section / option
                if f"GIT_AUTHOR_{key.upper()}" not in os.environ:
                    env[f"GIT_AUTHOR_{key.upper()}"] = default
                    env[f"GIT_COMMITTER_{key.upper()}"] = default
        return env

    def restore(self, branch: str, commit: str) -> None:
        """Put the session branch and the whole working tree exactly on `commit` (ignored files
        aside): back on the branch if HEAD left it, hard reset, untracked files removed."""
        if self.branch() != branch:
            self._run("checkout", "-f", branch)
        self._run("reset", "-q", "--hard", commit)
        self._run("clean", "-q", "-f", "-d")

    def resolve(self, rev: str) -> str:
        try:
            return self._run("rev_parse", "--verify", "-q", f"{rev}^{{commit}}")
        except self._git.GitCommandError:
            raise SessionError(f"commit {rev} is not in this repository",
                               "the session's history was rewritten; start a new session") from None

    def is_ancestor(self, ancestor: str, descendant: str) -> bool:
        try:
            self._run("merge_base", "--is-ancestor", ancestor, descendant)
            return True
        except self._git.GitCommandError:
            return False

    def message(self, commit: str) -> str:
        return self.repo.commit(commit).message.strip()

    def parents(self, commit: str) -> list[str]:
        return [p.hexsha for p in self.repo.commit(commit).parents]

    def remove_stale_index_lock(self) -> bool:
        """A git command killed mid-way leaves `index.lock`; only called while we hold the
        session lock after our own process died, so it is ours."""
        lock = Path(self.repo.git_dir) / "index.lock"
        if lock.exists():
            lock.unlink(missing_ok=True)
            return True
        return False

    def delete_branch(self, name: str) -> None:
        self._run("branch", "-D", name)

    def checkout(self, ref: str) -> None:
        self._run("checkout", "-q", "-f", ref)


def _split(output: str) -> list[str]:
    return [p for p in output.split("\0") if p]


# -- results ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Standing:
    """Where the session stands, derived from its ledger."""

    best_commit: str  # full sha
    best_bpb: float | None
    best_runs: list[float]
    baseline_runs: list[float]
    sigma: float
    floor: float
    tried: dict[str, ResultRow]  # trainer sha -> the row that judged it
    rows: list[ResultRow]

    @property
    def baseline_bpb(self) -> float | None:
        return statistics.fmean(self.baseline_runs) if self.baseline_runs else None


@dataclass
class TryResult:
    """What one `try` did; `line()` is what the agent reads."""

    verdict: str  # keep | discard | crash | rejected | unchanged
    val_bpb: float | None
    best_bpb: float | None  # the best after this verdict
    previous_best: float | None
    noise_floor: float
    sigma: float
    commit: str = ""  # the candidate's short sha ("" if none)
    reason: str = ""
    description: str = ""
    reused_from: str = ""  # the commit whose verdict was reused
    runs: list[float] = field(default_factory=list)
    log: str = ""
    row: ResultRow | None = None

    @property
    def delta(self) -> float | None:
        if self.val_bpb is None or self.previous_best is None:
            return None
        return self.val_bpb - self.previous_best

    def line(self) -> str:
        def num(value: float | None, fmt: str = ".6f") -> str:
            return "-" if value is None else format(value, fmt)

        delta = "-" if self.delta is None else f"{self.delta:+.6f}"
        head = (f"{self.verdict} val_bpb={num(self.val_bpb)} best={num(self.best_bpb)} delta={delta} "
                f"noise_floor={num(self.noise_floor)} commit={self.commit or '-'}")
        if self.reused_from:
            head += f" reused_from={self.reused_from}"
        return f"{head} | {self.reason}" if self.reason else head

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("row")
        data["delta"] = self.delta
        return data


# -- the session ------------------------------------------------------------------------------------

def active_file(root: Path) -> Path:
    return state_dir(root) / ACTIVE_FILE


def active_tag(root: Path) -> str | None:
    try:
        return json.loads(active_file(root).read_text(encoding="utf-8"))["tag"]
    except (OSError, ValueError, KeyError):
        return None


def default_timeout(time_budget: float) -> float:
    """Twice the budget plus five minutes for start-up, compilation and evaluation (upstream
    kills at ten minutes for a five-minute budget)."""
    return 2 * time_budget + 300


class Session:
    """An active session of a repository. Methods that change anything expect the caller to
    hold the RepoLock."""

    def __init__(self, root: Path, config: SessionConfig, paths: SessionPaths, git: Git):
        self.root = root
        self.config = config
        self.paths = paths
        self.git = git

    # -- opening and starting ------------------------------------------------------------------
    @classmethod
    def active(cls, root: Path) -> "Session":
        tag = active_tag(root)
        if tag is None:
            raise SessionError("no active session in this repository", "start one: `autoresearch session start TAG`")
        return cls.open(root, tag)

    @classmethod
    def open(cls, root: Path, tag: str) -> "Session":
        paths = SessionPaths.of(root, tag)
        try:
            config = load_session_config(paths)
        except FileNotFoundError:
            raise SessionError(f"session {tag!r} has no configuration at {paths.config}",
                               "its files are gone; start a new session") from None
        return cls(root, config, paths, Git(root))

    @classmethod
    def start(cls, root: Path, tag: str, rule: str = "noise", z: float = DEFAULT_Z,
              min_floor: float = DEFAULT_MIN_FLOOR, repeats: int | None = None, timeout: float | None = None,
              log: Log = _quiet, progress: Log | None = None) -> "Session":
        """Create the session (branch, config, manifest) and measure the baseline. The caller
        holds the lock. On a failed baseline everything it created is removed again."""
        if rule not in RULES:
            raise SessionError(f"unknown rule {rule!r}", f"use one of: {', '.join(RULES)}")
        if z <= 0 or min_floor < 0:
            raise SessionError("--z must be positive and --min-floor not negative")
        git = Git(root)
        existing = active_tag(root)
        if existing is not None:
            raise SessionError(f"session {existing!r} is still active in this repository",
                               "finish it first with `autoresearch session end` (or continue it: `autoresearch session resume`)")
        branch = f"autoresearch/{tag}"
        if not tag or "/" in tag or not git.valid_branch_name(branch):
            raise SessionError(f"{tag!r} is not a usable session tag", "use letters, digits, '.', '-' or '_', e.g. the date: mar5")
        if git.head() is None:
            raise SessionError("the repository has no commit yet", "commit the project first: `git add -A && git commit -m start`")
        dirty = git.dirty()
        if dirty:
            shown = ", ".join(dirty[:10]) + (f" and {len(dirty) - 10} more" if len(dirty) > 10 else "")
            raise SessionError(f"the working tree has uncommitted changes: {shown}",
                               "commit them (after `autoresearch setup`, commit the trainer constants it wrote), "
                               "remove them, or add them to .gitignore; a session starts from a clean commit")
        if git.tracked(RESULTS_NAME):
            raise SessionError(f"{RESULTS_NAME} is tracked by git, but a session writes it after every experiment",
                               f"untrack it: `git rm --cached {RESULTS_NAME} && echo {RESULTS_NAME} >> .gitignore "
                               "&& git commit -am 'untrack results'`")
        paths = SessionPaths.of(root, tag)
        if git.branch_exists(branch) or paths.directory.exists():
            suggestion = _free_tag(git, root, tag)
            raise SessionError(f"branch {branch} already exists" if git.branch_exists(branch)
                               else f"a session named {tag!r} existed before (its files are in {paths.directory})",
                               f"pick another tag, e.g. `autoresearch session start {suggestion}`")
        try:
            run = load_config(default_config_path(root))
        except FileNotFoundError:
            raise SessionError("this repository is not set up", "run `autoresearch setup` first") from None
        trainer = trainer_path(root, run.backend)
        if not trainer.is_file():
            raise SessionError(f"the trainer {trainer} does not exist", "check the backend chosen by `autoresearch setup`")
        repeats = repeats or run.evaluator.BASELINE_REPEATS
        if repeats < 1:
            raise SessionError("--repeats must be at least 1")
        if repeats == 1 and rule == "noise":
            log("warning: one baseline run cannot measure noise; the noise rule will use only the minimum floor")
        base = git.head() or ""
        config = SessionConfig(
            tag=tag, branch=branch, backend=run.backend, preset=run.preset, rule=rule, z=float(z),
            min_floor=float(min_floor), repeats=int(repeats),
            timeout=float(timeout or default_timeout(run.evaluator.TIME_BUDGET)),
            trainer=trainer.relative_to(root).as_posix(), base_commit=base, run=run, created=now_utc(),
        )
        previous_branch = git.branch() or base
        save_session_config(config, paths)
        save_manifest(build_manifest(root, config, paths), paths)
        git.create_branch(branch)
        git.ensure_ignored(RESULTS_NAME)
        session = cls(root, config, paths, git)
        session._adopt_results_file()
        atomic_write_text(active_file(root), json.dumps({"tag": tag}))
        write_journal(paths, {"phase": "baseline"})
        log(f"session {tag}: branch {branch}, {config.backend} / {config.preset}, rule {rule}, "
            f"baseline x{repeats}, timeout {config.timeout:g} s")
        try:
            session.run_baseline(log, progress)
        except (BaselineFailed, KeyboardInterrupt):
            session._abandon(previous_branch)
            raise
        return session

    def _adopt_results_file(self) -> None:
        """A results.tsv already in the repository belongs to an earlier run: keep it beside the
        session's files rather than mixing rows of two comparison tracks."""
        existing = self.root / RESULTS_NAME
        if existing.exists():
            shutil.move(str(existing), str(self.paths.directory / "previous-results.tsv"))

    def _abandon(self, previous_branch: str) -> None:
        """Undo a session start whose baseline failed, so the same tag can be used again."""
        clear_journal(self.paths)
        self.git.remove_stale_index_lock()
        self.git.checkout(previous_branch)
        self.git.delete_branch(self.config.branch)
        previous = self.paths.directory / "previous-results.tsv"
        (self.root / RESULTS_NAME).unlink(missing_ok=True)
        if previous.exists():
            shutil.move(str(previous), str(self.root / RESULTS_NAME))
        active_file(self.root).unlink(missing_ok=True)
        shutil.rmtree(self.paths.directory, ignore_errors=True)

    # -- what the ledger says ----------------------------------------------------------------------
    def rows(self) -> list[ResultRow]:
        try:
            return read_rows(self.paths.ledger)
        except FileNotFoundError:
            return []

    def standing(self) -> Standing:
        rows = self.rows()
        baseline = [r.val_bpb for r in rows if r.status == "baseline" and r.scored]
        kept = [r for r in rows if r.status == "keep" and r.scored]
        sigma = statistics.stdev(baseline) if len(baseline) >= 2 else 0.0
        if kept:
            best_commit, best_runs = self.git.resolve(kept[-1].commit), [kept[-1].val_bpb]
        else:
            best_commit, best_runs = self.config.base_commit, baseline
        tried = {r.trainer_sha: r for r in rows
                 if r.trainer_sha and r.status in ("keep", "discard", "crash", "baseline")
                 and not r.reason.startswith(INTERRUPTED)}
        return Standing(
            best_commit=best_commit,
            best_bpb=statistics.fmean(best_runs) if best_runs else None,
            best_runs=best_runs, baseline_runs=baseline, sigma=sigma,
            floor=noise_floor(sigma, self.config.z, self.config.min_floor) if self.config.rule == "noise" else 0.0,
            tried=tried, rows=rows,
        )

    def trainer_sha(self) -> str:
        path = self.root / self.config.trainer
        return sha256_file(path) if path.is_file() else "missing"

    def frozen_mismatches(self) -> list[Mismatch]:
        return verify_manifest(self.root, self.config, self.paths)

    @staticmethod
    def fatal(mismatches: list[Mismatch]) -> list[Mismatch]:
        """Mismatches that stop the session: the evaluator's code (`harness/`) and everything
        outside the working tree. Other frozen files in the tree are restored by rejecting."""
        return [m for m in mismatches if not m.in_tree or m.path.startswith("harness/")]

    def check_frozen(self, best_commit: str, when: str = "before this experiment") -> None:
        fatal = self.fatal(self.frozen_mismatches())
        if fatal:
            raise FrozenEvaluatorError(fatal, best_commit, when)

    def _append(self, row: ResultRow) -> None:
        append_row(self.paths.ledger, row)
        self.publish_results()

    def publish_results(self) -> None:
        """Rewrite the repository's results.tsv as a copy of the ledger."""
        if self.paths.ledger.exists():
            atomic_write_text(self.root / RESULTS_NAME, self.paths.ledger.read_text(encoding="utf-8"))

    def _row(self, **fields) -> ResultRow:
        run = self.config.run
        fields.setdefault("backend", run.backend)
        fields.setdefault("preset", run.preset)
        fields.setdefault("device", run.device)
        return ResultRow(**fields)

    def _log_path(self, number: int, commit: str, attempt: int) -> Path:
        suffix = f"-run{attempt + 1}" if attempt else ""
        return self.paths.logs / f"{number:04d}-{commit[:7] or 'nocommit'}{suffix}.log"

    def _run(self, log_path: Path, marker: str, progress: Log | None) -> RunOutcome:
        def on_progress(line: str) -> None:
            _test_kill_point("training")
            if progress:
                progress(line)

        return run_experiment(self.root, self.config.backend, self.paths.run_config, log_path,
                              timeout=self.config.timeout, extra_env={MARKER_ENV: marker},
                              on_progress=on_progress)

    # -- the baseline --------------------------------------------------------------------------
    def run_baseline(self, log: Log = _quiet, progress: Log | None = None) -> None:
        """Run the unchanged trainer until the session has `repeats` baseline rows."""
        trainer_sha = self.trainer_sha()
        while True:
            values = [r.val_bpb for r in self.rows() if r.status == "baseline"]
            if len(values) >= self.config.repeats:
                break
            self.check_frozen(self.config.base_commit, "during the baseline")
            number = len(values) + 1
            marker = f"{self.config.tag}:baseline:{number}:{secrets.token_hex(4)}"
            write_journal(self.paths, {"phase": "baseline", "marker": marker})
            log(f"baseline run {number}/{self.config.repeats}")
            outcome = self._run(self.paths.logs / f"baseline-{number}.log", marker, progress)
            if not outcome.ok:
                raise BaselineFailed(outcome)
            values.append(outcome.val_bpb)
            summary = outcome.summary or {}
            row = self._row(
                commit=self.config.base_commit[:7], val_bpb=outcome.val_bpb,
                memory_gb=_memory_gb([outcome]), status="baseline",
                description=f"baseline run {number}/{self.config.repeats}",
                seconds=outcome.seconds, num_steps=summary.get("num_steps"),
                tokens_per_sec=summary.get("tokens_per_sec"), device=str(summary.get("device") or self.config.run.device),
                best_bpb=statistics.fmean(values),
                noise_sigma=statistics.stdev(values) if len(values) >= 2 else None,
                trainer_sha=trainer_sha,
            )
            with _deferred_interrupt():
                self._append(row)
            log(f"  val_bpb {outcome.val_bpb:.6f} ({outcome.seconds:.0f} s)")
        clear_journal(self.paths)

    # -- recovery ------------------------------------------------------------------------------
    def recover(self, log: Log = _quiet, progress: Log | None = None) -> ResultRow | None:
        """Finish or roll back whatever a dead process left in the journal (see the module
        docstring); returns the row it recorded, if any. Safe to call at any time."""
        entry = read_journal(self.paths)
        if entry is None:
            return None
        self.git.remove_stale_index_lock()
        kill_marked_processes(entry.get("marker", ""))
        phase = entry.get("phase")
        if phase == "baseline":
            log("finishing the baseline interrupted earlier")
            self.git.restore(self.config.branch, self.config.base_commit)  # the baseline is the base trainer
            self.run_baseline(log, progress)
            return None
        if phase in ("commit", "run"):
            candidate = entry.get("candidate") or self._orphan_commit(entry)
            if entry.get("violation"):
                status, reason = "rejected", entry["violation"]
            else:
                status = "crash"
                reason = f"{INTERRUPTED} during the {phase} phase (the process died); never scored"
            standing = self.standing()
            row = self._row(commit=candidate[:7] if candidate else NO_COMMIT, val_bpb=0.0, memory_gb=0.0,
                            status=status, description=entry.get("description", ""), best_bpb=standing.best_bpb,
                            noise_sigma=standing.sigma, reason=reason, trainer_sha=entry.get("trainer_sha", ""))
            entry = {"phase": "decided", "target": entry["best"], "row": row.to_dict()}
            write_journal(self.paths, entry)
        row = ResultRow(**entry["row"])
        with _deferred_interrupt():
            self.git.restore(self.config.branch, entry["target"])
            if not self._is_last_row(row):
                self._append(row)
            else:
                self.publish_results()
            clear_journal(self.paths)
        log(f"recovered the interrupted experiment: {row.status} {row.commit} {row.description} ({row.reason})")
        return row

    def _orphan_commit(self, entry: dict) -> str | None:
        """The candidate committed just before the process died, before the journal said so."""
        head = self.git.head()
        best = entry.get("best")
        if head and head != best and self.git.parents(head) == [best] \
                and self.git.message(head) == entry.get("description", "").strip():
            return head
        return None

    def _is_last_row(self, row: ResultRow) -> bool:
        rows = self.rows()
        if not rows:
            return False
        last = rows[-1]
        return (last.timestamp, last.commit, last.status, last.description) == \
            (row.timestamp, row.commit, row.status, row.description)

    # -- try -----------------------------------------------------------------------------------
    def try_change(self, description: str, log: Log = _quiet, progress: Log | None = None) -> TryResult:
        """Judge the working tree's change to the trainer (see the module docstring)."""
        self.recover(log, progress)
        standing = self.standing()
        best = standing.best_commit
        self.check_frozen(best)
        # One line: it is both the commit's subject and the results description.
        description = sanitize(description) or "(no description)"
        common = dict(previous_best=standing.best_bpb, noise_floor=standing.floor, sigma=standing.sigma,
                      description=description)

        changed = self.git.changes_since(best)
        off_branch = self.git.branch() != self.config.branch
        if not changed and not off_branch:
            return TryResult("unchanged", None, standing.best_bpb, reason="the trainer is the best commit's: nothing to try",
                             **common)
        others = [p for p in changed if p != self.config.trainer]
        if others or off_branch:
            reason = (f"HEAD left the session branch {self.config.branch}; " if off_branch else "") + \
                (f"changed files other than {self.config.trainer}: {_names(others)}" if others else "")
            return self._reject(standing, description, reason.strip("; "), common)

        sha = self.trainer_sha()
        known = standing.tried.get(sha)
        if known is not None:
            with _deferred_interrupt():
                self.git.restore(self.config.branch, best)
            verdict = "crash" if known.status == "crash" else "discard"
            when = f"identical to the trainer of {known.commit} ({known.status}"
            when += ", since beaten)" if known.status in ("keep", "baseline") else ")"
            return TryResult(verdict, known.val_bpb if known.scored else None, standing.best_bpb,
                             reason=f"{when}: not run again" + (f"; {known.reason}" if known.reason else ""),
                             reused_from=known.commit, **common)
        try:
            return self._experiment(standing, description, sha, common, log, progress)
        except KeyboardInterrupt:  # Ctrl-C: the runner killed the trainer; record it, revert
            self.recover(log)
            raise

    def _reject(self, standing: Standing, description: str, reason: str, common: dict) -> TryResult:
        row = self._row(commit=NO_COMMIT, val_bpb=0.0, memory_gb=0.0, status="rejected", description=description,
                        best_bpb=standing.best_bpb, noise_sigma=standing.sigma, reason=reason,
                        trainer_sha=self.trainer_sha())
        self._settle(standing.best_commit, row)
        self.check_frozen(standing.best_commit, "and could not be restored")
        return TryResult("rejected", None, standing.best_bpb, reason=row.reason, row=row, **common)

    def _settle(self, target: str, row: ResultRow) -> None:
        """The end of every judged change: journal the verdict, move git, append the row."""
        with _deferred_interrupt():
            write_journal(self.paths, {"phase": "decided", "target": target, "row": row.to_dict()})
        _test_kill_point("decided")
        with _deferred_interrupt():
            self.git.restore(self.config.branch, target)
            _test_kill_point("reverted")
            self._append(row)
            clear_journal(self.paths)

    def _experiment(self, standing: Standing, description: str, sha: str, common: dict,
                    log: Log, progress: Log | None) -> TryResult:
        best = standing.best_commit
        number = len(standing.rows) + 1
        marker = f"{self.config.tag}:{number}:{secrets.token_hex(4)}"
        entry = {"phase": "commit", "best": best, "description": description, "trainer_sha": sha,
                 "marker": marker, "runs": []}
        with _deferred_interrupt():
            write_journal(self.paths, entry)
            candidate = self.git.commit_file(best, self.config.trainer, description)
            entry.update(phase="run", candidate=candidate)
            write_journal(self.paths, entry)
        _test_kill_point("committed")
        short = candidate[:7]
        log(f"experiment {number}: {description} ({short})")

        outcomes = [self._run(self._log_path(number, candidate, 0), marker, progress)]
        values: list[float | None] = [outcomes[0].val_bpb if outcomes[0].ok else None]
        decision = decide(values, standing.best_runs, standing.sigma, self.config.rule, self.config.z,
                          self.config.min_floor)
        if decision.rerun_needed:
            entry["runs"] = values
            write_journal(self.paths, entry)
            log(f"  {decision.reason}")
            outcomes.append(self._run(self._log_path(number, candidate, 1), marker, progress))
            values.append(outcomes[1].val_bpb if outcomes[1].ok else None)
            decision = decide(values, standing.best_runs, standing.sigma, self.config.rule, self.config.z,
                              self.config.min_floor)

        verdict, reason = decision.verdict, decision.reason
        failed = next((o for o in outcomes if not o.ok), None)
        if failed is not None:
            which = "the re-run " if len(outcomes) > 1 and outcomes[0].ok else ""
            kind = "" if failed.status == "crash" else f"{failed.status}: "  # timeout, diverged
            verdict, reason = "crash", f"{which}{kind}{failed.reason}"
        changed_frozen = self.frozen_mismatches()
        if changed_frozen:
            verdict = "rejected"
            reason = f"the run changed frozen files: {_names([str(m) for m in changed_frozen])}"
            entry["violation"] = reason
            write_journal(self.paths, entry)

        scored = verdict in ("keep", "discard")
        new_best = decision.val_bpb if verdict == "keep" else standing.best_bpb
        last = outcomes[-1]
        summary = last.summary or {}
        row = self._row(
            commit=short, val_bpb=decision.val_bpb if scored else 0.0,
            memory_gb=_memory_gb(outcomes) if scored else 0.0, status=verdict, description=description,
            seconds=sum(o.seconds for o in outcomes), num_steps=summary.get("num_steps"),
            tokens_per_sec=summary.get("tokens_per_sec"),
            device=str(summary.get("device") or self.config.run.device),
            best_bpb=new_best, noise_sigma=standing.sigma, reason=reason, trainer_sha=sha,
        )
        self._settle(candidate if verdict == "keep" else best, row)
        if changed_frozen:
            self.check_frozen(best, "during the run and could not be restored")
        return TryResult(verdict, decision.val_bpb if scored else None, new_best, commit=short, reason=reason,
                         runs=[v for v in values if v is not None], log=str(last.log_path), row=row, **common)

    # -- status and end ------------------------------------------------------------------------
    def status(self) -> dict:
        standing = self.standing()
        counts: dict[str, int] = {}
        for row in standing.rows:
            counts[row.status] = counts.get(row.status, 0) + 1
        journal = read_journal(self.paths)
        holder = RepoLock(self.root, "status").holder()
        return {
            "tag": self.config.tag, "branch": self.config.branch, "backend": self.config.backend,
            "preset": self.config.preset, "device": self.config.run.device, "rule": self.config.rule,
            "z": self.config.z, "min_floor": self.config.min_floor, "timeout": self.config.timeout,
            "trainer": self.config.trainer, "created": self.config.created,
            "baseline_bpb": standing.baseline_bpb, "baseline_runs": standing.baseline_runs,
            "sigma": standing.sigma, "noise_floor": standing.floor,
            "best_bpb": standing.best_bpb, "best_commit": standing.best_commit[:7],
            "experiments": sum(v for k, v in counts.items() if k != "baseline"), "counts": counts,
            "head": (self.git.head() or "")[:7], "on_branch": self.git.branch() == self.config.branch,
            "pending_changes": self.git.changes_since(standing.best_commit) if self.git.head() else [],
            "in_flight": journal.get("phase") if journal else None,
            "busy": None if holder is None or holder.stale or holder.pid == os.getpid() else holder.describe(),
            "loop": read_loop_state(self.paths),
            "results": str(self.paths.ledger),
        }

    def end(self) -> dict:
        """Close the session: the branch, the ledger and the logs stay; another session may start."""
        self.recover()
        status = self.status()
        plan = read_loop_state(self.paths)
        if plan and plan.get("state") == "running":
            write_loop_state(self.paths, {**plan, "state": "ended"})
        active_file(self.root).unlink(missing_ok=True)
        return status


def _memory_gb(outcomes: list[RunOutcome]) -> float:
    peaks = [o.summary.get("peak_vram_mb") for o in outcomes if o.summary]
    peaks = [p for p in peaks if isinstance(p, (int, float))]
    return round(max(peaks) / 1024, 1) if peaks else 0.0


def _names(paths: list[str], limit: int = 6) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _free_tag(git: Git, root: Path, tag: str) -> str:
    for i in range(2, 100):
        candidate = f"{tag}-{i}"
        if not git.branch_exists(f"autoresearch/{candidate}") and not (sessions_dir(root) / candidate).exists():
            return candidate
    return f"{tag}-{secrets.token_hex(2)}"


# -- the loop -------------------------------------------------------------------------------------

MUTATE = "mutate"
MAX_AGENT_FAILURES = 3  # consecutive failing agent calls that changed nothing: the command is broken
MUTATE_ATTEMPTS = 25  # redraws when mutate lands on a trainer that was already tried


@dataclass
class LoopPlan:
    """A loop's arguments and progress, saved after every iteration so `resume` can continue."""

    agent: str
    max_iterations: int | None = None
    hours: float | None = None
    agent_timeout: float = 1800.0
    seed: int | None = None
    done: int = 0
    seconds: float = 0.0
    state: str = "running"  # running | halted (frozen file changed) | finished | stopped (Ctrl-C) | failed | ended

    def remaining(self) -> str | None:
        """Why the loop must stop now, or None."""
        if self.max_iterations is not None and self.done >= self.max_iterations:
            return f"ran {self.done} iteration(s) (--max {self.max_iterations})"
        if self.hours is not None and self.seconds >= self.hours * 3600:
            return f"ran {self.seconds / 3600:.2f} h (--hours {self.hours:g})"
        return None


def read_loop_state(paths: SessionPaths) -> dict | None:
    try:
        return json.loads(paths.loop_state.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_loop_state(paths: SessionPaths, data: dict) -> None:
    atomic_write_text(paths.loop_state, json.dumps(data, indent=1, sort_keys=True))


def interrupted_loop(paths: SessionPaths) -> LoopPlan | None:
    """The loop a dead process was running, or one halted by a changed frozen file; a loop that
    finished, or that a human stopped with Ctrl-C, is not resumed."""
    data = read_loop_state(paths)
    if not data or data.get("state") not in ("running", "halted"):
        return None
    return LoopPlan(**{k: v for k, v in data.items() if k in LoopPlan.__dataclass_fields__})


def run_loop(session: Session, plan: LoopPlan, emit: Callable[[TryResult], None], log: Log = _quiet,
             progress: Log | None = None, lock_token: str | None = None, resumed: bool = False) -> str:
    """Propose, try, repeat until `plan` says stop. Returns why it stopped. Raises
    FrozenEvaluatorError (the session must stop) and SessionError for a broken agent command;
    Ctrl-C records the experiment in flight as interrupted and re-raises KeyboardInterrupt.

    A new loop refuses to start over changes nobody has tried yet (they may be a human's); a
    resumed one drops what its dead predecessor's agent left half-made."""
    from loop.agents import build_prompt, facts_from_rows, mutate, run_agent

    plan.state = "running"
    write_loop_state(session.paths, asdict(plan))
    rng = random.Random(plan.seed if plan.seed is not None else secrets.randbits(32))
    for _ in range(plan.done):  # a resumed loop does not replay the same proposals
        rng.random()
    if lock_token:
        os.environ[LOCK_TOKEN_ENV] = lock_token  # an agent may call `autoresearch try` itself
    failures = 0
    try:
        session.recover(log, progress)
        _start_from_best(session, resumed, log)
        while (why := plan.remaining()) is None:
            started = time.monotonic()
            number = plan.done + 1
            if plan.agent == MUTATE:
                description = _propose_mutation(session, rng, mutate)
            else:
                standing = session.standing()
                program = session.root / "program.md"
                facts = facts_from_rows(
                    program.read_text(encoding="utf-8") if program.is_file() else "",
                    session.config.backend, session.config.preset, session.config.trainer, standing.rows,
                    noise_floor=standing.floor if session.config.rule == "noise" else None,
                    noise_sigma=standing.sigma or None, device=session.config.run.device,
                    time_budget=session.config.run.evaluator.TIME_BUDGET, rule=session.config.rule,
                )
                log(f"iteration {number}: running the agent")
                outcome = run_agent(plan.agent, build_prompt(facts), session.root, plan.agent_timeout)
                session.paths.logs.mkdir(parents=True, exist_ok=True)
                (session.paths.logs / f"agent-{number:04d}.log").write_text(
                    outcome.output + ("\n--- stderr ---\n" + outcome.stderr if outcome.stderr else ""), encoding="utf-8")
                if outcome.timed_out:
                    log(f"  the agent ran past {plan.agent_timeout:g} s and was stopped; trying what it left")
                description = outcome.description or _agent_commit_message(session) or "change by the agent"
                if outcome.returncode not in (0, None) and not session.git.changes_since(session.standing().best_commit):
                    failures += 1
                    detail = (outcome.stderr or outcome.output).strip().splitlines()[-1:] or [""]
                    log(f"  the agent exited with {outcome.returncode} and changed nothing: {detail[0][:200]}")
                    if outcome.returncode == 127 or failures >= MAX_AGENT_FAILURES:
                        raise SessionError(f"the agent command failed {failures} time(s) in a row "
                                           f"(exit {outcome.returncode}): {detail[0][:200]}",
                                           "check the --agent command line by running it by hand")
                else:
                    failures = 0
            result = session.try_change(description, log, progress)
            emit(result)
            plan.done += 1
            plan.seconds += time.monotonic() - started
            write_loop_state(session.paths, asdict(plan))
        plan.state = "finished"
        return why
    except KeyboardInterrupt:
        plan.state = "stopped"
        _stop_cleanly(session, log)
        raise
    except FrozenEvaluatorError:
        plan.state = "halted"  # `session resume` continues once the file is restored
        raise
    except SessionError:
        plan.state = "failed"
        raise
    finally:
        if plan.state != "running":
            write_loop_state(session.paths, asdict(plan))
        if lock_token and os.environ.get(LOCK_TOKEN_ENV) == lock_token:
            del os.environ[LOCK_TOKEN_ENV]


def _start_from_best(session: Session, resumed: bool, log: Log) -> None:
    best = session.standing().best_commit
    pending = session.git.changes_since(best)
    off = session.git.branch() != session.config.branch or session.git.head() != best
    if not pending and not off:
        return
    if not resumed and pending:
        raise SessionError(f"the working tree has changes that were not tried: {_names(pending)}",
                           "try them first (`autoresearch try -m ...`) or drop them (`git checkout -- .`)")
    session.git.restore(session.config.branch, best)
    if pending:
        log(f"dropped the unfinished change of the interrupted iteration ({_names(pending)})")


def _stop_cleanly(session: Session, log: Log) -> None:
    """After Ctrl-C: record the experiment in flight, or drop an agent's half-made edit."""
    if read_journal(session.paths) is not None:
        session.recover(log)
    else:
        standing = session.standing()
        if session.git.changes_since(standing.best_commit) or session.git.head() != standing.best_commit:
            session.git.restore(session.config.branch, standing.best_commit)
            log("dropped the unfinished change of the interrupted iteration")


def _agent_commit_message(session: Session) -> str:
    """An agent that commits itself (upstream's habit) says what it did in the message."""
    head, best = session.git.head(), session.standing().best_commit
    if head and head != best and session.git.is_ancestor(best, head):
        return session.git.message(head).splitlines()[0] if session.git.message(head) else ""
    return ""


def _propose_mutation(session: Session, rng: random.Random, mutate: Callable) -> str:
    """One mutate() proposal that was not tried before (a few redraws), on the best trainer."""
    standing = session.standing()
    trainer = session.root / session.config.trainer
    description = ""
    for _ in range(MUTATE_ATTEMPTS):
        session.git.restore(session.config.branch, standing.best_commit)
        try:
            description = mutate(trainer, rng, max_seq_len=session.config.run.evaluator.MAX_SEQ_LEN)
        except ValueError as exc:
            raise SessionError(f"the mutate proposer cannot change this trainer: {exc}",
                               "use an agent instead: --agent 'claude -p ...'") from None
        if sha256_file(trainer) not in standing.tried:
            break
    return description
