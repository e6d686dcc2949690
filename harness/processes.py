"""Child processes that can be stopped whole, on POSIX and Windows.

Trainers and agents run in a process group of their own (`new_process_group()`), so that killing
them also kills what they started (dataloader workers, compilers, an agent's tools) and never the
caller. A process orphaned by a dead parent is found again by its pid, and told apart from a later
process that reused the pid by its start time (`process_start_time`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

_STILL_ACTIVE = 259  # Windows: GetExitCodeProcess of a running process
_QUERY_LIMITED_INFORMATION = 0x1000  # Windows: OpenProcess access right
_EPOCH_AS_FILETIME = 116444736000000000  # 1970-01-01 in 100 ns ticks since 1601-01-01


def new_process_group() -> dict:
    """`subprocess.Popen` keyword arguments that start the child in a new process group."""
    if os.name == "nt":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


def kill_process_tree(proc: subprocess.Popen) -> None:
    """Kill a child started with `new_process_group()` and everything it started, then reap it."""
    _kill_tree(proc.pid, own_group=True)
    try:
        proc.kill()  # the child itself, should the tree kill have failed (taskkill refused)
    except OSError:
        pass
    proc.wait()


def kill_pid_tree(pid: int) -> None:
    """Kill process `pid` and its process group (on Windows: its tree). Never this process's own
    group. A process that is already gone is not an error."""
    _kill_tree(pid, own_group=False)


def _kill_tree(pid: int, own_group: bool) -> None:
    if os.name == "nt":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(pid)], capture_output=True)
        return
    try:
        group = pid if own_group else os.getpgid(pid)
        if group == os.getpgrp():
            os.kill(pid, signal.SIGKILL)  # it shares our group: kill it alone, not us
        else:
            os.killpg(group, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (a zombie on POSIX counts)."""
    if pid <= 0:
        return False
    if os.name == "nt":
        import ctypes

        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(_QUERY_LIMITED_INFORMATION, False, pid)
        if not handle:
            return False
        code = ctypes.c_ulong()
        kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return code.value == _STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def process_running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped (a zombie holds its pid but does nothing)."""
    if not pid_alive(pid):
        return False
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():  # Linux: the state field tells zombies apart
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False
    return True


def process_start_time(pid: int) -> float | None:
    """When process `pid` started, in seconds since the epoch (to about a second), or None when
    it does not exist or this platform cannot tell."""
    if os.name == "nt":
        return _start_time_windows(pid)
    if Path("/proc/self/stat").exists():
        return _start_time_proc(pid)
    return _start_time_ps(pid)


def _start_time_proc(pid: int) -> float | None:
    """Linux: field 22 of /proc/PID/stat is the start in clock ticks after boot (`btime`)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22; fields here start at field 3 (the state)
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
    except (OSError, IndexError, ValueError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def _start_time_ps(pid: int) -> float | None:
    """Other POSIX (macOS, BSD): `ps` reports the elapsed time as [[dd-]hh:]mm:ss."""
    try:
        done = subprocess.run(["ps", "-o", "etime=", "-p", str(pid)], capture_output=True, text=True,
                              timeout=10, env=dict(os.environ, LC_ALL="C"))
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = done.stdout.strip()
    if done.returncode != 0 or not text:
        return None
    days, _, clock = text.rpartition("-")
    try:
        seconds = 0
        for part in clock.split(":"):
            seconds = seconds * 60 + int(part)
        seconds += int(days or 0) * 86400
    except ValueError:
        return None
    return time.time() - seconds


def _start_time_windows(pid: int) -> float | None:
    import ctypes

    kernel32 = ctypes.windll.kernel32
    handle = kernel32.OpenProcess(_QUERY_LIMITED_INFORMATION, False, pid)
    if not handle:
        return None
    try:
        created, exited, kernel, user = (ctypes.c_ulonglong() for _ in range(4))
        if not kernel32.GetProcessTimes(handle, ctypes.byref(created), ctypes.byref(exited),
                                        ctypes.byref(kernel), ctypes.byref(user)):
            return None
        return (created.value - _EPOCH_AS_FILETIME) / 1e7
    finally:
        kernel32.CloseHandle(handle)
