"""What survives `kill -9`: the write-ahead journal of the experiment in flight, the saved state
of a loop, and holding Ctrl-C while either is being made consistent with git and the ledger.

Before anything irreversible, the experiment in flight is written to the session's journal
(`journal.json`, atomic replace + fsync), phase by phase:

    baseline  the baseline runs are under way (their rows are appended one by one)
    commit    about to commit the candidate (best commit, description, trainer hash)
    run       the candidate commit exists and is being trained (its runs so far)
    decided   the verdict and its whole row are known; git is being moved to the target commit
              (candidate on keep, best otherwise) and the row appended

A running trainer is recorded in the entry too (`trainer_pid`, `trainer_started`), so recovery
can stop it (`loop.orphans`). What recovery does with each phase is `Session.recover`'s job
(`loop.ratchet`).
"""

from __future__ import annotations

import json
import signal
import threading
import time
from contextlib import contextmanager
from typing import Iterator

from harness.files import atomic_write_text
from loop.session import SessionPaths


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


def record_trainer(paths: SessionPaths, entry: dict, pid: int) -> None:
    """Note the trainer just started for `entry` (its pid, and when, to tell it from a later
    process that reuses the pid), so that recovery can kill it if this process dies."""
    entry.update(trainer_pid=pid, trainer_started=time.time())
    write_journal(paths, entry)


def read_loop_state(paths: SessionPaths) -> dict | None:
    try:
        return json.loads(paths.loop_state.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_loop_state(paths: SessionPaths, data: dict) -> None:
    atomic_write_text(paths.loop_state, json.dumps(data, indent=1, sort_keys=True))


@contextmanager
def deferred_interrupt() -> Iterator[None]:
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
