"""Stopping the trainer a dead loop left running, before `resume` goes on.

When the loop (or `try`) is killed, its trainer lives on in its own process group. The journal
records the trainer's pid and when it started (`journal.record_trainer`); recovery kills that
process group if a process with that pid still runs and started then (a later process that reused
the pid is left alone). On Linux, processes carrying the experiment's marker in their environment
are killed too: that also finds workers that left the trainer's group. Elsewhere, such an escaped
worker runs to its own end and its result is ignored.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from harness.processes import kill_pid_tree, process_running, process_start_time

MARKER_ENV = "AUTORESEARCH_EXPERIMENT"  # in every trainer's environment, to find orphans
START_TOLERANCE_S = 5.0  # the recorded start vs the process's own: clock resolution and Popen's latency
KILL_WAIT_S = 5.0


def kill_orphaned_trainer(entry: dict) -> int:
    """Kill the trainer a journal entry names (by pid and start time, then by marker); returns
    how many processes it killed that were still running after the wait (0: all gone)."""
    survivors = []
    pid, started = entry.get("trainer_pid"), entry.get("trainer_started")
    if isinstance(pid, int) and isinstance(started, (int, float)) and _started_at(pid, started):
        kill_pid_tree(pid)
        survivors = _wait_gone([pid])
    return len(survivors) + kill_marked_processes(entry.get("marker", ""))


def _started_at(pid: int, started: float) -> bool:
    actual = process_start_time(pid)
    return actual is not None and abs(actual - started) <= START_TOLERANCE_S


def kill_marked_processes(marker: str) -> int:
    """Kill the process groups of processes whose environment holds `MARKER_ENV=marker`: a
    trainer orphaned when the loop died. Linux only (reads /proc). Returns how many were still
    running after the wait."""
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
        kill_pid_tree(pid)
    return len(_wait_gone(victims))


def _wait_gone(pids: list[int]) -> list[int]:
    deadline = time.monotonic() + KILL_WAIT_S
    while pids and time.monotonic() < deadline:
        pids = [pid for pid in pids if process_running(pid)]
        if pids:
            time.sleep(0.05)
    return pids
