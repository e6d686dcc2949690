"""`autoresearch loop`: propose a change, `try` it, repeat, until `--max` or `--hours` say stop.

The proposer is an external agent command (`loop.agents.run_agent`, prompted with program.md and
the session's facts) or the built-in `mutate`. The loop's arguments and progress are saved after
every iteration (`loop.journal.write_loop_state`), so `session resume` continues a loop that a
crash or a reboot interrupted; one that finished or was stopped with Ctrl-C is not resumed.
"""

from __future__ import annotations

import os
import random
import secrets
import time
from dataclasses import asdict, dataclass
from typing import Callable

from harness.files import sha256_file
from loop.session import SessionPaths
from loop.agents import build_prompt, facts_from_rows, memory_ceiling_gb, mutate, run_agent
from loop.errors import FrozenEvaluatorError, SessionError
from loop.journal import read_journal, read_loop_state, write_loop_state
from loop.lock import LOCK_TOKEN_ENV
from loop.ratchet import Log, Session, TryResult, name_list, quiet

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


def interrupted_loop(paths: SessionPaths) -> LoopPlan | None:
    """The loop a dead process was running, or one halted by a changed frozen file; a loop that
    finished, or that a human stopped with Ctrl-C, is not resumed."""
    data = read_loop_state(paths)
    if not data or data.get("state") not in ("running", "halted"):
        return None
    return LoopPlan(**{k: v for k, v in data.items() if k in LoopPlan.__dataclass_fields__})


def run_loop(session: Session, plan: LoopPlan, emit: Callable[[TryResult], None], log: Log = quiet,
             progress: Log | None = None, lock_token: str | None = None, resumed: bool = False) -> str:
    """Propose, try, repeat until `plan` says stop. Returns why it stopped. Raises
    FrozenEvaluatorError (the session must stop) and SessionError for a broken agent command;
    Ctrl-C records the experiment in flight as interrupted and re-raises KeyboardInterrupt.

    A new loop refuses to start over changes nobody has tried yet (they may be a human's); a
    resumed one drops what its dead predecessor's agent left half-made."""
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
        memory_ceiling = None if plan.agent == MUTATE else memory_ceiling_gb(session.config.run.device)
        with session.warm_evaluator(log):  # one evaluator process for the whole loop
            while (why := plan.remaining()) is None:
                started = time.monotonic()
                if plan.agent == MUTATE:
                    description = _propose_mutation(session, rng, mutate)
                else:
                    description, failures = _ask_agent(session, plan, plan.done + 1, failures, memory_ceiling, log)
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


def session_facts(session: Session, standing, memory_ceiling: float | None):
    """What an agent's prompt says of the session (loop.agents.facts_from_rows), as it stands."""
    program = session.root / "program.md"
    return facts_from_rows(
        program.read_text(encoding="utf-8") if program.is_file() else "",
        session.config.backend, session.config.preset, session.config.trainer, standing.rows,
        noise_floor=standing.floor if session.config.rule == "noise" else None,
        noise_sigma=standing.sigma or None, device=session.config.run.device,
        time_budget=session.config.run.evaluator.TIME_BUDGET, rule=session.config.rule,
        memory_ceiling_gb=memory_ceiling,
    )


def _ask_agent(session: Session, plan: LoopPlan, number: int, failures: int, memory_ceiling: float | None,
               log: Log) -> tuple[str, int]:
    """Run the agent command once on the prompt for this iteration; its reply is kept in the
    session's logs. Returns the description of its change and how many calls in a row have now
    failed (exited with an error, changing nothing); raises SessionError once that many say the
    command itself is broken."""
    standing = session.standing()
    facts = session_facts(session, standing, memory_ceiling)
    log(f"iteration {number}: running the agent")
    outcome = run_agent(plan.agent, build_prompt(facts), session.root, plan.agent_timeout)
    session.paths.logs.mkdir(parents=True, exist_ok=True)
    (session.paths.logs / f"agent-{number:04d}.log").write_text(
        outcome.output + ("\n--- stderr ---\n" + outcome.stderr if outcome.stderr else ""), encoding="utf-8")
    if outcome.timed_out:
        log(f"  the agent ran past {plan.agent_timeout:g} s and was stopped; trying what it left")
    description = outcome.description or _agent_commit_message(session) or "change by the agent"
    if outcome.returncode in (0, None) or session.git.changes_since(session.standing().best_commit):
        return description, 0
    failures += 1
    detail = (outcome.stderr or outcome.output).strip().splitlines()[-1:] or [""]
    log(f"  the agent exited with {outcome.returncode} and changed nothing: {detail[0][:200]}")
    if outcome.returncode == 127 or failures >= MAX_AGENT_FAILURES:
        raise SessionError(f"the agent command failed {failures} time(s) in a row "
                           f"(exit {outcome.returncode}): {detail[0][:200]}",
                           "check the --agent command line by running it by hand")
    return description, failures


def _start_from_best(session: Session, resumed: bool, log: Log) -> None:
    best = session.standing().best_commit
    pending = session.git.changes_since(best)
    off = session.git.branch() != session.config.branch or session.git.head() != best
    if not pending and not off:
        return
    if not resumed and pending:
        raise SessionError(f"the working tree has changes that were not tried: {name_list(pending)}",
                           "try them first (`autoresearch try -m ...`) or drop them (`git checkout -- .`)")
    session.git.restore(session.config.branch, best)
    if pending:
        log(f"dropped the unfinished change of the interrupted iteration ({name_list(pending)})")


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
