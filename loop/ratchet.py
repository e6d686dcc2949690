"""The ratchet: a session, `try` one change, keep or revert with git, and survive `kill -9`.

One session per repository is active at a time (`state_dir/active-session.json`), and one process
at a time works on it (`loop.lock`).

`try` is the one atomic step of the search. In order:

1. the manifest is verified: a changed file under `harness/` or outside the working tree (session
   config, tokenizer, validation data) stops the session, naming the file, with nothing touched;
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
journal, phase by phase (`loop.journal`: baseline, commit, run, decided). Recovery (`session
resume`, and the start of every `try` and `loop`) reads it: `baseline` finishes the missing
baseline runs; `commit` and `run` record the experiment as a `crash` with reason "interrupted ..."
(it was never scored; its trainer may be tried again) and go on as `decided`; `decided` resets
git to the target commit and appends the row unless it is already the ledger's last. A trainer
orphaned by the dead process is killed first (`loop.orphans`). So after `kill -9` at any moment
git is on the best commit or on the candidate, results hold whole rows only, and no earlier row
is lost. A full disk fails the append; the journal keeps the row, and `resume` appends it once
space is back. Ctrl-C is held during the short git/journal/ledger steps, so it lands in a run
(the trainer is killed and the experiment recorded as interrupted) or between steps, never
inside one.

State lives in the ledger (`sessions/TAG/results.tsv`, outside the working tree, so neither an
agent's edits nor `git clean` touch it): the best is the last `keep` row (else the mean of the
`baseline` rows), sigma is the spread of the baseline rows, the tried trainers are the rows'
`trainer_sha`. The repository's `results.tsv` is a copy, rewritten whole after every append.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
import shutil
import signal
import statistics
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from harness.config import default_config_path, load_config
from harness.scoring.context import DEVICE_ENV
from harness.files import atomic_write, atomic_write_text, sha256_file
from harness.paths import state_dir, trainer_path
from harness.hardware.energy import EnergyMeter
from harness.scoring.evalset import load_eval_pointer
from harness.scoring.evaluator_process import EvaluatorProcess
from harness.scoring.runner import FRAMEWORK_OF, RunOutcome, run_experiment
from loop.session import (
    Mismatch,
    SessionConfig,
    SessionPaths,
    build_manifest,
    load_session_config,
    now_utc,
    save_manifest,
    save_session_config,
    sessions_dir,
    is_frozen_code,
    verify_manifest,
)
from loop.decide import (
    DEFAULT_MAX_DRIFT_PERCENT, DEFAULT_MIN_FLOOR, DEFAULT_Z, RULES, Policy, Run, critical_value, decide_candidate, incumbent_window,
)
from loop.noise import encode, experiments_since_recheck, incumbent_runs, noise, runs_per_experiment
from loop.errors import BaselineFailed, FrozenEvaluatorError, SessionError, SessionTampered
from loop.git import Git, GitFailure
from loop.holdout import holdout_check
from loop.integrity import ChainCheck, StateSnapshot, anchor, chain_head, check_chain, link
from loop.journal import (
    clear_journal,
    deferred_interrupt,
    read_journal,
    read_loop_state,
    record_trainer,
    write_journal,
    write_loop_state,
)
from loop.lock import RepoLock
from loop.orphans import kill_orphaned_trainer
from loop.results import ResultRow, append_row, read_rows, sanitize, without_private_columns

ACTIVE_FILE = "active-session.json"
RESULTS_NAME = "results.tsv"
KILL_AT_ENV = "AUTORESEARCH_TEST_KILL_AT"  # tests: SIGKILL this process at the named point
INTERRUPTED = "interrupted"
NO_COMMIT = "-"  # the commit column of a row whose change was never committed
REFUSED = ("leak", "tampered")  # run outcomes that make an experiment `rejected`
WINDOW = 5  # incumbent runs a candidate is compared with (loop.decide.incumbent_window)
RECHECK_EVERY = 5  # default of --recheck-every: experiments judged against one incumbent before it is re-run
MAX_VOIDS = 3  # runs of a candidate voided in a row before it is left unjudged
MAX_RECHECKS = 2  # re-checks of the incumbent within one experiment
SLOWDOWN_ENV = "AUTORESEARCH_TEST_SLOWDOWN"  # tests: "K:candidate" reads the machine K times slower around candidate runs

Log = Callable[[str], None]


def quiet(_: str) -> None:
    pass


def _test_kill_point(name: str) -> None:
    """Let tests kill this process at a chosen moment, as `kill -9` would."""
    if os.environ.get(KILL_AT_ENV) == name:
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


# -- where a session stands, what a try did ----------------------------------------------------

@dataclass(frozen=True)
class Standing:
    """Where the session stands, derived from its ledger."""

    best_commit: str  # full sha
    best_bpb: float | None  # the mean of the incumbent's runs
    best_runs: list[float]
    baseline_runs: list[float]
    sigma: float  # pooled over every repeated measurement of the session (loop.noise)
    floor: float  # the gain a confirmed candidate must beat now (noise rule; 0 for strict)
    tried: dict[str, ResultRow]  # trainer sha -> the row that judged it
    rows: list[ResultRow]
    dof: int = 0  # sigma's degrees of freedom
    incumbent: list[Run] = field(default_factory=list)  # the incumbent's runs, with machine speeds
    best_sha: str = ""  # the incumbent trainer's SHA-256

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
    hold the RepoLock (`loop.lock`)."""

    def __init__(self, root: Path, config: SessionConfig, paths: SessionPaths, git: Git):
        self.root = root
        self.config = config
        self.paths = paths
        self.git = git
        self.evaluator: EvaluatorProcess | None = None  # a warm one while `loop` runs (`warm_evaluator`)
        self.energy: EnergyMeter | None = None  # the GPU's energy counter, open with the evaluator
        # The configuration and manifest as this process first read them: a rewrite while it lives
        # stops the session (a standalone `try` checks them through the ledger's chain instead).
        self.anchor = anchor(paths.config, paths.manifest)

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
              max_drift: float = DEFAULT_MAX_DRIFT_PERCENT, recheck_every: int = RECHECK_EVERY, log: Log = quiet,
              progress: Log | None = None) -> "Session":
        """Create the session (branch, config, manifest) and measure the baseline. The caller
        holds the lock. On a failed baseline everything it created is removed again."""
        if rule not in RULES:
            raise SessionError(f"unknown rule {rule!r}", f"use one of: {', '.join(RULES)}")
        if z <= 0 or min_floor < 0 or max_drift < 0 or recheck_every < 1:
            raise SessionError("--z must be positive, --min-floor and --max-drift not negative, --recheck-every at least 1")
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
            eval_set = load_eval_pointer(root)
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
            eval_set=str(eval_set), chained=True, max_drift=float(max_drift), recheck_every=int(recheck_every),
        )
        previous_branch = git.branch() or base
        save_session_config(config, paths)
        save_manifest(build_manifest(root, config, paths), paths)
        git.create_branch(branch)
        git.ensure_ignored(RESULTS_NAME)
        session = cls(root, config, paths, git)  # anchored on the files just written
        session._adopt_results_file()
        atomic_write_text(active_file(root), json.dumps({"tag": tag}))
        write_journal(paths, {"phase": "baseline"})
        log(f"session {tag}: branch {branch}, {config.backend} / {config.preset}, rule {rule}, "
            f"baseline x{repeats}, timeout {config.timeout:g} s")
        try:
            with session.warm_evaluator(log):
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

    @property
    def ledger_copy(self) -> Path:
        """The ratchet's own second copy of the ledger: what an edited ledger is put back from."""
        return self.paths.directory / ".ledger-copy.tsv"

    def chain(self) -> ChainCheck:
        """How much of the ledger verifies (loop.integrity)."""
        return check_chain(self.rows(), self.anchor, self.config.chained)

    def verified_rows(self) -> list[ResultRow]:
        """The rows the standing comes from: the ledger's if they verify, else the ratchet's copy's
        if those do, else the ledger's rows before the first that does not."""
        rows = self.rows()
        check = check_chain(rows, self.anchor, self.config.chained)
        if check.broken_at is None:
            return rows
        copy = read_rows(self.ledger_copy) if self.ledger_copy.is_file() else []
        if copy and check_chain(copy, self.anchor, self.config.chained).broken_at is None:
            return copy
        return rows[:check.verified]

    def check_ledger(self, log: Log = quiet) -> None:
        """Put back an edited ledger from the ratchet's copy, or stop when there is nothing to put
        back from (the configuration or manifest it is anchored on was changed, say)."""
        check = self.chain()
        if check.broken_at is None:
            return
        copy = read_rows(self.ledger_copy) if self.ledger_copy.is_file() else []
        if copy and check_chain(copy, self.anchor, self.config.chained).broken_at is None:
            atomic_write_text(self.paths.ledger, self.ledger_copy.read_text(encoding="utf-8"))
            self.publish_results()
            log(f"warning: the ledger was edited ({check.describe()}); put back from the ratchet's copy")
            return
        raise SessionTampered(
            f"the session's ledger does not verify: {check.describe()}",
            "nothing was run. Put the session's files back as the ratchet wrote them (results.tsv, session.json, "
            "manifest.json in its folder), or start a new session")

    def standing(self) -> Standing:
        rows = self.verified_rows()  # an edited row never moves the best or sigma
        baseline_rows = [r for r in rows if r.status == "baseline" and r.scored]
        baseline = [r.val_bpb for r in baseline_rows]
        kept = [r for r in rows if r.status == "keep" and r.scored]
        if kept:
            best_commit, best_sha = self.git.resolve(kept[-1].commit), kept[-1].trainer_sha
        else:
            best_commit, best_sha = self.config.base_commit, baseline_rows[0].trainer_sha if baseline_rows else ""
        incumbent = incumbent_runs(rows, best_sha) if best_sha else []
        if not incumbent and kept:  # a keep from before runs were recorded
            incumbent = [Run(kept[-1].val_bpb)]
        best_runs = [r.val_bpb for r in incumbent if r.val_bpb is not None] or baseline
        measured = noise(rows)
        tried = {r.trainer_sha: r for r in rows
                 if r.trainer_sha and r.status in ("keep", "discard", "crash", "baseline")
                 and not r.reason.startswith(INTERRUPTED)}
        floor = 0.0
        if self.config.rule == "noise":
            se = measured.sigma * math.sqrt(1 / 2 + 1 / max(min(len(best_runs), WINDOW), 1))
            floor = max(critical_value(self.config.z, measured.dof) * se, self.config.min_floor)
        return Standing(
            best_commit=best_commit,
            best_bpb=statistics.fmean(best_runs) if best_runs else None,
            best_runs=best_runs, baseline_runs=baseline, sigma=measured.sigma, floor=floor,
            tried=tried, rows=rows, dof=measured.dof, incumbent=incumbent, best_sha=best_sha,
        )

    def trainer_sha(self) -> str:
        path = self.root / self.config.trainer
        return sha256_file(path) if path.is_file() else "missing"

    def frozen_mismatches(self) -> list[Mismatch]:
        return verify_manifest(self.root, self.config, self.paths)

    @staticmethod
    def fatal(mismatches: list[Mismatch]) -> list[Mismatch]:
        """Mismatches that stop the session: the code that produces and judges scores
        (`loop.session.FROZEN_CODE`) and everything outside the working tree. Other frozen files
        in the tree are restored by rejecting."""
        return [m for m in mismatches if not m.in_tree or is_frozen_code(m.path)]

    def check_frozen(self, best_commit: str, when: str = "before this experiment") -> None:
        if anchor(self.paths.config, self.paths.manifest) != self.anchor:
            raise SessionTampered(f"the session's configuration or manifest was rewritten {when}",
                                  "a session's evaluator is fixed when it starts; start a new session to change it")
        fatal = self.fatal(self.frozen_mismatches())
        if fatal:
            raise FrozenEvaluatorError(fatal, best_commit, when)

    def _append(self, row: ResultRow) -> None:
        if self.config.chained:
            row.chain = link(chain_head(self.rows(), self.anchor), row)
        append_row(self.paths.ledger, row)
        self.publish_results()

    def publish_results(self) -> None:
        """Rewrite the repository's results.tsv as a copy of the ledger (without its private
        columns), and the ratchet's own copy when the ledger verifies."""
        if self.paths.ledger.exists():
            text = self.paths.ledger.read_text(encoding="utf-8")
            atomic_write_text(self.root / RESULTS_NAME, without_private_columns(text))
            if self.config.chained and self.chain().broken_at is None:
                atomic_write_text(self.ledger_copy, text)

    def _row(self, **fields) -> ResultRow:
        run = self.config.run
        fields.setdefault("backend", run.backend)
        fields.setdefault("preset", run.preset)
        fields.setdefault("device", run.device)
        return ResultRow(**fields)

    def _log_path(self, number: int, commit: str, attempt: int) -> Path:
        suffix = f"-run{attempt + 1}" if attempt else ""
        return self.paths.logs / f"{number:04d}-{commit[:7] or 'nocommit'}{suffix}.log"

    def _run(self, log_path: Path, entry: dict, progress: Log | None) -> RunOutcome:
        """Train once and have it scored. The journal `entry` in flight carries the run's marker
        and gets the trainer's pid the moment it starts, so recovery can stop an orphan
        (`loop.orphans`)."""
        def on_progress(line: str) -> None:
            _test_kill_point("training")
            if progress:
                progress(line)

        if self.evaluator is not None and not self.evaluator.alive:
            self.evaluator = None  # it died; this run starts a fresh one of its own
        snapshot = StateSnapshot.take(self.state_files())
        outcome = run_experiment(self.root, self.config.backend, self.paths.run_config, log_path,
                                 eval_set=Path(self.config.eval_set), run_dir=self.paths.runs / log_path.stem,
                                 timeout=self.config.timeout, evaluator=self.evaluator, marker=entry["marker"],
                                 compile_cache=self.paths.directory / "compile-cache", energy=self.energy,
                                 on_start=lambda pid: record_trainer(self.paths, entry, pid),
                                 on_progress=on_progress)
        changed = snapshot.changed()
        if changed:  # the trainer rewrote the session's own state: put it back, refuse the run
            snapshot.restore(changed)
            names = ", ".join(str(p.relative_to(self.root)) if p.is_relative_to(self.root) else p.name for p in changed)
            outcome = dataclasses.replace(outcome, status="tampered", summary=None,
                                          reason=f"the run changed the session's state ({names}); put back as it was")
        return outcome

    def state_files(self) -> list[Path]:
        """What a run must leave exactly as it found it (the journal aside: the ratchet writes it)."""
        state = state_dir(self.root)
        return [self.paths.config, self.paths.run_config, self.paths.manifest, self.paths.ledger, self.ledger_copy,
                self.paths.loop_state, self.root / RESULTS_NAME, state / "setup.json", state / "evaluator.json",
                active_file(self.root), state / "session.lock"]

    @contextmanager
    def warm_evaluator(self, log: Log = quiet) -> Iterator[None]:
        """Keep one evaluator process for the experiments run inside the block (`loop`)."""
        run = self.config.run
        try:
            self.evaluator = EvaluatorProcess.start(
                self.root, Path(self.config.eval_set), os.environ.get(DEVICE_ENV) or run.device,
                run.evaluator.EVAL_BATCH_SIZE, FRAMEWORK_OF.get(run.backend, "torch"), self.paths.logs / "evaluator.log")
        except Exception as exc:  # noqa: BLE001 - every run then starts its own
            log(f"could not keep an evaluator warm ({exc}); each experiment starts its own")
        opened = self.energy is None  # a meter given by the caller stays the caller's
        if opened:
            self.energy, _ = EnergyMeter.open(os.environ.get(DEVICE_ENV) or run.device)
        try:
            yield
        finally:
            if opened and self.energy is not None:
                self.energy.close()
                self.energy = None
            if self.evaluator is not None:
                self.evaluator.close()
                self.evaluator = None

    # -- the baseline --------------------------------------------------------------------------
    def run_baseline(self, log: Log = quiet, progress: Log | None = None) -> None:
        """Run the unchanged trainer until the session has `repeats` baseline rows."""
        trainer_sha = self.trainer_sha()
        while True:
            values = [r.val_bpb for r in self.rows() if r.status == "baseline"]
            if len(values) >= self.config.repeats:
                break
            self.check_frozen(self.config.base_commit, "during the baseline")
            number = len(values) + 1
            marker = f"{self.config.tag}:baseline:{number}:{secrets.token_hex(4)}"
            entry = {"phase": "baseline", "marker": marker}
            write_journal(self.paths, entry)
            log(f"baseline run {number}/{self.config.repeats}")
            outcome, run = self._measured_run(self.paths.logs / f"baseline-{number}.log", entry, progress)
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
                sigma_dof=len(values) - 1 if len(values) >= 2 else None,
                trainer_sha=trainer_sha, holdout_bpb=summary.get("holdout_bpb"), **_run_columns([run]),
                **energy_columns([(outcome.energy_j, outcome.seconds)]),
            )
            with deferred_interrupt():
                self._append(row)
            log(f"  val_bpb {outcome.val_bpb:.6f} ({outcome.seconds:.0f} s)")
        clear_journal(self.paths)

    # -- recovery ------------------------------------------------------------------------------
    def recover(self, log: Log = quiet, progress: Log | None = None) -> ResultRow | None:
        """Finish or roll back whatever a dead process left in the journal (see the module
        docstring); returns the row it recorded, if any. Safe to call at any time."""
        entry = read_journal(self.paths)
        if entry is None:
            return None
        self.git.remove_stale_index_lock()
        kill_orphaned_trainer(entry)
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
        with deferred_interrupt():
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
    def try_change(self, description: str, log: Log = quiet, progress: Log | None = None,
                   advance: bool = True) -> TryResult:
        """Judge the working tree's change to the trainer (see the module docstring).
        `advance=False` (bench/false_keep.py) never moves the best: a keep is returned as such but
        recorded as a `discard` whose reason says so, so every try meets the same incumbent."""
        self.recover(log, progress)
        standing = self.standing()
        best = standing.best_commit
        self.check_frozen(best)
        self.check_ledger(log)
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
                (f"changed files other than {self.config.trainer}: {name_list(others)}" if others else "")
            return self._reject(standing, description, reason.strip("; "), common)
        if not (self.root / self.config.trainer).is_file():
            return self._reject(standing, description, f"{self.config.trainer} was deleted", common)

        sha = self.trainer_sha()
        known = standing.tried.get(sha)
        if known is not None:
            with deferred_interrupt():
                self.git.restore(self.config.branch, best)
            verdict = "crash" if known.status == "crash" else "discard"
            when = f"identical to the trainer of {known.commit} ({known.status}"
            when += ", since beaten)" if known.status in ("keep", "baseline") else ")"
            return TryResult(verdict, known.val_bpb if known.scored else None, standing.best_bpb,
                             reason=f"{when}: not run again" + (f"; {known.reason}" if known.reason else ""),
                             reused_from=known.commit, **common)
        try:
            with self.warm_evaluator(log) if self.evaluator is None else nullcontext():
                return self._experiment(standing, description, sha, common, log, progress, advance)
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
        with deferred_interrupt():
            write_journal(self.paths, {"phase": "decided", "target": target, "row": row.to_dict()})
        _test_kill_point("decided")
        with deferred_interrupt():
            self.git.restore(self.config.branch, target)
            _test_kill_point("reverted")
            self._append(row)
            clear_journal(self.paths)

    def _experiment(self, standing: Standing, description: str, sha: str, common: dict,
                    log: Log, progress: Log | None, advance: bool = True) -> TryResult:
        best = standing.best_commit
        number = len(standing.rows) + 1
        marker = f"{self.config.tag}:{number}:{secrets.token_hex(4)}"
        entry = {"phase": "commit", "best": best, "description": description, "trainer_sha": sha,
                 "marker": marker, "runs": []}
        with deferred_interrupt():
            write_journal(self.paths, entry)
            try:
                candidate = self.git.commit_file(best, self.config.trainer, description)
            except GitFailure as exc:  # a staged deletion, a stale lock, a hook: a row, not the end of the night
                clear_journal(self.paths)
                return self._reject(standing, description, f"git could not commit the change: {exc}", common)
            entry.update(phase="run", candidate=candidate)
            write_journal(self.paths, entry)
        _test_kill_point("committed")
        short = candidate[:7]
        log(f"experiment {number}: {description} ({short})")

        # --max-drift 0 turns voiding off: a limit no drift reaches
        policy = Policy(rule=self.config.rule, z=self.config.z, min_floor=self.config.min_floor,
                        max_drift_percent=self.config.max_drift or math.inf)
        incumbent = list(standing.incumbent) or [Run(v) for v in standing.best_runs]
        rechecks = 0
        counted: list[Run] = []
        outcomes: list[RunOutcome] = []
        voids = 0
        decision = None
        while True:
            outcome, run = self._measured_run(self._log_path(number, candidate, len(outcomes)), entry, progress,
                                              self._slowdown("candidate"))
            outcomes.append(outcome)
            if not outcome.ok:
                break
            window = incumbent
            if policy.rule == "noise":
                window = incumbent_window(incumbent, run.speed, policy.max_drift_percent, WINDOW)
                due = experiments_since_recheck(standing.rows) >= self.config.recheck_every and not rechecks
                while (len(window) < 2 or due) and rechecks < MAX_RECHECKS:
                    rechecks += 1  # a keep, a drifted machine or a long stretch: measure the incumbent now
                    due = False
                    fresh = self._recheck(standing, number, entry, progress, log)
                    if fresh is not None:
                        incumbent.append(fresh)
                    window = incumbent_window(incumbent, run.speed, policy.max_drift_percent, WINDOW)
                window = window or incumbent[-WINDOW:]  # none measured at this speed: the verdict says void
            decision = decide_candidate(counted + [run], window, noise(self.verified_rows()), policy)
            if decision.verdict == "void":
                voids += 1
                log(f"  {decision.reason}")
                if voids >= MAX_VOIDS:
                    break
                continue
            counted.append(run)
            entry["runs"] = [r.val_bpb for r in counted]
            write_journal(self.paths, entry)
            if not decision.needs_confirmation:
                break
            log(f"  {decision.reason}")

        failed = outcomes[-1] if not outcomes[-1].ok else None
        if failed is not None:
            which = "the re-run " if len(outcomes) > 1 else ""
            kind = "" if failed.status in ("crash",) + REFUSED else f"{failed.status}: "  # timeout, diverged, over budget
            # A model that read the evaluator's data, or a run that tampered with the session, is not a
            # crash of the code: it is refused.
            verdict, reason = ("rejected" if failed.status in REFUSED else "crash"), f"{which}{kind}{failed.reason}"
        elif decision.verdict == "void":
            verdict = "void"
            reason = f"not judged: the machine's speed drifted in {voids} runs; try it again later ({decision.reason})"
        else:
            verdict, reason = decision.verdict, decision.reason
        changed_frozen = self.frozen_mismatches()
        if changed_frozen:
            verdict = "rejected"
            reason = f"the run changed frozen files: {name_list([str(m) for m in changed_frozen])}"
            entry["violation"] = reason
            write_journal(self.paths, entry)

        scored = verdict in ("keep", "discard")
        score = statistics.fmean(r.val_bpb for r in counted) if counted else None
        recorded = verdict
        if verdict == "keep" and not advance:
            recorded, reason = "discard", f"kept (not advanced: bench): {reason}"
            verdict_kept = True
        else:
            verdict_kept = verdict == "keep"
        new_best = score if recorded == "keep" else standing.best_bpb
        good = [o for o in outcomes if o.ok]
        last = outcomes[-1]
        summary = last.summary or {}
        row = self._row(
            commit=short, val_bpb=score if scored else 0.0,
            memory_gb=_memory_gb(outcomes) if scored else 0.0, status=recorded, description=description,
            seconds=sum(o.seconds for o in outcomes), num_steps=summary.get("num_steps"),
            tokens_per_sec=summary.get("tokens_per_sec"),
            device=str(summary.get("device") or self.config.run.device),
            best_bpb=new_best, reason=reason, trainer_sha=sha,
            noise_sigma=decision.sigma if decision else standing.sigma,
            sigma_dof=decision.dof if decision else standing.dof,
            holdout_bpb=_mean([o.summary.get("holdout_bpb") for o in good]) if scored else None,
            **_run_columns(counted), voids=voids, **energy_columns([(o.energy_j, o.seconds) for o in outcomes]),
        )
        self._settle(candidate if recorded == "keep" else best, row)
        if changed_frozen:
            self.check_frozen(best, "during the run and could not be restored")
        return TryResult("keep" if verdict_kept else verdict, score if scored else None, new_best, commit=short, reason=reason,
                         runs=[r.val_bpb for r in counted], log=str(last.log_path), row=row, **common)

    # -- measured runs ---------------------------------------------------------------------------
    def _measured_run(self, log_path: Path, entry: dict, progress: Log | None,
                      slowdown: float = 1.0) -> tuple[RunOutcome, Run]:
        """One run with the machine's speed read before and after it (by the evaluator process)."""
        before = self.evaluator.speed(slowdown) if self.evaluator is not None else None
        outcome = self._run(log_path, entry, progress)
        after = self.evaluator.speed(slowdown) if self.evaluator is not None else None
        return outcome, Run(outcome.val_bpb if outcome.ok else None, before, after)

    def _recheck(self, standing: Standing, number: int, entry: dict, progress: Log | None, log: Log) -> Run | None:
        """Run the incumbent once more, now (its trainer file in place of the candidate's for the
        run), and record it as a `recheck` row: candidates are compared with the incumbent measured
        under today's conditions, and the run joins the pooled sigma."""
        trainer = self.root / self.config.trainer
        candidate_text = trainer.read_bytes()
        best = standing.best_commit
        log(f"  re-checking the best ({best[:7]}) under the machine's conditions now")
        self.git.checkout_file(best, self.config.trainer)
        try:
            outcome, run = self._measured_run(self.paths.logs / f"{number:04d}-recheck-{best[:7]}.log", entry, progress)
        finally:
            atomic_write(trainer, candidate_text)
        if not outcome.ok:
            log(f"  the re-check of the best did not score ({outcome.status}: {outcome.reason})")
            return None
        summary = outcome.summary or {}
        row = self._row(
            commit=best[:7], val_bpb=run.val_bpb, memory_gb=_memory_gb([outcome]), status="recheck",
            description=f"re-check of the best ({best[:7]})", seconds=outcome.seconds,
            num_steps=summary.get("num_steps"), tokens_per_sec=summary.get("tokens_per_sec"),
            best_bpb=standing.best_bpb, trainer_sha=standing.best_sha, holdout_bpb=summary.get("holdout_bpb"),
            **_run_columns([run]), **energy_columns([(outcome.energy_j, outcome.seconds)]),
        )
        with deferred_interrupt():
            self._append(row)
        return run

    @staticmethod
    def _slowdown(kind: str) -> float:
        """Tests: read the machine as if it were K times slower around `kind` runs."""
        factor, _, which = os.environ.get(SLOWDOWN_ENV, "").partition(":")
        try:
            return float(factor) if which == kind else 1.0
        except ValueError:
            return 1.0

    # -- status and end ------------------------------------------------------------------------
    def status(self) -> dict:
        standing = self.standing()
        chain = self.chain()
        check = holdout_check(standing.rows, standing.floor)
        counts: dict[str, int] = {}
        for row in standing.rows:
            counts[row.status] = counts.get(row.status, 0) + 1
        journal = read_journal(self.paths)
        holder = RepoLock(self.root, "status").holder()
        return {
            "tag": self.config.tag, "branch": self.config.branch, "backend": self.config.backend,
            "preset": self.config.preset, "device": self.config.run.device, "rule": self.config.rule,
            "z": self.config.z, "min_floor": self.config.min_floor, "max_drift": self.config.max_drift,
            "recheck_every": self.config.recheck_every,
            "timeout": self.config.timeout,
            "trainer": self.config.trainer, "created": self.config.created,
            "baseline_bpb": standing.baseline_bpb, "baseline_runs": standing.baseline_runs,
            "sigma": standing.sigma, "sigma_dof": standing.dof, "noise_floor": standing.floor,
            "cost": runs_per_experiment(standing.rows),
            "best_bpb": standing.best_bpb, "best_commit": standing.best_commit[:7],
            "experiments": sum(v for k, v in counts.items() if k not in ("baseline", "recheck")), "counts": counts,
            "head": (self.git.head() or "")[:7], "on_branch": self.git.branch() == self.config.branch,
            "pending_changes": self.git.changes_since(standing.best_commit) if self.git.head() else [],
            "in_flight": journal.get("phase") if journal else None,
            "busy": None if holder is None or holder.stale or holder.pid == os.getpid() else holder.describe(),
            "loop": read_loop_state(self.paths),
            "results": str(self.paths.ledger),
            "ledger": {"verified": chain.broken_at is None, "verified_rows": chain.verified, "rows": chain.total,
                       "detail": chain.describe()},
            "holdout": check.to_dict() if check else None,
            "holdout_detail": check.describe() if check else "no holdout recorded",
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

    # -- for a head that judges experiments run elsewhere (loop.parallel) -------------------------
    def record(self, row: ResultRow) -> None:
        """Append a judged row to the ledger (chained) and refresh its copies; Ctrl-C waits."""
        with deferred_interrupt():
            self._append(row)


def energy_columns(readings: list[tuple[float | None, float]]) -> dict[str, float | None]:
    """The ledger cells of an experiment's energy: the joules of its runs, given as (joules, seconds)
    per run, and their mean power; None where no counter was read."""
    metered = [(joules, seconds) for joules, seconds in readings if joules is not None]
    if not metered:
        return {"energy_j": None, "mean_watts": None}
    joules, seconds = sum(j for j, _ in metered), sum(s for _, s in metered)
    return {"energy_j": joules, "mean_watts": joules / seconds if seconds > 0 else None}


def _run_columns(runs: list[Run]) -> dict[str, str]:
    """The ledger cells of a verdict's runs: their scores and the machine's speed around each."""
    return {"runs": encode([r.val_bpb for r in runs]), "speed": encode([r.speed for r in runs], ".4g"),
            "speed_after": encode([r.speed_after for r in runs], ".4g")}


def _mean(values: list) -> float | None:
    numbers = [v for v in values if isinstance(v, (int, float))]
    return statistics.fmean(numbers) if numbers else None


def _memory_gb(outcomes: list[RunOutcome]) -> float:
    peaks = [o.summary.get("peak_vram_mb") for o in outcomes if o.summary]
    peaks = [p for p in peaks if isinstance(p, (int, float))]
    return round(max(peaks) / 1024, 1) if peaks else 0.0


def name_list(paths: list[str], limit: int = 6) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _free_tag(git: Git, root: Path, tag: str) -> str:
    for i in range(2, 100):
        candidate = f"{tag}-{i}"
        if not git.branch_exists(f"autoresearch/{candidate}") and not (sessions_dir(root) / candidate).exists():
            return candidate
    return f"{tag}-{secrets.token_hex(2)}"
