"""One process at a time works on a repository's session: the lock file and who holds it.

`state_dir/session.lock` holds the holder's pid, host, start time, command and a token. It is
created with O_EXCL; a lock whose process is gone on this host is stale and taken over. "Gone" is
judged by the pid and the process's own start time, so a lock left by a machine that rebooted is
not kept alive by an unrelated process that got the same pid. A `try`
launched by an agent that `loop` started inherits the loop's lock through `AUTORESEARCH_LOCK_TOKEN`,
so agents may call `try` themselves too.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from harness.paths import state_dir
from harness.processes import pid_alive, process_start_time, same_process
from loop.session import now_utc
from loop.errors import SessionError

LOCK_FILE = "session.lock"
LOCK_TOKEN_ENV = "AUTORESEARCH_LOCK_TOKEN"


@dataclass(frozen=True)
class LockHolder:
    pid: int
    host: str
    started: str
    command: str
    token: str
    pid_started: float | None = None  # the holder's process start time (epoch seconds)

    @property
    def stale(self) -> bool:
        if self.host != socket.gethostname():
            return False
        if self.pid_started is None:  # a lock written before start times were recorded
            return not pid_alive(self.pid)
        return not same_process(self.pid, self.pid_started, tolerance=1.0)

    def describe(self) -> str:
        return f"`{self.command}` (pid {self.pid} on {self.host}, since {self.started})"


class RepoLock:
    """One process at a time works on a repository's session. Created with O_EXCL; a lock left by
    a dead process on this host is taken over. Use as a context manager."""

    CREATING_GRACE_S = 10.0  # an empty lock file younger than this is being written right now

    def __init__(self, root: Path, command: str):
        self.path = state_dir(root) / LOCK_FILE
        self.command = command
        self.token = secrets.token_hex(8)
        self.nested = False
        self.held = False

    def holder(self) -> LockHolder | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            started = data.get("pid_started")
            return LockHolder(int(data["pid"]), str(data["host"]), str(data["started"]),
                              str(data.get("command", "?")), str(data.get("token", "")),
                              float(started) if isinstance(started, (int, float)) else None)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def acquire(self) -> "RepoLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        inherited = os.environ.get(LOCK_TOKEN_ENV)
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder()
                if holder is not None and inherited and holder.token == inherited and not holder.stale:
                    self.nested = True  # called by an agent that our own loop started
                    return self
                if holder is None and self._young():
                    time.sleep(0.2)
                    continue
                if holder is None or holder.stale:
                    self.path.unlink(missing_ok=True)
                    continue
                raise SessionError(
                    f"the session is busy: {holder.describe()} is working on it",
                    f"wait for it or stop it; if that process no longer exists, delete {self.path}",
                )
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": now_utc(),
                           "pid_started": process_start_time(os.getpid()),
                           "command": self.command, "token": self.token}, f)
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            return self
        raise SessionError(f"could not take the session lock {self.path}", "try again in a moment")

    def _young(self) -> bool:
        try:
            return time.time() - self.path.stat().st_mtime < self.CREATING_GRACE_S
        except OSError:
            return False

    def release(self) -> None:
        if self.held:
            holder = self.holder()
            if holder is not None and holder.token == self.token:
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "RepoLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
