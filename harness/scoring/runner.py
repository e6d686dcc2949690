"""Run one experiment: the trainer in a subprocess with a hard timeout, judged by what the
harness (not the trainer) wrote.

The trainer's process group is killed past the timeout, so a hung dataloader thread or a child
process cannot outlive it. The result counts only if the harness wrote it with this run's nonce
and the log's `val_bpb:` line is the harness's own: a trainer that prints a score itself ends as
a crash.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from harness.config import CONFIG_ENV
from harness.scoring.context import DEVICE_ENV, DIVERGED_EXIT_CODE, NONCE_ENV, RESULT_ENV
from harness.paths import trainer_path
from harness.processes import kill_process_tree, new_process_group

DEFAULT_TIMEOUT = 600.0
_VAL_BPB_LINE = re.compile(r"^val_bpb:\s*(\S+)\s*$", re.MULTILINE)


@dataclass
class RunOutcome:
    status: str  # "ok", "crash", "timeout" or "diverged"
    reason: str
    summary: dict | None
    returncode: int | None
    seconds: float
    log_path: Path
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def val_bpb(self) -> float | None:
        return self.summary["val_bpb"] if self.summary else None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        # Progress lines are `\r`-overwritten; show only their final state.
        cleaned = [line.split("\r")[-1] for line in text.splitlines()]
        return "\n".join(cleaned[-lines:])


def run_experiment(
    root: Path,
    backend: str,
    config_path: Path,
    log_path: Path,
    timeout: float = DEFAULT_TIMEOUT,
    device: str | None = None,
    extra_env: dict[str, str] | None = None,
    on_progress: Callable[[str], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> RunOutcome:
    """Run `backends/<backend>/train.py` of `root` to completion or timeout; never raises for a
    failing trainer (that is an outcome, not an error). `on_start` gets the trainer's pid as soon
    as it exists (the ratchet journals it, to stop the trainer should this process die);
    `on_progress` gets its latest log line about twice a second."""
    script = trainer_path(root, backend)
    result_path = log_path.with_name(log_path.name + ".result.json")
    result_path.unlink(missing_ok=True)
    nonce = secrets.token_hex(16)
    env = _child_env(root, config_path, result_path, nonce, device, extra_env)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(script)], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, **new_process_group(),
        )
        try:
            if on_start:
                on_start(proc.pid)
            returncode = _wait(proc, start + timeout, log_path, on_progress)
            if returncode is None:
                kill_process_tree(proc)
                return RunOutcome("timeout", f"timed out after {timeout:.0f} s (killed)", None, None,
                                  time.monotonic() - start, log_path)
        except BaseException:
            kill_process_tree(proc)  # Ctrl-C or a dying loop must not leave a trainer running
            raise
    seconds = time.monotonic() - start
    return judge(returncode, log_path, result_path, nonce, seconds)


def _wait(proc: subprocess.Popen, deadline: float, log_path: Path,
          on_progress: Callable[[str], None] | None) -> int | None:
    """Wait for the process until the deadline (None on timeout), reporting its latest log line."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        try:
            return proc.wait(timeout=min(remaining, 0.5))
        except subprocess.TimeoutExpired:
            if on_progress:
                on_progress(_latest_line(log_path))


def _latest_line(log_path: Path) -> str:
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            tail = f.read().decode(errors="replace")
    except OSError:
        return ""
    parts = [p.strip() for p in re.split(r"[\r\n]", tail) if p.strip()]
    return parts[-1] if parts else ""


def judge(returncode: int, log_path: Path, result_path: Path, nonce: str, seconds: float) -> RunOutcome:
    """Decide the outcome of a finished trainer process from its exit code, log and result file."""
    log = log_path.read_text(errors="replace") if log_path.exists() else ""
    if returncode == DIVERGED_EXIT_CODE and "FAIL" in log:
        return RunOutcome("diverged", _last_line(log, "FAIL") or "training diverged", None, returncode, seconds, log_path)
    if returncode != 0:
        return RunOutcome("crash", _crash_reason(log, returncode), None, returncode, seconds, log_path)
    try:
        payload = json.loads(result_path.read_text())
    except (OSError, ValueError):
        reason = "no result from the harness (the trainer exited without calling ctx.finish)"
        if _VAL_BPB_LINE.search(log):
            reason = "the trainer printed a val_bpb itself but the harness never scored it"
        return RunOutcome("crash", reason, None, returncode, seconds, log_path)
    if payload.get("nonce") != nonce:
        return RunOutcome("crash", "result file not written by this run's harness", None, returncode, seconds, log_path)
    summary = payload["summary"]
    printed = _VAL_BPB_LINE.findall(log)
    if len(printed) != 1 or not _same(printed[0], summary["val_bpb"]):
        return RunOutcome("crash", f"the trainer printed its own val_bpb ({', '.join(printed)}); only the harness may",
                          None, returncode, seconds, log_path)
    if not math.isfinite(summary["val_bpb"]):
        return RunOutcome("crash", f"val_bpb is not finite ({summary['val_bpb']})", None, returncode, seconds, log_path)
    return RunOutcome("ok", "", summary, returncode, seconds, log_path)


def _same(printed: str, value: float) -> bool:
    try:
        return abs(float(printed) - value) < 5e-6
    except ValueError:
        return False


def _crash_reason(log: str, returncode: int) -> str:
    line = _last_error_line(log)
    # Judged on the final error only: an OOM that the start-up ladder recovered from stays in the log.
    if re.search(r"out of memory|OutOfMemoryError|MemoryError", line, re.IGNORECASE):
        return "out of memory: " + line
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return f"killed by signal {name}" + (f": {line}" if line else "")
    return line or f"exited with code {returncode}"


def _last_error_line(log: str) -> str:
    lines = [line.split("\r")[-1].strip() for line in log.splitlines()]
    lines = [line for line in lines if line]
    for line in reversed(lines):
        if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b", line) or line.startswith("Error"):
            return line[:300]
    return lines[-1][:300] if lines else ""


def _last_line(log: str, needle: str) -> str:
    for line in reversed(log.splitlines()):
        line = line.split("\r")[-1].strip()
        if needle.lower() in line.lower():
            return line[:300]
    return ""


def _child_env(root: Path, config_path: Path, result_path: Path, nonce: str, device: str | None,
               extra_env: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    # The trainer must import this repository's harness (the one the session hashed).
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    env[CONFIG_ENV] = str(config_path)
    env[RESULT_ENV] = str(result_path)
    env[NONCE_ENV] = nonce
    if device:
        env[DEVICE_ENV] = device
    env.update(extra_env or {})
    return env
