"""`autoresearch loop --workers N`: many experiments at once on Ray workers, one ratchet.

The head (this process, holding the session lock) proposes candidates, hands each to a worker
(`loop.workers`, a Ray actor with its own accelerator or CPU share and its own git worktree,
`loop.worktrees`), and judges what comes back. It is the only writer of the ledger and the only
process that moves the session branch. The rules that keep the ratchet correct in parallel:

- a candidate is built on the best commit at the time it is proposed (in its worker's worktree);
- when its run ends, it is judged against the best as it is then, under the session's rule:
  - its base is still the best: the rule decides (an apparent keep runs once more to confirm); a
    keep moves the branch to it, so its parent is the best it beat;
  - the best moved and it does not beat the new best: discard, with both commits in the reason;
  - the best moved and it beats the new best (or comes close): its change is re-applied on the new
    best (`git cherry-pick`) and run again; only that run can keep it. A change that no longer
    applies is discarded as stale, with that reason (also after `MAX_REAPPLY` moves);
- one ledger row per experiment, with the worker and the node that ran it;
- a worker that dies under an experiment makes it `crash` ("worker lost"); it is queued once more,
  on another worker where there is one, and the loop goes on with a fresh worker in that slot.

Proposers run in parallel: `--agent mutate` as in the one-worker loop, an agent command once per
free worker in that worker's worktree, with the session's standing and the experiments in flight
in its prompt; `wave=True` asks one agent call for a change in each of K free worktrees at once.

Crash safety: the experiments in flight live in the session's `parallel.json` (atomic replace),
with the markers of their trainers and the processes of a local Ray cluster. A verdict is written
there before git moves and the row is appended (write-ahead), so after `kill -9` of the head
`recover_parallel` (run by `session resume`, and by the next loop) finishes a decided verdict,
records the others as interrupted, stops what the dead head left running, and removes the
worktrees.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
import math
import socket
import statistics
import subprocess
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from harness.files import atomic_write_text, sha256_file
from harness.paths import cache_dir
from harness.processes import kill_marked_processes
from harness.scoring.runner import FRAMEWORK_OF, MARKER_ENV
from loop.agents import build_prompt, memory_ceiling_gb, mutate, run_agent
from loop.cluster import Cluster, kill_recorded, start_cluster, worker_env, worker_resources
from loop.decide import Policy, Run, decide_candidate
from loop.driver import MAX_AGENT_FAILURES, MUTATE, MUTATE_ATTEMPTS, LoopPlan, session_facts
from loop.errors import FrozenEvaluatorError, SessionError
from loop.journal import deferred_interrupt, write_loop_state
from loop.noise import encode, noise
from loop.ratchet import (INTERRUPTED, KILL_AT_ENV, NO_COMMIT, REFUSED, WINDOW, Log, Session, TryResult, energy_columns,
                          name_list, quiet)
from loop.results import RESULT_COLUMNS, ResultRow, sanitize
from loop.session import SessionPaths, load_manifest
from loop import workers
from loop.workers import ExperimentWorker, SessionPackage
from loop.worktrees import WORKTREES_DIR, Worktrees

IN_FLIGHT_FILE = "parallel.json"
SHIP_TREE_ENV = "AUTORESEARCH_TEST_SHIP_TREE"  # tests: local workers work as on another node (tree shipped)
WORKER_LOST = "worker lost"
MAX_REAPPLY = 3  # re-applications onto a moved best before a candidate is discarded as stale
START_TIMEOUT_S = 600.0  # placing a worker and warming its evaluator
POLL_S = 1.0  # how often the head looks at the workers while it waits
STATE_WRITE_S = 2.0  # how often the workers' live states are written for `session status`
WAVE_LINE = re.compile(r"^\W*(w\d+)\W+(.+)$")


def _kill_point(name: str) -> None:
    """Tests kill the head here, as `kill -9` would (`AUTORESEARCH_TEST_KILL_AT=parallel-NAME`)."""
    if os.environ.get(KILL_AT_ENV) == f"parallel-{name}":
        os.kill(os.getpid(), 9)


# -- what is in flight ------------------------------------------------------------------------------

@dataclass
class Experiment:
    """One candidate, from its proposal to its row."""

    id: str
    number: int
    description: str
    base: str  # the best commit it is built on (moves when it is re-applied)
    commit: str
    trainer_sha: str
    proposed: str  # its first commit, before any re-application
    state: str = "queued"  # queued | running | decided
    runs: list = field(default_factory=list)  # val_bpb of each run on `base` (a confirmation makes two)
    summaries: list = field(default_factory=list)
    seconds: float = 0.0
    slot: str = ""
    node: str = ""
    marker: str = ""
    attempt: int = 0  # runs started, for the log names
    lost: int = 0  # times its worker died under it
    avoid: str = ""  # the slot whose worker died under it: retried elsewhere when possible
    reapply: bool = False  # the best moved and it beat it: re-apply before the next run
    reapplied: int = 0
    measured: float | None = None  # its score on the base it was built on, before a re-application
    note: str = ""  # e.g. "re-applied on abc1234 (cherry-pick of def5678)"
    since: float = field(default_factory=time.time)
    target: str = ""  # when decided: where git goes
    row: dict | None = None  # when decided: the row to append


def in_flight_path(paths: SessionPaths) -> Path:
    return paths.directory / IN_FLIGHT_FILE


def read_in_flight(paths: SessionPaths) -> dict | None:
    try:
        return json.loads(in_flight_path(paths).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def in_flight_lines(paths: SessionPaths) -> list[str]:
    """One line per experiment in flight, for `session status`."""
    data = read_in_flight(paths) or {}
    states = data.get("workers", {})
    lines = []
    for item in data.get("experiments", []):
        worker = states.get(item.get("slot", ""), {})
        doing = item["state"] if item["state"] != "running" else worker.get("phase") or "running"
        where = f"{item['slot']} on {item.get('node') or worker.get('node') or '?'}" if item.get("slot") else "queued"
        latest = f": {worker['line'][:80]}" if item["state"] == "running" and worker.get("line") else ""
        lines.append(f"{item['id']} {item['commit'][:7]} {doing} ({where}, {time.time() - item['since']:.0f} s) "
                     f"{item['description']}{latest}")
    return lines


# -- the pool of workers -----------------------------------------------------------------------------

@dataclass
class Slot:
    name: str
    path: Path  # its worktree
    actor: Any = None
    node: str = ""
    pid: int | None = None
    pid_started: float | None = None
    busy: str = ""  # "" | "starting" | "proposing" | an experiment id
    base: str = ""  # the best commit its worktree was reset to for the proposal under way
    usable: bool = True
    refusal: str = ""
    state: dict = field(default_factory=dict)  # the worker's latest WorkerState


@dataclass
class ParallelOptions:
    workers: int
    address: str | None = None  # a Ray cluster to join; None: start one on this machine
    wave: bool = False  # one agent call proposes a change in each free worktree
    worker_class: type = ExperimentWorker  # the bench swaps in a stand-in that sleeps
    num_cpus: int | None = None  # a local cluster's size (None: what Ray detects)
    num_gpus: int | None = None
    warm_evaluator: bool = True


def session_package(session: Session, warm_evaluator: bool = True) -> SessionPackage:
    paths, config, root = session.paths, session.config, session.root

    def key(path: Path) -> str:
        return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)

    return SessionPackage(
        tag=config.tag, backend=config.backend, device=config.run.device, trainer=config.trainer,
        session_config=paths.config.read_text(encoding="utf-8"), run_config=paths.run_config.read_text(encoding="utf-8"),
        manifest=load_manifest(paths), config_key=key(paths.config), run_config_key=key(paths.run_config),
        eval_set=config.eval_set, cache=str(cache_dir()), session_dir=str(paths.directory),
        head_host=socket.gethostname(), eval_batch_size=config.run.evaluator.EVAL_BATCH_SIZE,
        framework=FRAMEWORK_OF.get(config.backend, "torch"), timeout=config.timeout, warm_evaluator=warm_evaluator)


class ParallelLoop:
    """The head of a parallel loop (see the module docstring). `run()` returns why it stopped."""

    def __init__(self, session: Session, plan: LoopPlan, options: ParallelOptions,
                 emit: Callable[[TryResult], None], log: Log = quiet, progress: Log | None = None,
                 resumed: bool = False):
        self.session, self.plan, self.options = session, plan, options
        self.emit, self.log, self.progress, self.resumed = emit, log, progress, resumed
        self.worktrees = Worktrees(session.root, session.paths.directory / WORKTREES_DIR)
        self.trainer = session.config.trainer
        self.experiments: dict[str, Experiment] = {}
        self.queue: list[str] = []  # experiment ids waiting for a worker (confirmations, re-applications, retries)
        self.pending: dict[Any, tuple[str, str]] = {}  # ray ref -> (slot, experiment id or "" for a start)
        self.slots: dict[str, Slot] = {}
        self.proposals: dict[Future, list[str]] = {}  # agent calls running -> the slots they propose for
        self.cluster: Cluster | None = None
        self.executor: ThreadPoolExecutor | None = None
        self.rng = random.Random(plan.seed if plan.seed is not None else secrets.randbits(32))
        self.number = 0
        self.started = time.monotonic()
        self.seconds_before = plan.seconds
        self.last_state_write = 0.0
        self.memory_ceiling: float | None = None
        self.agent_failures = 0  # agent calls in a row that failed and changed nothing
        self.ledger_has_worker = True
        self._standing_key: tuple | None = None
        self._standing_value = None
        self.last_poll = 0.0

    def standing(self):
        """The session's standing, read again only when the ledger changed (the head is its only
        writer, and the best commit comes from it)."""
        try:
            stat = self.session.paths.ledger.stat()
            key = (stat.st_size, stat.st_mtime_ns)
        except OSError:
            key = None
        if key is None or key != self._standing_key:
            self._standing_value, self._standing_key = self.session.standing(), key
        return self._standing_value

    # -- the loop ------------------------------------------------------------------------------------
    def run(self) -> str:
        ray_module = None
        plan = self.plan
        plan.state = "running"
        self._save_plan()
        try:
            recover_parallel(self.session, self.log)
            self.session.recover(self.log, self.progress)
            self._start_from_best()
            standing = self.standing()
            self.session.check_frozen(standing.best_commit)
            self.session.check_ledger(self.log)
            self.number = len(standing.rows)
            self.ledger_has_worker = _ledger_columns(self.session.paths.ledger) >= set(("worker", "node"))
            if plan.agent != MUTATE:
                self.memory_ceiling = memory_ceiling_gb(self.session.config.run.device)
            ray_module = self._start_pool(standing.best_commit)
            self.executor = ThreadPoolExecutor(max_workers=len(self.slots), thread_name_prefix="autoresearch-agent")
            while True:
                self._fill()
                if not self.pending and not self.proposals and not self.queue and not self._may_propose():
                    break
                self._collect(ray_module)
            plan.state = "finished"
            plan.seconds = self._elapsed()
            return self._why_stopped()
        except KeyboardInterrupt:
            plan.state = "stopped"
            self._abandon("the loop was stopped (Ctrl-C)")
            raise
        except FrozenEvaluatorError:
            plan.state = "halted"
            self._abandon("the session stopped: a frozen file changed")
            raise
        except BaseException:
            plan.state = "failed"
            self._abandon("the loop stopped on an error")
            raise
        finally:
            self._stop_pool()
            self._save_plan()

    def _why_stopped(self) -> str:
        why = self.plan.remaining()
        if why:
            return why
        if not any(s.usable for s in self.slots.values()):
            return "no worker is left that can run the session"
        return f"ran {self.plan.done} iteration(s)"

    def _may_propose(self) -> bool:
        plan = self.plan
        active = len(self.experiments) + sum(len(s) for s in self.proposals.values())
        if plan.max_iterations is not None and plan.done + active >= plan.max_iterations:
            return False
        if plan.hours is not None and self._elapsed() >= plan.hours * 3600:
            return False
        return any(s.usable for s in self.slots.values())

    def _elapsed(self) -> float:
        return self.seconds_before + time.monotonic() - self.started

    def _save_plan(self) -> None:
        self.plan.seconds = self._elapsed()
        write_loop_state(self.session.paths, {**asdict(self.plan), "workers": self.options.workers,
                                              "ray": self.options.address, "wave": self.options.wave})

    def _start_from_best(self) -> None:
        session = self.session
        best = session.standing().best_commit
        pending = session.git.changes_since(best)
        if not self.resumed and pending:
            raise SessionError(f"the working tree has changes that were not tried: {name_list(pending)}",
                               "try them first (`autoresearch try -m ...`) or drop them (`git checkout -- .`)")
        if pending or session.git.branch() != session.config.branch or session.git.head() != best:
            session.git.restore(session.config.branch, best)

    # -- the pool ------------------------------------------------------------------------------------------
    def _start_pool(self, best: str):
        options, session = self.options, self.session
        device = session.config.run.device
        local = options.address is None
        cpus = max(options.num_cpus or os.cpu_count() or 1, options.workers) if local else None
        threads = max(1, (cpus or 1) // options.workers) if device == "cpu" and local else 0
        self.cluster = start_cluster(options.address, worker_env(str(session.root) if local else None, threads),
                                     num_cpus=cpus, num_gpus=(0 if device == "cpu" else options.num_gpus) if local else None)
        import ray

        resources = worker_resources(device, options.workers, *self.cluster.resources())
        self.log(f"{options.workers} worker(s) " + (f"on the Ray cluster at {options.address}" if not local
                                                    else "on a local Ray cluster") + f": {resources.reason}")
        package = session_package(session, options.warm_evaluator)
        self.ship = not local or os.environ.get(SHIP_TREE_ENV) == "1"
        archive = ray.put(_archive(session.root, best)) if self.ship else None
        remote = ray.remote(options.worker_class)
        self._remote, self._package, self._archive, self._resources = remote, package, archive, resources
        for index in range(1, options.workers + 1):
            name = f"w{index}"
            slot = Slot(name, self.worktrees.add(name, best))
            self.slots[name] = slot
            self._start_worker(slot)
        self._save()
        deadline = time.monotonic() + START_TIMEOUT_S
        while any(s.busy == "starting" for s in self.slots.values()):
            if time.monotonic() > deadline:
                waiting = [s.name for s in self.slots.values() if s.busy == "starting"]
                raise SessionError(f"Ray could not place worker(s) {', '.join(waiting)} within {START_TIMEOUT_S:.0f} s "
                                   f"(each asks for {resources.num_cpus:g} CPU, {resources.num_gpus:g} GPU)",
                                   "use fewer --workers, or add nodes with those resources to the cluster")
            self._collect(ray)
        if not any(s.usable for s in self.slots.values()):
            reasons = "; ".join(f"{s.name}: {s.refusal}" for s in self.slots.values())
            raise SessionError(f"no worker can run this session: {reasons}",
                               "set the nodes up with the same `autoresearch setup`, then `autoresearch session resume`")
        self.cluster.note_processes()
        self._save()
        return ray

    def _start_worker(self, slot: Slot) -> None:
        resources = self._resources
        slot.actor = self._remote.options(num_cpus=resources.num_cpus, num_gpus=resources.num_gpus, max_concurrency=2,
                                          max_restarts=0).remote(slot.name, self._package,
                                                                 None if self.ship else str(slot.path), self._archive)
        slot.busy, slot.state = "starting", {}
        self.pending[slot.actor.prepare.remote()] = (slot.name, "")

    def _started(self, slot: Slot, facts: dict | None, error: str = "") -> None:
        slot.busy = ""
        if facts is None or not facts.get("ok"):
            slot.usable = False
            slot.refusal = error or facts.get("reason", "refused")
            self.log(f"worker {slot.name} refuses: {slot.refusal}")
            return
        slot.node, slot.pid, slot.pid_started = facts["node"], facts["pid"], facts.get("started")
        if facts.get("warning"):
            self.log(f"  {facts['warning']}")

    def _replace_worker(self, slot: Slot) -> None:
        import ray

        try:
            ray.kill(slot.actor)
        except Exception:  # noqa: BLE001 - it is gone already
            pass
        self._start_worker(slot)

    def _stop_pool(self) -> None:
        if self.executor is not None:
            self._stop_agents()
            self.executor.shutdown(wait=True, cancel_futures=True)
        self._stop_workers(close_first=True)
        if self.cluster is not None:
            self.cluster.shutdown()
        self.worktrees.remove_all()
        shutil.rmtree(node_folder(self.session), ignore_errors=True)  # trees shipped to workers on this machine
        if not self.experiments:
            in_flight_path(self.session.paths).unlink(missing_ok=True)
        else:
            self._save()

    # -- proposing ---------------------------------------------------------------------------------------
    def _fill(self) -> None:
        idle = [s for s in self.slots.values() if s.usable and not s.busy]
        for slot in idle:
            item = self._next_queued(slot)
            if item is not None:
                self._dispatch(slot, item)
        idle = [s for s in self.slots.values() if s.usable and not s.busy]
        if not idle or not self._may_propose():
            return
        if self.plan.agent == MUTATE:
            for slot in idle:
                if self._may_propose():
                    self._propose_mutation(slot)
        elif self.options.wave:
            if not self.pending and not self.proposals:  # a wave waits for the whole pool
                self._ask_wave(idle)
        else:
            for slot in idle:
                if self._may_propose():
                    self._ask_agent(slot)

    def _next_queued(self, slot: Slot) -> Experiment | None:
        for index, ident in enumerate(self.queue):
            item = self.experiments[ident]
            others = [s for s in self.slots.values() if s.usable and s.name != item.avoid]
            if item.avoid == slot.name and others:
                continue  # its worker died under it: another worker takes it
            return self.experiments[self.queue.pop(index)]
        return None

    def _standing_facts(self):
        standing = self.standing()
        return standing, session_facts(self.session, standing, self.memory_ceiling)

    def prompt(self) -> str:
        """The agent's prompt: program.md with the standing, and the experiments in flight."""
        _, facts = self._standing_facts()
        return with_in_flight(build_prompt(facts), [f"{e.description} (on {e.base[:7]}, {e.state})"
                                                    for e in self.experiments.values()])

    def _ask_agent(self, slot: Slot) -> None:
        slot.base = self.standing().best_commit
        self.worktrees.reset(slot.path, slot.base)
        slot.busy = "proposing"
        self.log(f"{slot.name}: running the agent")
        future = self.executor.submit(run_agent, self.plan.agent, self.prompt(), slot.path, self.plan.agent_timeout)
        self.proposals[future] = [slot.name]

    def _ask_wave(self, idle: list[Slot]) -> None:
        remaining = None if self.plan.max_iterations is None else \
            self.plan.max_iterations - self.plan.done - len(self.experiments)
        chosen = idle[:remaining] if remaining is not None else idle
        best = self.standing().best_commit
        for slot in chosen:
            self.worktrees.reset(slot.path, best)
            slot.busy, slot.base = "proposing", best
        prompt = with_wave(self.prompt(), [(s.name, s.path) for s in chosen], self.trainer)
        self.log(f"wave: one agent call for {len(chosen)} worktree(s)")
        future = self.executor.submit(run_agent, self.plan.agent, prompt, self.worktrees.folder, self.plan.agent_timeout)
        self.proposals[future] = [s.name for s in chosen]

    def _proposed(self, future: Future, slots: list[str]) -> None:
        outcome = future.result()
        number = self.number + 1
        (self.session.paths.logs).mkdir(parents=True, exist_ok=True)
        (self.session.paths.logs / f"agent-{number:04d}-{'-'.join(slots)}.log").write_text(
            outcome.output + ("\n--- stderr ---\n" + outcome.stderr if outcome.stderr else ""), encoding="utf-8")
        if outcome.timed_out:
            self.log(f"  the agent ran past {self.plan.agent_timeout:g} s and was stopped; trying what it left")
        descriptions = wave_descriptions(outcome.output) if len(slots) > 1 else {}
        changed = any(self.worktrees.changes_since(self.slots[name].path, self.slots[name].base) for name in slots)
        if outcome.returncode in (0, None) or changed:
            self.agent_failures = 0
        else:
            self.agent_failures += 1
            detail = (outcome.stderr or outcome.output).strip().splitlines()[-1:] or [""]
            self.log(f"  the agent exited with {outcome.returncode} and changed nothing: {detail[0][:200]}")
            if outcome.returncode == 127 or self.agent_failures >= MAX_AGENT_FAILURES:
                raise SessionError(f"the agent command failed {self.agent_failures} time(s) in a row "
                                   f"(exit {outcome.returncode}): {detail[0][:200]}",
                                   "check the --agent command line by running it by hand")
        for name in slots:
            slot = self.slots[name]
            slot.busy = ""
            self._submit(slot, descriptions.get(name) or outcome.description or "change by the agent", slot.base)

    def _propose_mutation(self, slot: Slot) -> None:
        standing = self.standing()
        taken = set(standing.tried) | {e.trainer_sha for e in self.experiments.values()}
        trainer = slot.path / self.trainer
        description = ""
        self.worktrees.reset(slot.path, standing.best_commit)
        best_text = trainer.read_bytes()
        for _ in range(MUTATE_ATTEMPTS):
            trainer.write_bytes(best_text)  # a redraw starts from the best trainer again
            try:
                description = mutate(trainer, self.rng, max_seq_len=self.session.config.run.evaluator.MAX_SEQ_LEN)
            except ValueError as exc:
                raise SessionError(f"the mutate proposer cannot change this trainer: {exc}",
                                   "use an agent instead: --agent 'claude -p ...'") from None
            if sha256_file(trainer) not in taken:
                break
        self._submit(slot, description, standing.best_commit)

    def _submit(self, slot: Slot, description: str, base: str) -> None:
        """Turn what a proposer left in `slot`'s worktree, on `base` (the best when it started),
        into a candidate and dispatch it there. If the best moved while an agent worked, the change
        is re-applied on the new best first (or discarded as stale)."""
        standing = self.standing()
        best = standing.best_commit
        description = sanitize(description) or "(no description)"
        common = dict(previous_best=standing.best_bpb, noise_floor=standing.floor, sigma=standing.sigma,
                      description=description)
        changed = self.worktrees.changes_since(slot.path, base)
        if not changed:
            self._done(TryResult("unchanged", None, standing.best_bpb,
                                 reason="the trainer is the best commit's: nothing to try", **common))
            return
        others = [p for p in changed if p != self.trainer]
        if others or not (slot.path / self.trainer).is_file():
            reason = f"changed files other than {self.trainer}: {name_list(others)}" if others \
                else f"{self.trainer} was deleted"
            row = self._new_row(NO_COMMIT, "rejected", description, reason, standing, slot=slot,
                                trainer_sha=_sha_or_missing(slot.path / self.trainer))
            self.worktrees.reset(slot.path, best)
            self.session.record(row)
            self._done(TryResult("rejected", None, standing.best_bpb, reason=reason, row=row, **common))
            return
        sha = sha256_file(slot.path / self.trainer)
        known = standing.tried.get(sha)
        twin = next((e for e in self.experiments.values() if e.trainer_sha == sha), None)
        if known is not None or twin is not None:
            self.worktrees.reset(slot.path, best)
            if known is not None:
                verdict = "crash" if known.status == "crash" else "discard"
                when = f"identical to the trainer of {known.commit} ({known.status}"
                when += ", since beaten)" if known.status in ("keep", "baseline") else ")"
                result = TryResult(verdict, known.val_bpb if known.scored else None, standing.best_bpb,
                                   reason=f"{when}: not run again", reused_from=known.commit, **common)
            else:
                result = TryResult("discard", None, standing.best_bpb, reused_from=twin.commit[:7],
                                   reason=f"identical to {twin.id} ({twin.commit[:7]}), in flight: not run twice", **common)
            self._done(result)
            return
        commit = self.worktrees.commit_file(slot.path, base, self.trainer, description)
        self.number += 1
        item = Experiment(id=f"x{self.number:04d}", number=self.number, description=description, base=base,
                          commit=commit, trainer_sha=sha, proposed=commit, reapply=base != best)
        self.experiments[item.id] = item
        self.log(f"{item.id} on {slot.name}: {description} ({commit[:7]})")
        self._dispatch(slot, item, fresh=True)

    # -- running ---------------------------------------------------------------------------------------------
    def _dispatch(self, slot: Slot, item: Experiment, fresh: bool = False) -> None:
        """Run `item` on `slot`'s worker; `fresh`: it was just committed in that worktree."""
        if item.reapply:
            if not self._reapply(slot, item, self.standing().best_commit):
                return
        elif not fresh:
            self.worktrees.reset(slot.path, item.commit)
        item.attempt += 1
        item.state, item.slot, item.node = "running", slot.name, slot.node
        item.marker = f"{self.session.config.tag}:{item.id}:{secrets.token_hex(4)}"
        suffix = f"-run{item.attempt}" if item.attempt > 1 else ""
        job = {"id": item.id, "commit": item.commit, "trainer_sha": item.trainer_sha, "marker": item.marker,
               "source": (slot.path / self.trainer).read_text(encoding="utf-8"),
               "log_name": f"{item.number:04d}-{item.commit[:7]}{suffix}.log"}
        slot.busy = item.id
        self.pending[slot.actor.run.remote(job)] = (slot.name, item.id)
        self._save()

    def _reapply(self, slot: Slot, item: Experiment, best: str) -> bool:
        """Cherry-pick `item`'s change onto the current best in `slot`'s worktree; False when it
        was settled instead (stale)."""
        item.reapply = False
        old = item.commit
        picked = self.worktrees.cherry_pick(slot.path, best, old)
        standing = self.standing()
        measured = f"; {item.measured:.6f} on {item.base[:7]}" if item.measured is not None else "; never run"
        if picked is None:
            self._settle(item, "discard", f"stale: its change no longer applies on the new best {best[:7]} "
                                          f"(cherry-pick of {old[:7]} conflicts){measured}",
                         best, runs=[], value=item.measured)
            return False
        sha = sha256_file(slot.path / self.trainer)
        if not self.worktrees.changes_since(slot.path, best):
            self._settle(item, "discard", f"stale: the new best {best[:7]} already holds its change", best, runs=[],
                         value=item.measured)
            return False
        if sha in standing.tried:
            self._settle(item, "discard", f"stale: on the new best {best[:7]} it is identical to the trainer of "
                                          f"{standing.tried[sha].commit}", best, runs=[], value=item.measured)
            return False
        item.note = f"re-applied on {best[:7]} (cherry-pick of {old[:7]})" + \
            (" and run again" if item.runs or item.measured is not None else ": the best moved while it was proposed")
        item.base, item.commit, item.trainer_sha = best, picked, sha
        self.log(f"{item.id}: {item.note}")
        return True

    def _collect(self, ray) -> None:
        """Wait up to POLL_S for a worker or an agent; handle everything that finished."""
        for future in [f for f in self.proposals if f.done()]:
            self._proposed(future, self.proposals.pop(future))
        if self.pending:
            ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=POLL_S if not self._idle_work() else 0)
            if ready:
                ready, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=0)
            for ref in ready:
                name, ident = self.pending.pop(ref)
                self._finished(ray, ref, self.slots[name], ident)
        elif self.proposals:
            time.sleep(0.05)
        self._poll_states(ray)

    def _idle_work(self) -> bool:
        """Whether a free worker could start something right now (then the head does not wait)."""
        if self.executor is None:  # still starting the pool: nothing is proposed yet
            return False
        if not any(s.usable and not s.busy for s in self.slots.values()):
            return False
        return bool(self.queue) or (self._may_propose() and (self.plan.agent == MUTATE or not self.options.wave))

    def _finished(self, ray, ref, slot: Slot, ident: str) -> None:
        try:
            value = ray.get(ref)
            error = None
        except Exception as exc:  # noqa: BLE001 - a dead actor, a lost node: Ray's errors, all of them
            value, error = None, _short_error(exc)
        if not ident:  # a worker's start
            self._started(slot, value, f"the worker could not start: {error}" if error else "")
            return
        item = self.experiments[ident]
        slot.busy = ""
        if error is not None:
            self._worker_lost(slot, item, error)
            return
        if value["status"] == "refused":
            slot.usable, slot.refusal = False, value["reason"]
            self.log(f"worker {slot.name} refuses: {value['reason']}")
            item.state, item.slot = "queued", ""
            self.queue.insert(0, item.id)
            if not any(s.usable for s in self.slots.values()):
                raise SessionError(f"no worker can run this session: {value['reason']}",
                                   "set the nodes up with the same `autoresearch setup`, then `autoresearch session resume`")
            return
        if value.get("log"):  # a run on another node: its log comes back with it
            log_path = self.session.paths.logs / f"{item.number:04d}-{item.commit[:7]}-{slot.name}.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log_path.write_text(value["log"], encoding="utf-8")
        item.node = value.get("node") or item.node
        self._judge(item, value)

    def _worker_lost(self, slot: Slot, item: Experiment, error: str) -> None:
        kill_marked_processes(item.marker, MARKER_ENV)  # its trainer, if it ran on this machine
        self.log(f"worker {slot.name} on {slot.node or '?'} was lost under {item.id} ({error}); starting a new one")
        retry = item.lost == 0
        reason = f"{WORKER_LOST}: {slot.name} on {slot.node or '?'} died during the run ({error})"
        reason += "; queued once more" if retry else "; lost twice, not retried"
        self._settle(item, "crash", reason, self.standing().best_commit, runs=[], final=not retry)
        if retry:
            item.lost, item.avoid = 1, slot.name
            item.state, item.slot, item.runs, item.summaries, item.seconds, item.row, item.target = \
                "queued", "", [], [], 0.0, None, ""
            self.experiments[item.id] = item
            self.queue.insert(0, item.id)
            self._save()
        self._replace_worker(slot)

    # -- judging -------------------------------------------------------------------------------------------
    def _judge(self, item: Experiment, value: dict) -> None:
        config = self.session.config
        standing = self.standing()
        best = standing.best_commit
        item.seconds += float(value.get("seconds") or 0.0)
        if value["status"] != "ok":
            status = value["status"]
            kind = "" if status in ("crash", "tampered") + REFUSED else f"{status}: "
            verdict = "rejected" if status in REFUSED + ("tampered",) else "crash"
            which = "the re-run " if item.runs else ""
            self._settle(item, verdict, f"{which}{kind}{value['reason']}", best, runs=[])
            return
        item.runs.append(value["summary"]["val_bpb"])
        item.summaries.append(value["summary"])
        # The sequential loop's rule (loop.decide): sigma pooled over the session's repeated runs, a
        # screen, then a confirming run and a t test against the incumbent's recent runs. No speed
        # probe here: workers on different nodes run at different speeds by design.
        policy = Policy(rule=config.rule, z=config.z, min_floor=config.min_floor, max_drift_percent=math.inf)
        incumbent = list(standing.incumbent) or [Run(v) for v in standing.best_runs]
        decision = decide_candidate([Run(v) for v in item.runs], incumbent[-WINDOW:],
                                    noise(self.session.verified_rows()), policy)
        if item.base == best:
            if decision.rerun_needed and len(item.runs) == 1:
                self.log(f"{item.id}: {decision.reason}")
                item.state, item.slot = "queued", ""
                self.queue.insert(0, item.id)
                self._save()
                return
            reason = decision.reason + (f"; {item.note}" if item.note else "")
            self._settle(item, decision.verdict, reason, item.commit if decision.verdict == "keep" else best,
                         runs=item.runs, value=decision.val_bpb)
            return
        moved = f"the best moved to {best[:7]} while it ran on {item.base[:7]}"
        if decision.verdict == "keep" or decision.rerun_needed:
            if item.reapplied >= MAX_REAPPLY:
                self._settle(item, "discard", f"stale: {moved}, {item.reapplied + 1} times; not re-applied again",
                             best, runs=item.runs, value=decision.val_bpb)
                return
            self.log(f"{item.id}: {moved}; it beats it ({decision.reason}): re-applying it there")
            item.reapply, item.reapplied, item.measured = True, item.reapplied + 1, decision.val_bpb
            item.runs, item.summaries, item.state, item.slot = [], [], "queued", ""
            self.queue.insert(0, item.id)
            self._save()
            return
        self._settle(item, "discard", f"{decision.reason} (against the current best: {moved})", best,
                     runs=item.runs, value=decision.val_bpb)

    def _new_row(self, commit: str, status: str, description: str, reason: str, standing, slot: Slot | None = None,
                 item: Experiment | None = None, value: float | None = None, best_bpb: float | None = None,
                 trainer_sha: str = "") -> ResultRow:
        run = self.session.config.run
        summaries = item.summaries if item is not None else []
        scored = status in ("keep", "discard") and value is not None
        last = summaries[-1] if summaries else {}
        peaks = [s.get("peak_vram_mb") for s in summaries if isinstance(s.get("peak_vram_mb"), (int, float))]
        holdouts = [s.get("holdout_bpb") for s in summaries if isinstance(s.get("holdout_bpb"), (int, float))]
        return ResultRow(
            commit=commit, val_bpb=value if scored else 0.0,
            memory_gb=round(max(peaks) / 1024, 1) if peaks and scored else 0.0, status=status,
            description=description, seconds=item.seconds if item is not None else None,
            num_steps=last.get("num_steps"), tokens_per_sec=last.get("tokens_per_sec"),
            backend=run.backend, preset=run.preset, device=str(last.get("device") or run.device),
            best_bpb=best_bpb if best_bpb is not None else standing.best_bpb, noise_sigma=standing.sigma,
            sigma_dof=standing.dof,
            reason=reason, trainer_sha=item.trainer_sha if item is not None else trainer_sha,
            runs=encode(list(item.runs)) if item is not None and scored else "",
            **energy_columns([(s.get("energy_j"), s.get("total_seconds") or 0.0) for s in summaries]),
            holdout_bpb=statistics.fmean(holdouts) if holdouts and scored else None,
            worker=(item.slot if item is not None else slot.name if slot else "") if self.ledger_has_worker else "",
            node=(item.node if item is not None else slot.node if slot else "") if self.ledger_has_worker else "")

    def _settle(self, item: Experiment, verdict: str, reason: str, target: str, runs: list,
                value: float | None = None, final: bool = True) -> None:
        """Journal the verdict in the in-flight file, move the branch (a keep), append the row."""
        session = self.session
        standing = self.standing()
        new_best = value if verdict == "keep" else standing.best_bpb
        row = self._new_row(item.commit[:7], verdict, item.description, reason, standing, item=item, value=value,
                            best_bpb=new_best)
        if verdict == "keep" and session.git.parents(target) != [standing.best_commit]:
            raise SessionError(f"internal error: {item.id}'s commit {target[:7]} is not a child of the best "
                               f"{standing.best_commit[:7]}", "run `autoresearch session resume`")
        session.check_frozen(standing.best_commit, "before this verdict")
        with deferred_interrupt():
            item.state, item.target, item.row = "decided", target, row.to_dict()
            self._save()
        _kill_point("decided")
        with deferred_interrupt():
            if verdict == "keep":
                session.git.restore(session.config.branch, target)
            session.record(row)
            if final:  # the file says so at its next write; until then, recovery finds the row in the ledger
                self.experiments.pop(item.id, None)
        scored = verdict in ("keep", "discard") and value is not None
        self.emit(TryResult(verdict, value if scored else None, new_best, previous_best=standing.best_bpb,
                            noise_floor=standing.floor, sigma=standing.sigma, commit=item.commit[:7], reason=reason,
                            description=item.description, runs=[v for v in runs if v is not None], row=row))
        if final:
            self.plan.done += 1
            self._save_plan()

    def _done(self, result: TryResult) -> None:
        """A proposal that ended without a run (unchanged, reused): it still counts as an iteration."""
        self.emit(result)
        self.plan.done += 1
        self._save_plan()

    def _abandon(self, why: str) -> None:
        """Record every experiment still in flight as interrupted (Ctrl-C, a stopped session)."""
        for ident in list(self.queue):
            self.queue.remove(ident)
        self._stop_workers()
        try:
            finish_in_flight(self.session, list(self.experiments.values()), why, self.log)
        finally:
            self.experiments.clear()
            self._save()

    def _stop_agents(self) -> None:
        """Agent calls still running (Ctrl-C, an error): their processes run in the worktrees."""
        import psutil

        from harness.processes import kill_pid_tree

        for child in psutil.Process().children():
            try:
                if Path(child.cwd()).is_relative_to(self.worktrees.folder):
                    kill_pid_tree(child.pid)
            except (psutil.Error, OSError):
                continue

    def _stop_workers(self, close_first: bool = False) -> None:
        """Kill the workers' actors (`close_first`: after they closed their evaluators and meters,
        10 s at most) and the trainers of the experiments in flight."""
        try:
            import ray

            if ray.is_initialized():
                if close_first:
                    closing = [s.actor.close.remote() for s in self.slots.values() if s.actor is not None and s.usable]
                    try:
                        ray.wait(closing, num_returns=len(closing), timeout=10)
                    except Exception:  # noqa: BLE001 - a dead worker has nothing to close
                        pass
                for slot in self.slots.values():
                    if slot.actor is not None:
                        ray.kill(slot.actor)
        except ImportError:
            pass
        for item in self.experiments.values():
            if item.marker:
                kill_marked_processes(item.marker, MARKER_ENV)
        self.pending.clear()

    # -- what is shown and saved ----------------------------------------------------------------------------
    def _poll_states(self, ray) -> None:
        # Once a second, less often for a large pool: a live view, not worth the head's time.
        if time.monotonic() - self.last_poll < POLL_S * max(1.0, len(self.slots) / 8):
            return
        self.last_poll = time.monotonic()
        busy = [s for s in self.slots.values() if s.usable and s.busy and s.busy not in ("starting", "proposing")]
        if busy:
            refs = {s.name: s.actor.state.remote() for s in busy}
            try:
                ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=0.2)
                done = set(ready)
                for name, ref in refs.items():
                    if ref in done:
                        self.slots[name].state = ray.get(ref)
            except Exception:  # noqa: BLE001 - a worker that died shows up through its run
                pass
            if any(s.state.get("phase") == "training" for s in busy):
                _kill_point("training")
        if self.progress:
            self.progress(self.live_line())
        if time.monotonic() - self.last_state_write >= STATE_WRITE_S:
            self._save()

    def live_line(self) -> str:
        parts = []
        for slot in self.slots.values():
            if not slot.usable:
                parts.append(f"{slot.name} refused")
            elif slot.busy in ("", "starting", "proposing"):
                parts.append(f"{slot.name} {slot.busy or 'idle'}")
            else:
                line = slot.state.get("line", "") if slot.state.get("experiment") == slot.busy else ""
                parts.append(f"{slot.name} {slot.busy} {slot.state.get('phase', '')} {line[:60]}".rstrip())
        return " | ".join(parts)

    def _save(self) -> None:
        self.last_state_write = time.monotonic()
        data = {
            "head": {"pid": os.getpid(), "host": socket.gethostname()},
            "cluster": {"address": self.options.address,
                        "processes": self.cluster.processes if self.cluster is not None else []},
            "workers": {s.name: {"node": s.node, "pid": s.pid, "pid_started": s.pid_started, "busy": s.busy,
                                 "usable": s.usable, "refusal": s.refusal, "phase": s.state.get("phase", ""),
                                 "line": s.state.get("line", ""), "trainer_pid": s.state.get("trainer_pid")}
                        for s in self.slots.values()},
            # What recovery and `session status` read (not the runs' summaries: a verdict carries its row).
            "experiments": [{k: v for k, v in vars(e).items() if k != "summaries"} for e in self.experiments.values()],
        }
        atomic_write_text(in_flight_path(self.session.paths), json.dumps(data, sort_keys=True))


# -- prompts --------------------------------------------------------------------------------------------

def with_in_flight(prompt: str, lines: list[str]) -> str:
    """The prompt with the experiments other workers are running now, before the task."""
    if not lines:
        return prompt
    block = ("## Experiments in flight now (other workers are running these: do not repeat them)\n\n"
             + "\n".join(f"- {line}" for line in lines) + "\n\n")
    head, sep, task = prompt.partition("## Your task now")
    return head + block + sep + task if sep else prompt + "\n" + block


def with_wave(prompt: str, worktrees: list[tuple[str, Path]], trainer: str) -> str:
    """A wave: one call, one change in each worktree (a factorial grid, say)."""
    listing = "\n".join(f"- {name}: `{path / trainer}`" for name, path in worktrees)
    return (prompt + "\n## This call is a wave\n\n"
            f"Make {len(worktrees)} different changes, ONE in each of these copies of the trainer (each is run "
            f"and judged on its own, at the same time):\n\n{listing}\n\n"
            "Reply with one line per copy, `NAME: description`, e.g. `w1: MATRIX_LR 0.04 -> 0.05`.\n")


def wave_descriptions(output: str) -> dict[str, str]:
    found = {}
    for line in output.splitlines():
        match = WAVE_LINE.match(line.strip())
        if match:
            found.setdefault(match.group(1), sanitize(match.group(2).strip().strip("`"), 120))
    return found


# -- recovery --------------------------------------------------------------------------------------------

def finish_in_flight(session: Session, items: list[Experiment], why: str, log: Log = quiet) -> list[ResultRow]:
    """Append the rows of experiments a head left in flight: a decided verdict as decided (git moved
    first), any other as an interrupted crash. Rows already in the ledger are not appended twice."""
    rows = []
    decided = [e for e in items if e.state == "decided" and e.row]
    for item in decided:
        row = ResultRow(**item.row)
        with deferred_interrupt():
            if row.status == "keep":
                session.git.restore(session.config.branch, item.target)
            if not _in_ledger(session, row):
                session.record(row)
        rows.append(row)
    standing = session.standing()
    for item in items:
        if item in decided:
            continue
        row = ResultRow(commit=item.commit[:7] if item.commit else NO_COMMIT, val_bpb=0.0, memory_gb=0.0, status="crash",
                        description=item.description, best_bpb=standing.best_bpb, noise_sigma=standing.sigma,
                        reason=f"{INTERRUPTED}: {why} while it was in flight; never scored",
                        trainer_sha=item.trainer_sha, backend=session.config.run.backend,
                        preset=session.config.run.preset, device=session.config.run.device,
                        worker=item.slot, node=item.node, seconds=item.seconds or None)
        session.record(row)
        rows.append(row)
    for row in rows:
        log(f"recorded the experiment left in flight: {row.status} {row.commit} {row.description} ({row.reason})")
    return rows


def recover_parallel(session: Session, log: Log = quiet) -> list[ResultRow]:
    """After a head died: stop what it left running (its local Ray cluster's processes, trainers by
    their markers), record its experiments, put git on the best and remove the worktrees. Safe to
    call at any time; returns the rows it appended."""
    paths = session.paths
    data = read_in_flight(paths)
    worktrees = Worktrees(session.root, paths.directory / WORKTREES_DIR)
    if data is None:
        if worktrees.folder.exists() or worktrees.listed():
            worktrees.remove_all()
        return []
    kill_recorded(data.get("cluster", {}).get("processes", []))
    items = [Experiment(**{k: v for k, v in e.items() if k in Experiment.__dataclass_fields__})
             for e in data.get("experiments", [])]
    for item in items:
        if item.marker:
            kill_marked_processes(item.marker, MARKER_ENV)
    rows = finish_in_flight(session, items, "the head died", log)
    worktrees.remove_all()
    shutil.rmtree(node_folder(session), ignore_errors=True)
    session.git.restore(session.config.branch, session.standing().best_commit)
    in_flight_path(paths).unlink(missing_ok=True)
    return rows


def node_folder(session: Session) -> Path:
    """Where workers on this machine keep the trees the head shipped them (`loop.workers`)."""
    return workers.node_folder(cache_dir(), session.config.tag, str(session.paths.directory))


def _in_ledger(session: Session, row: ResultRow) -> bool:
    key = (row.timestamp, row.commit, row.status, row.description)
    return any((r.timestamp, r.commit, r.status, r.description) == key for r in session.rows()[-50:])


# -- small things ---------------------------------------------------------------------------------------

def _ledger_columns(path: Path) -> set[str]:
    """The columns of an existing ledger (rows are written with its header's columns only)."""
    try:
        with open(path, encoding="utf-8") as f:
            return set(f.readline().rstrip("\r\n").split("\t"))
    except OSError:
        return set(RESULT_COLUMNS)


def _sha_or_missing(path: Path) -> str:
    return sha256_file(path) if path.is_file() else "missing"


def _short_error(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__


def _archive(root: Path, commit: str) -> bytes:
    """The session's tree at `commit`, for workers on other nodes."""
    return subprocess.run(["git", "archive", "--format=tar", commit], cwd=root, check=True, capture_output=True).stdout


def run_parallel(session: Session, plan: LoopPlan, options: ParallelOptions, emit: Callable[[TryResult], None],
                 log: Log = quiet, progress: Log | None = None, resumed: bool = False) -> str:
    """The parallel loop: see the module docstring. Returns why it stopped."""
    return ParallelLoop(session, plan, options, emit, log, progress, resumed).run()
