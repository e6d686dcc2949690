"""Stopping the trainer a dead loop left running, before `resume` goes on.

When the loop (or `try`) is killed, its trainer lives on in its own process group. The journal
records the trainer's pid and when it started (`journal.record_trainer`); recovery kills that
process and its group if a process with that pid still runs and started then (a later process
that reused the pid is left alone). Processes carrying the experiment's marker in their
environment are killed too: that also finds workers that left the trainer's group.
"""

from __future__ import annotations

import psutil

from harness.processes import kill_marked_processes, kill_pid_tree, same_process, wait_gone
from harness.scoring.runner import MARKER_ENV


def kill_orphaned_trainer(entry: dict) -> int:
    """Kill the trainer a journal entry names (by pid and start time, then by marker); returns
    how many processes it killed that were still running after the wait (0: all gone)."""
    survivors = []
    pid, started = entry.get("trainer_pid"), entry.get("trainer_started")
    if isinstance(pid, int) and isinstance(started, (int, float)) and same_process(pid, started):
        try:
            trainer = psutil.Process(pid)
        except psutil.Error:
            trainer = None
        kill_pid_tree(pid)
        survivors = wait_gone([trainer]) if trainer is not None else []
    return len(survivors) + kill_marked_processes(entry.get("marker", ""), MARKER_ENV)
