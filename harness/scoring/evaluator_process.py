"""The runner's side of the evaluator: start the process, send it artifacts, read its verdicts.

`autoresearch run` and a standalone `try` start one per experiment; `loop` keeps one warm for the
whole session (framework imported, evaluation rows resident), so scoring costs no start-up. The
process is started from the session's own repository in isolated mode with a clean environment
(see `harness.scoring.evaluator`), and verifies that the harness it imported is that repository's.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from harness.processes import kill_process_tree, new_process_group

START_TIMEOUT_S = 300.0  # importing torch on a cold disk, loading a large evaluation set

# Run in the fresh interpreter: compile this repository's harness from source (a planted `.pyc`
# beside it is never read), check that it is the one imported, then serve.
BOOTSTRAP = """\
import os, sys, tempfile
root = os.path.abspath(sys.argv[1])
sys.pycache_prefix = tempfile.mkdtemp(prefix="autoresearch-evaluator-")
sys.path.insert(0, root)
import harness, harness.scoring.evaluator as evaluator
found = os.path.dirname(os.path.dirname(os.path.abspath(harness.__file__)))
if found != root:
    sys.exit(f"the evaluator imported the harness of {found}, not the session's {root}")
sys.pycache_prefix = None  # the framework's own bytecode is the installation's
evaluator.main(sys.argv[2:])
"""

# What the evaluator inherits of the caller's environment: locating libraries and devices only.
PASSED_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "TEMP", "TMP",
              "SYSTEMROOT", "LD_LIBRARY_PATH", "DYLD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES",
              "ROCR_VISIBLE_DEVICES", "CUDA_HOME", "ROCM_PATH", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


class EvaluatorDied(RuntimeError):
    """The evaluator process exited or stopped answering."""


def clean_env() -> dict[str, str]:
    return {key: os.environ[key] for key in PASSED_ENV if key in os.environ}


@dataclass
class EvaluatorProcess:
    """One evaluator process; use as a context manager or call `close()`."""

    proc: subprocess.Popen
    replies: "queue.Queue[str | None]"
    log_file: IO[bytes]
    started: float = field(default_factory=time.monotonic)

    @classmethod
    def start(cls, root: Path, eval_set: Path, device: str, max_batch_size: int, framework: str, log_path: Path,
              timeout: float = START_TIMEOUT_S) -> "EvaluatorProcess":
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(log_path, "ab")
        command = [sys.executable, "-I", "-B", "-c", BOOTSTRAP, str(root), "--eval-set", str(eval_set),
                   "--device", device, "--max-batch-size", str(max_batch_size), "--framework", framework]
        proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file,
                                cwd=str(root), env=clean_env(), **new_process_group())
        replies: queue.Queue = queue.Queue()
        threading.Thread(target=_read_lines, args=(proc.stdout, replies), daemon=True,
                         name="autoresearch-evaluator-reader").start()
        evaluator = cls(proc, replies, log_file)
        try:
            ready = json.loads(evaluator._reply(timeout))
            if not ready.get("ready"):
                raise EvaluatorDied(f"the evaluator did not start: {ready}")
        except BaseException:
            evaluator.close()
            raise
        return evaluator

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def score(self, artifact: Path, seed: int, timeout: float) -> dict:
        """The evaluator's verdict on one artifact (see `harness.scoring.evaluator`). Raises
        EvaluatorDied when the process is gone or does not answer within `timeout`; it is then
        killed, and a new one must be started."""
        if not self.alive:
            raise EvaluatorDied(f"the evaluator exited with code {self.proc.returncode}")
        try:
            self.proc.stdin.write((json.dumps({"artifact": str(artifact), "seed": seed}) + "\n").encode())
            self.proc.stdin.flush()
            return json.loads(self._reply(timeout))
        except (OSError, ValueError) as exc:
            self.close()
            raise EvaluatorDied(f"the evaluator stopped answering ({exc})") from None
        except EvaluatorDied:
            self.close()
            raise

    def speed(self, slowdown: float = 1.0, timeout: float = 60.0) -> float | None:
        """The machine's speed now (GFLOP/s of the fixed probe in `harness.scoring.speed`, run in
        the evaluator on the session's device), or None when the evaluator cannot tell."""
        if not self.alive:
            return None
        try:
            self.proc.stdin.write((json.dumps({"speed": {"slowdown": slowdown}}) + "\n").encode())
            self.proc.stdin.flush()
            reply = json.loads(self._reply(timeout))
        except (OSError, ValueError, EvaluatorDied):
            return None
        speed = reply.get("speed", {}).get("gflops") if reply.get("ok") else None
        return float(speed) if isinstance(speed, (int, float)) else None

    def _reply(self, timeout: float) -> str:
        try:
            line = self.replies.get(timeout=timeout)
        except queue.Empty:
            raise EvaluatorDied(f"the evaluator gave no answer within {timeout:.0f} s") from None
        if line is None:
            code = self.proc.wait()
            raise EvaluatorDied(f"the evaluator exited with code {code}{self._log_hint()}")
        return line

    def _log_hint(self) -> str:
        try:
            tail = Path(self.log_file.name).read_text(errors="replace").strip().splitlines()[-1:]
        except OSError:
            tail = []
        return f": {tail[0][:300]}" if tail else ""

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # the serve loop ends at end of input
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                kill_process_tree(self.proc)
        self.log_file.close()

    def __enter__(self) -> "EvaluatorProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_lines(stream: IO[bytes], replies: "queue.Queue[str | None]") -> None:
    for raw in stream:
        replies.put(raw.decode("utf-8", errors="replace"))
    replies.put(None)
