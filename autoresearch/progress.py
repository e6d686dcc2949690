"""Progress of long commands, and the commands a trainer may not start.

On a terminal the latest trainer line is shown in a spinner; off a terminal (a log, an agent's
pipe) a line goes to stderr every `EVERY_S` seconds, so a run is never silent for minutes.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from autoresearch.output import err, fail, plain

EVERY_S = 5.0
IN_TRAINER_ENV = "AUTORESEARCH_IN_TRAINER"  # harness.scoring.context sets it for every trainer


@contextmanager
def progress_reporter(initial: str = "starting...") -> Iterator[Callable[[str], None]]:
    """A `report(line)` callback for the runner's `on_progress`."""
    if err.is_terminal:
        with err.status(plain(initial)) as status:
            yield lambda line: status.update(plain(line[:120] or initial))
        return
    yield periodic_printer()


def periodic_printer() -> Callable[[str], None]:
    """`report(line)` that prints the latest line to stderr at most every `EVERY_S` seconds."""
    start = time.monotonic()
    last = [start]

    def report(line: str) -> None:
        now = time.monotonic()
        if line and now - last[0] >= EVERY_S:
            last[0] = now
            print(f"[{now - start:5.0f} s] {line[:200]}", file=sys.stderr, flush=True)

    return report


def refuse_inside_trainer(command: str) -> None:
    """A trainer (and anything it starts) may not run experiments or drive a session."""
    if os.environ.get(IN_TRAINER_ENV):
        fail(f"`autoresearch {command}` was started from inside a running trainer",
             "a trainer trains and hands its model back; experiments and sessions are started by you or your "
             "agent, never by train.py")
