"""`autoresearch session start|status|end|resume`, `autoresearch try` and `autoresearch loop`:
the ratchet's front door. The logic lives in `loop.ratchet` (sessions) and `loop.driver` (the
loop); this module parses options, holds the repository lock while something changes, and prints
(data on stdout, messages on stderr).

Exit codes: 0 done (whatever the verdict), 1 an error to fix (the message says what),
2 a usage error (a wrong option), 3 the frozen evaluator or the session's own state changed (the
session is stopped), 130 interrupted with Ctrl-C.
"""

from __future__ import annotations

import errno
import json
import sys
from contextlib import contextmanager
from typing import Annotated, Callable, Iterator, Optional

import typer

from autoresearch.output import err, fail, info, labelled, plain, print_json, warn
from autoresearch.progress import periodic_printer, refuse_inside_trainer

session_app = typer.Typer(help="Start, inspect, end or resume the repository's research session.",
                          no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]


@contextmanager
def _guarded(command: str, lock: bool = True) -> Iterator[object]:
    """Hold the repository lock (if asked) and turn the ratchet's errors into CLI errors."""
    from harness.paths import repo_root
    from loop.errors import SessionError
    from loop.lock import RepoLock

    refuse_inside_trainer(command)
    root = repo_root()
    holder = RepoLock(root, command)
    try:
        if lock:
            holder.acquire()
        yield holder
    except SessionError as exc:
        fail(str(exc), exc.hint, code=exc.exit_code)
    except KeyboardInterrupt:
        labelled("interrupted", "yellow", "stopped cleanly; `autoresearch session status` shows where things stand")
        raise typer.Exit(130)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)):
            fail(f"could not write: {exc}",
                 "free some space, then run `autoresearch session resume`: the experiment's verdict is kept in "
                 "the session's journal and is recorded then")
        raise
    except Exception as exc:
        from git import GitCommandError

        if isinstance(exc, GitCommandError):
            fail(f"git failed: {' '.join(str(a) for a in exc.command)}: {str(exc.stderr).strip()}",
                 "fix the repository, then `autoresearch session resume` puts it back on the best commit")
        raise
    finally:
        holder.release()


def _progress() -> tuple[Callable[[str], None] | None, Callable[[], None]]:
    """A one-line live status for the trainer's progress on an interactive terminal; off one, a
    line on stderr every few seconds."""
    if not err.is_terminal:
        return periodic_printer(), lambda: None
    status = err.status("starting...")
    status.start()
    return (lambda line: status.update(plain(line[:120] or "running..."))), status.stop


def _root():
    from harness.paths import repo_root

    return repo_root()


# -- session ------------------------------------------------------------------------------------

@session_app.command("start")
def start(
    tag: Annotated[str, typer.Argument(help="Names the session and its branch autoresearch/TAG, e.g. the date: mar5.")],
    rule: Annotated[str, typer.Option("--rule", help="Keep rule: noise (gain must beat the noise floor) or strict (upstream: any lower score).")] = "noise",
    z: Annotated[float, typer.Option("--z", help="Noise rule: a kept gain passes a one-sided t test at the normal tail of z sigmas (pooled sigma).")] = 2.0,
    min_floor: Annotated[float, typer.Option("--min-floor", help="Noise rule: the floor never drops below this (val_bpb).")] = 3e-4,
    max_drift: Annotated[float, typer.Option("--max-drift", min=0, help="Noise rule: a run whose machine speed moved more than this many percent from the best's is void and run again (0: never void).")] = 25.0,
    recheck_every: Annotated[int, typer.Option("--recheck-every", min=1, help="Noise rule: re-run the best after this many experiments judged against it.")] = 5,
    repeats: Annotated[Optional[int], typer.Option("--repeats", min=1, help="Baseline runs that measure the noise (default: the preset's BASELINE_REPEATS).")] = None,
    timeout: Annotated[Optional[float], typer.Option("--timeout", min=1, help="Hard limit of one trainer run in seconds (default: 2 x TIME_BUDGET + 300).")] = None,
    json_output: JsonOpt = False,
) -> None:
    """Start a session: its own branch, a frozen evaluator and a measured baseline.

    Creates branch autoresearch/TAG from a clean HEAD, freezes the evaluator (a manifest of
    hashes), and runs the unchanged trainer k times to measure the noise floor."""
    from loop.errors import BaselineFailed
    from loop.ratchet import Session

    with _guarded(f"autoresearch session start {tag}"):
        update, stop = _progress()
        try:
            session = Session.start(_root(), tag, rule=rule, z=z, min_floor=min_floor, repeats=repeats,
                                    timeout=timeout, max_drift=max_drift, recheck_every=recheck_every, log=info,
                                    progress=update)
        except BaselineFailed as exc:
            err.print(exc.log_tail, markup=False, highlight=False)
            raise
        finally:
            stop()
        status = session.status()
    if json_output:
        print_json(status)
        return
    print(f"session {status['tag']} started on {status['branch']}: baseline val_bpb={status['baseline_bpb']:.6f} "
          f"over {len(status['baseline_runs'])} run(s), sigma={status['sigma']:.6f}, "
          f"noise_floor={status['noise_floor']:.6f} ({status['rule']} rule)")
    info(f"next: edit {status['trainer']} and run `autoresearch try -m \"what changed\"`, "
         "or let an agent do it: `autoresearch loop --agent mutate`")


@session_app.command("status")
def status(json_output: JsonOpt = False) -> None:
    """Show the active session: best, noise floor, counts, anything in flight."""
    from loop.ratchet import Session

    from loop.parallel import in_flight_lines

    with _guarded("autoresearch session status", lock=False):
        session = Session.active(_root())
        data = session.status()
        data["experiments_in_flight"] = in_flight_lines(session.paths)
    if json_output:
        print_json(data)
        return
    counts = ", ".join(f"{k} {v}" for k, v in sorted(data["counts"].items())) or "none"
    lines = [
        f"session:      {data['tag']} on {data['branch']} ({data['backend']} / {data['preset']}, {data['device']})",
        f"trainer:      {data['trainer']}",
        f"rule:         {data['rule']}" + (f" (z {data['z']:g}, min floor {data['min_floor']:g}, void past "
                                           f"{data['max_drift']:g} % speed drift)" if data["rule"] == "noise" else ""),
        f"baseline:     {_bpb(data['baseline_bpb'])} (runs: {', '.join(f'{v:.6f}' for v in data['baseline_runs']) or 'none yet'})",
        f"noise:        sigma {data['sigma']:.6f} ({data['sigma_dof']} dof, pooled over every repeated run), "
        f"floor {data['noise_floor']:.6f}",
        f"cost:         {_cost(data['cost'])}",
        f"best:         {_bpb(data['best_bpb'])} at {data['best_commit']}",
        f"holdout:      {data['holdout_detail']}",
        f"experiments:  {data['experiments']} ({counts})",
        f"ledger:       {data['ledger']['detail']}",
        f"git:          HEAD {data['head']}" + ("" if data["on_branch"] else " (not on the session branch)")
        + (f", untried changes: {', '.join(data['pending_changes'])}" if data["pending_changes"] else ""),
    ]
    if data["in_flight"]:
        lines.append(f"in flight:    an experiment was interrupted in phase {data['in_flight']}: "
                     "`autoresearch session resume` finishes it")
    for number, line in enumerate(data["experiments_in_flight"]):
        lines.append(f"{'in flight:' if number == 0 else '':<14}{line}")
    if data["busy"]:
        lines.append(f"busy:         {data['busy']}")
    loop = data.get("loop")
    if loop:
        lines.append(f"loop:         {loop.get('agent')}: {loop.get('done', 0)} iteration(s), {loop.get('state')}")
    print("\n".join(lines))


@session_app.command("end")
def end(json_output: JsonOpt = False) -> None:
    """End the active session.

    Its branch, results and logs stay; a new session may start."""
    from loop.parallel import recover_parallel
    from loop.ratchet import Session

    with _guarded("autoresearch session end"):
        session = Session.active(_root())
        recover_parallel(session, log=info)  # what a parallel loop's dead head left: rows, worktrees
        data = session.end()
    if json_output:
        print_json(data)
        return
    print(f"session {data['tag']} ended: best val_bpb={_bpb(data['best_bpb'])} at {data['best_commit']} "
          f"on {data['branch']}, {data['experiments']} experiment(s)")


@session_app.command("resume")
def resume(
    no_loop: Annotated[bool, typer.Option("--no-loop", help="Only repair the state; do not continue an interrupted loop.")] = False,
    json_output: JsonOpt = False,
) -> None:
    """Continue after a crash, a kill or a reboot.

    Finishes or records the experiment in flight, puts git back on the best commit, then
    continues the loop that was running (if any)."""
    from loop.driver import interrupted_loop
    from loop.journal import read_journal, read_loop_state
    from loop.parallel import read_in_flight, recover_parallel
    from loop.ratchet import Session

    with _guarded("autoresearch session resume") as lock:
        session = Session.active(_root())
        if read_journal(session.paths) is None and read_in_flight(session.paths) is None:
            info("nothing was in flight")
        update, stop = _progress()
        try:
            session.recover(log=info, progress=update)
            recover_parallel(session, log=info)
        finally:
            stop()
        plan = None if no_loop else interrupted_loop(session.paths)
        if plan is not None:
            info(f"continuing the loop with --agent {plan.agent!r} after {plan.done} iteration(s)")
            saved = read_loop_state(session.paths) or {}
            _loop(session, plan, json_output, lock.token, resumed=True,
                  parallel=_parallel(int(saved.get("workers") or 1), saved.get("ray"), bool(saved.get("wave"))))
        else:
            data = session.status()
    if plan is None:
        if json_output:
            print_json(data)
        else:
            print(f"session {data['tag']}: best val_bpb={_bpb(data['best_bpb'])} at {data['best_commit']}, "
                  f"{data['experiments']} experiment(s); ready")


def _cost(cost: dict) -> str:
    """Runs per experiment and where they went (confirmations, voided runs, re-checks)."""
    if not cost.get("experiments"):
        return "no experiment yet"
    return (f"{cost['runs_per_experiment']:.2f} runs per experiment (confirmations {cost['confirmations']:.2f}, "
            f"voided {cost['voids']:.2f}, re-checks of the best {cost['rechecks']:.2f})")


def _bpb(value: float | None) -> str:
    return "-" if value is None else f"{value:.6f}"


# -- try and loop -------------------------------------------------------------------------------

def try_(
    message: Annotated[str, typer.Option("-m", "--message", help="What the change is (the commit message and the results description).")],
    json_output: JsonOpt = False,
) -> None:
    """Judge the trainer edit in the working tree: keep it or revert it.

    Verifies the frozen evaluator, commits, trains with the hard timeout, keeps or reverts by the
    session's rule, logs the row and prints one line."""
    from loop.ratchet import Session

    with _guarded("autoresearch try"):
        session = Session.active(_root())
        tracking = _tracker()
        update, stop = _progress()
        try:
            result = session.try_change(message, log=info, progress=update)
        finally:
            stop()
    if json_output:
        print_json(result.to_dict())
    else:
        print(result.line(), flush=True)
    _track(tracking, session, result)


def _tracker() -> str | None:
    """The tracker `AUTORESEARCH_TRACK` names (loop.tracking); an unknown one is named before any
    experiment runs, and the experiments go on untracked."""
    from loop.tracking import tracker

    try:
        return tracker()
    except ValueError as exc:
        warn(f"{exc}; experiments are not tracked")
        return None


def _track(tracking: str | None, session, result) -> None:
    """Log the experiment to the tracker, if one is on."""
    from pathlib import Path

    from loop.tracking import track_experiment

    if tracking and result.row is not None:
        run_dir = session.paths.runs / Path(result.log).stem if result.log else None
        info(track_experiment(f"autoresearch-{session.config.tag}", result.row, run_dir))


def loop(
    agent: Annotated[str, typer.Option("--agent", help="The agent command line (prompt on stdin, or {prompt_file} in it), or `mutate` for the built-in offline proposer.")],
    max_iterations: Annotated[Optional[int], typer.Option("--max", min=1, help="Stop after N iterations.")] = None,
    hours: Annotated[Optional[float], typer.Option("--hours", min=0, help="Stop starting new iterations after H hours.")] = None,
    agent_timeout: Annotated[float, typer.Option("--agent-timeout", min=1, help="Kill an agent call after S seconds (what it changed is still tried).")] = 1800,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed of the mutate proposer (default: random).")] = None,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Experiments in flight at once, one per accelerator (or CPU share), through Ray.")] = 1,
    ray_address: Annotated[Optional[str], typer.Option("--ray", envvar="RAY_ADDRESS", help="Run the workers on this Ray cluster (default: a local one; RAY_ADDRESS too).")] = None,
    wave: Annotated[bool, typer.Option("--wave", help="With --workers: one agent call proposes a change in each free worker's copy.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object per experiment on stdout (JSON lines).")] = False,
) -> None:
    """Run experiments until --max or --hours: the agent edits, the harness tries.

    Never stops on its own otherwise, except when the frozen evaluator changes. Ctrl-C stops
    cleanly; after a crash or a reboot, `autoresearch session resume` continues."""
    from loop.driver import LoopPlan
    from loop.ratchet import Session

    if not agent.strip():
        fail("--agent is empty", "pass an agent command line, e.g. --agent 'claude -p', or --agent mutate")
    parallel = _parallel(workers, ray_address, wave)
    with _guarded(f"autoresearch loop --agent {agent}") as lock:
        session = Session.active(_root())
        plan = LoopPlan(agent=agent.strip(), max_iterations=max_iterations, hours=hours,
                        agent_timeout=agent_timeout, seed=seed)
        _loop(session, plan, json_output, lock.token, parallel=parallel)


def _parallel(workers: int, address: str | None, wave: bool):
    """The parallel loop's options, or None for the one-worker loop (no Ray involved)."""
    if workers == 1 and not address:
        if wave:
            fail("--wave needs more than one worker", "add --workers N (one proposal per worker, N of them per agent call)",
                 code=2)
        return None
    from loop.parallel import ParallelOptions

    return ParallelOptions(workers=workers, address=address or None, wave=wave)


def _loop(session, plan, json_output: bool, token: str, resumed: bool = False, parallel=None) -> None:
    from loop.driver import run_loop

    tracking = _tracker()

    def emit(result) -> None:
        if json_output:
            sys.stdout.write(json.dumps(result.to_dict(), default=str) + "\n")
        else:
            sys.stdout.write(result.line() + "\n")
        sys.stdout.flush()
        _track(tracking, session, result)

    update, stop = _progress()
    try:
        if parallel is None:
            why = run_loop(session, plan, emit, log=info, progress=update, lock_token=token, resumed=resumed)
        else:
            from loop.parallel import run_parallel

            why = run_parallel(session, plan, parallel, emit, log=info, progress=update, resumed=resumed)
    finally:
        stop()
    status = session.status()
    info(f"loop done: {why}; best val_bpb {_bpb(status['best_bpb'])} at {status['best_commit']}")
    if status["counts"].get("crash", 0) and status["experiments"] == status["counts"]["crash"]:
        warn("every experiment crashed: look at the logs in " + str(session.paths.logs))


def register(app: typer.Typer) -> None:
    app.add_typer(session_app, name="session", rich_help_panel="Research loop")
    app.command("try", rich_help_panel="Research loop")(try_)
    app.command("loop", rich_help_panel="Research loop")(loop)
