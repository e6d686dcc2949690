"""Child processes that can be stopped whole, on POSIX and Windows (process facts from psutil).

Trainers and agents run in a process group of their own (`new_process_group()`), so that killing
them also kills what they started (dataloader workers, compilers, an agent's tools) and never the
caller. Processes that left the group (a child started with `start_new_session=True`) are found by
the run's marker in their environment, or because they were seen among the trainer's descendants
while it ran (`Descendants`). A process orphaned by a dead parent is found again by its pid, and
told apart from a later process that reused the pid by its start time (`process_start_time`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil

KILL_WAIT_S = 5.0


def new_process_group() -> dict:
    """`subprocess.Popen` keyword arguments that start the child in a new process group."""
    if os.name == "nt":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


def kill_process_tree(proc: subprocess.Popen) -> None:
    """Kill a child started with `new_process_group()` and everything it started, then reap it."""
    _kill_tree(proc.pid, own_group=True)
    try:
        proc.kill()  # the child itself, should the tree kill have failed
    except OSError:
        pass
    proc.wait()


def kill_pid_tree(pid: int) -> None:
    """Kill process `pid`, its descendants and its process group. Never this process's own group.
    A process that is already gone is not an error."""
    _kill_tree(pid, own_group=False)


def _kill_tree(pid: int, own_group: bool) -> None:
    try:
        victims = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        victims = []
    if os.name != "nt":
        try:
            group = pid if own_group else os.getpgid(pid)
            if group != os.getpgrp():
                os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for victim in victims:
        try:
            victim.kill()
        except psutil.Error:
            pass


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (a zombie counts)."""
    return pid > 0 and psutil.pid_exists(pid)


def process_running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped (a zombie holds its pid but does nothing)."""
    try:
        return pid > 0 and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def process_start_time(pid: int) -> float | None:
    """When process `pid` started, in seconds since the epoch, or None when it does not exist."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def same_process(pid: int, started: float, tolerance: float = 5.0) -> bool:
    """Whether `pid` is still the process that started at `started` (not a later one reusing it)."""
    actual = process_start_time(pid)
    return actual is not None and abs(actual - started) <= tolerance


def marked_processes(name: str, marker: str) -> list[psutil.Process]:
    """Processes of this user whose environment holds `name=marker` (never this process)."""
    if not marker:
        return []
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            if proc.environ().get(name) == marker:
                found.append(proc)
        except psutil.Error:
            continue  # gone, a zombie, or someone else's
    return found


def kill_marked_processes(marker: str, name: str = "AUTORESEARCH_EXPERIMENT") -> int:
    """Kill every process carrying the run's marker, with its group; returns how many were still
    running after the wait (0: all gone)."""
    victims = marked_processes(name, marker)
    for victim in victims:
        kill_pid_tree(victim.pid)
    return len(wait_gone(victims))


class Descendants:
    """The processes seen below a root process while it ran (with their start times, so a reused
    pid is never killed): `watch()` now and then, `kill()` at the end."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.seen: dict[int, float] = {}

    def watch(self) -> None:
        try:
            children = psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            return
        for child in children:
            try:
                self.seen.setdefault(child.pid, child.create_time())
            except psutil.Error:
                continue

    def kill(self) -> int:
        """Kill those still alive; returns how many outlived the wait."""
        alive = []
        for pid, started in self.seen.items():
            if same_process(pid, started, tolerance=0.01):
                kill_pid_tree(pid)
                try:
                    alive.append(psutil.Process(pid))
                except psutil.Error:
                    pass
        return len(wait_gone(alive))


def wait_gone(processes: list[psutil.Process], timeout: float = KILL_WAIT_S) -> list[psutil.Process]:
    """Those of `processes` still running (not zombies) after up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    remaining = list(processes)
    while remaining and time.monotonic() < deadline:
        remaining = [p for p in remaining if _still_running(p)]
        if remaining:
            time.sleep(0.05)
    return remaining


def _still_running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
