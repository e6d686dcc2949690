"""Run one experiment: the trainer in a subprocess under a budget the runner holds, then a separate
evaluator process scores the model the trainer exported.

1. The trainer starts with a minimal environment (no lock token, no loop variables), bytecode
   writing off, confined away from the evaluator's data where the OS allows (`confine`), and the
   run's folder for its artifact, facts and training curve.
2. The runner times it from spawn. Still running TIME_BUDGET + WARMUP_ALLOWANCE seconds later, it
   is stopped: `over budget`, no score. Its own clock and step counts are information only.
3. When it exits, every process that carries the run's marker is killed (children that escaped
   the trainer's process group included).
4. A trainer that printed a `val_bpb` line itself is a crash. Otherwise the evaluator scores the
   artifact (`evaluator_process`): a refused artifact, a causality violation or non-finite logits
   is a crash, a canary leak is a `leak` (the ratchet rejects it).
5. The runner appends the summary block to the log (`grep "^val_bpb:" run.log` works as upstream)
   and deletes the artifact; the facts and the curve stay in the run's folder.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from harness.config import CONFIG_ENV, RunConfig, load_config
from harness.hardware.energy import EnergyMeter
from harness.hardware.platform import compile_cache_env
from harness.paths import trainer_path
from harness.processes import Descendants, kill_marked_processes, kill_process_tree, new_process_group
from harness.scoring.budget import format_summary
from harness.scoring.artifact import META_FILE
from harness.scoring.confine import plan
from harness.scoring.context import (
    ARTIFACT_DIR, CURVE_FILE, DEADLINE_ENV, DEVICE_ENV, DIVERGED_EXIT_CODE, EXPORT_FAILED_EXIT_CODE, FACTS_FILE,
    IN_TRAINER_ENV, RUN_DIR_ENV,
)
from harness.scoring.evalset import EvalSet, private_root
from harness.scoring.evaluator_process import EvaluatorDied, EvaluatorProcess

DEFAULT_TIMEOUT = 600.0
MARKER_ENV = "AUTORESEARCH_EXPERIMENT"  # in every trainer's environment, to find its processes
# The user's own switches that reach the trainer; every other AUTORESEARCH_* variable (the lock
# token, the loop's state, test hooks) stays out of its environment.
TRAINER_SWITCHES = ("AUTORESEARCH_CACHE", "AUTORESEARCH_COMPILE", "AUTORESEARCH_DTYPE", "AUTORESEARCH_ATTENTION")
# Past the deadline, before the runner stops the trainer: an honest trainer stops training before
# the deadline (`Budget.done`) but its export may overrun on a loaded machine.
KILL_GRACE_S = 5.0
KILL_GRACE_FRACTION = 0.25  # of WARMUP_ALLOWANCE, when that is more
FRAMEWORK_OF = {"mlx": "mlx"}  # backend -> the framework its evaluator imports (torch otherwise)
_VAL_BPB_LINE = re.compile(r"^val_bpb:\s*(\S+)\s*$", re.MULTILINE)

__all__ = ["RunOutcome", "run_experiment", "evaluate_run", "format_summary", "MARKER_ENV"]


@dataclass
class RunOutcome:
    status: str  # "ok", "crash", "timeout", "diverged", "over budget", "leak" or "tampered"
    reason: str
    summary: dict | None
    returncode: int | None
    seconds: float
    log_path: Path
    run_dir: Path | None = None
    facts: dict = field(default_factory=dict)  # what the trainer reported: information only
    energy_j: float | None = None  # the GPU's joules from spawn to verdict, read by the runner (None: no counter)

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
    *,
    eval_set: Path,
    run_dir: Path,
    timeout: float = DEFAULT_TIMEOUT,
    device: str | None = None,
    evaluator: EvaluatorProcess | None = None,
    marker: str | None = None,
    compile_cache: Path | None = None,
    energy: EnergyMeter | None = None,
    extra_env: dict[str, str] | None = None,
    on_progress: Callable[[str], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> RunOutcome:
    """Train `backends/<backend>/train.py` of `root` under the configuration at `config_path`,
    then score it on `eval_set`. Never raises for a failing trainer or model (that is an outcome).
    `evaluator` is a warm evaluator to use (one is started and closed here otherwise); `on_start`
    gets the trainer's pid as soon as it exists; `on_progress` its latest log line, twice a second.
    `compile_cache` keeps the compilers' caches between runs (a session's own folder). `energy` is
    the GPU's energy counter (harness.hardware.energy), read from spawn to verdict."""
    config = load_config(config_path)
    ev = config.evaluator
    device = device or os.environ.get(DEVICE_ENV) or config.device
    marker = marker or f"run-{secrets.token_hex(6)}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    remove_bytecode(root)
    confinement = plan(trainer_denied_paths(eval_set))
    joules_at_start = _joules(energy)
    start, wall_start = time.monotonic(), time.time()
    allowed = ev.TIME_BUDGET + ev.WARMUP_ALLOWANCE
    grace = max(KILL_GRACE_S, KILL_GRACE_FRACTION * ev.WARMUP_ALLOWANCE)
    env = trainer_env(root, config_path, run_dir, device, marker, deadline=wall_start + allowed, extra=extra_env)
    if compile_cache is not None:
        caches = compile_cache_env(compile_cache)
        for key in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "CUDA_CACHE_PATH"):
            Path(caches[key]).mkdir(parents=True, exist_ok=True)  # before confinement: readable back
        env.update(caches)
    with open(log_path, "wb") as log:
        log.write(f"{confinement.message}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            confinement.command(sys.executable, str(trainer_path(root, backend))), cwd=root, env=env,
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **new_process_group(),
        )
        descendants = Descendants(proc.pid)
        try:
            if on_start:
                on_start(proc.pid)
            ended = _wait(proc, start, min(allowed + grace, timeout), log_path, on_progress, descendants)
        finally:
            if proc.poll() is None:
                kill_process_tree(proc)  # past a limit, Ctrl-C, or a dying caller: never leave it running
            # Every process of the run ends with it: those that left the group, by marker or because
            # they were seen below the trainer.
            kill_marked_processes(marker, MARKER_ENV)
            descendants.kill()
    trainer_seconds = time.monotonic() - start

    def outcome(status: str, reason: str, summary: dict | None = None) -> RunOutcome:
        _drop_artifact(run_dir)
        now = _joules(energy)
        joules = now - joules_at_start if now is not None and joules_at_start is not None else None
        if summary is not None and joules is not None:
            summary.update(energy_j=joules, mean_watts=joules / max(summary["total_seconds"], 1e-9))
        return RunOutcome(status, reason, summary, proc.returncode, time.monotonic() - start, log_path, run_dir,
                          facts, joules)

    facts = read_facts(run_dir)
    if ended == "limit" and allowed + grace <= timeout:
        return outcome("over budget", f"the trainer was still running {trainer_seconds:.0f} s after it "
                                      f"started, past TIME_BUDGET {ev.TIME_BUDGET:g} s + WARMUP_ALLOWANCE "
                                      f"{ev.WARMUP_ALLOWANCE:g} s (the runner's clock, not the trainer's)")
    if ended == "limit":
        return outcome("timeout", f"timed out after {timeout:.0f} s (killed)")
    planted = remove_bytecode(root)  # nothing of ours writes bytecode there: the trainer did
    if planted:
        names = ", ".join(str(p.relative_to(root)) for p in planted)
        return outcome("tampered", f"the trainer wrote bytecode beside the harness ({names}); removed")
    log_text = log_path.read_text(errors="replace") if log_path.exists() else ""
    failure = judge_exit(proc.returncode, log_text)
    if failure is not None:
        return outcome(*failure)
    if not (run_dir / ARTIFACT_DIR / META_FILE).is_file():
        return outcome("crash", "no exported model: the trainer exited without handing one over (it never "
                                "reached ctx.finish)")
    summary, reason = evaluate_run(root, config, run_dir, device=device, evaluator=evaluator,
                                   timeout=max(timeout - (time.monotonic() - start), 30.0),
                                   seconds=trainer_seconds, facts=facts, evaluator_log=run_dir / "evaluator.log")
    if summary is None:
        return outcome("leak" if reason.startswith("validation leak") else "crash", reason)
    summary["total_seconds"] = time.monotonic() - start
    result = outcome("ok", "", summary)  # reads the energy counter: the summary then has the joules
    with open(log_path, "a", encoding="utf-8") as log:
        log.write("\n" + format_summary(summary) + "\n")
    return result


def evaluate_run(root: Path, config: RunConfig, run_dir: Path, *, device: str, seconds: float,
                 evaluator: EvaluatorProcess | None = None, timeout: float = DEFAULT_TIMEOUT,
                 facts: dict | None = None, evaluator_log: Path | None = None,
                 eval_set: Path | None = None) -> tuple[dict | None, str]:
    """Score the artifact in `run_dir` with the evaluator (`evaluator`, or a fresh one on the
    repository's evaluation set); returns (summary, "") or (None, why there is no score)."""
    from harness.scoring.evalset import load_eval_pointer

    facts = read_facts(run_dir) if facts is None else facts
    seed = secrets.randbits(31)
    try:
        if evaluator is not None:
            reply = evaluator.score(run_dir / ARTIFACT_DIR, seed, timeout)
        else:
            eval_set = eval_set or load_eval_pointer(root)
            with EvaluatorProcess.start(root, eval_set, device, config.evaluator.EVAL_BATCH_SIZE,
                                        FRAMEWORK_OF.get(config.backend, "torch"),
                                        evaluator_log or run_dir / "evaluator.log") as fresh:
                reply = fresh.score(run_dir / ARTIFACT_DIR, seed, timeout)
    except (EvaluatorDied, FileNotFoundError) as exc:
        return None, f"evaluation failed: {exc}"
    if not reply.get("ok"):
        return None, reply.get("reason", "the evaluator refused the model")
    return build_summary(config, reply, facts, seconds, device), ""


def build_summary(config: RunConfig, reply: dict, facts: dict, trainer_seconds: float, device: str) -> dict:
    """The summary: the evaluator's scores, the runner's times, the trainer's facts (labelled as such)."""
    from harness.hardware.flops import mfu_percent

    def fact(name: str, kind: type = float):
        value = facts.get(name)
        return kind(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None

    peaks = [p for p in (fact("peak_memory_mb"), reply.get("peak_memory_mb")) if isinstance(p, (int, float))]
    tokens_per_sec = fact("tokens_per_sec")
    flops = fact("flops_per_token")
    num_params = fact("num_params")
    total_tokens = fact("total_tokens")
    return {
        "val_bpb": reply["val_bpb"],
        "training_seconds": trainer_seconds,
        "total_seconds": trainer_seconds + float(reply.get("seconds", 0.0)),
        "peak_vram_mb": max(peaks) if peaks else None,
        "mfu_percent": mfu_percent(flops, tokens_per_sec, str(facts.get("device_name", ""))) if flops and tokens_per_sec else None,
        "total_tokens_M": total_tokens / 1e6 if total_tokens is not None else None,
        "num_steps": fact("num_steps", int),
        "num_params_M": num_params / 1e6 if num_params is not None else None,
        "depth": fact("depth", int),
        "backend": config.backend,
        "device": device,
        "preset": config.preset,
        "eval_tokens": reply.get("eval_tokens"),
        "tokens_per_sec": tokens_per_sec,
        "unigram_bpb": config.unigram_bpb,
        "holdout_bpb": reply.get("holdout_bpb"),
        "canaries": reply.get("canaries", {}),
        "probe": reply.get("probe", {}),
        "evaluation_seconds": reply.get("seconds"),
    }


def _joules(meter: EnergyMeter | None) -> float | None:
    if meter is None:
        return None
    try:
        return meter.read_joules()
    except Exception:  # noqa: BLE001 - a counter that stops answering only costs the figure
        return None


def judge_exit(returncode: int, log: str) -> tuple[str, str] | None:
    """Why a finished trainer has no model to score (status, reason), or None when it has one."""
    if returncode == DIVERGED_EXIT_CODE and "FAIL" in log:
        return "diverged", _last_line(log, "FAIL") or "training diverged"
    if returncode == EXPORT_FAILED_EXIT_CODE and "FAIL: export" in log:
        return "crash", _last_line(log, "FAIL: export").removeprefix("FAIL: ")
    if returncode != 0:
        return "crash", crash_reason(log, returncode)
    printed = _VAL_BPB_LINE.findall(log)
    if printed:
        return "crash", (f"the trainer printed a val_bpb itself ({', '.join(printed[:3])}); only the evaluator "
                         "scores, and nothing the trainer prints counts")
    return None


def crash_reason(log: str, returncode: int) -> str:
    line = _last_error_line(log)
    # Judged on the final error only: an OOM that the start-up ladder recovered from stays in the log.
    if re.search(r"out of memory|OutOfMemoryError|MemoryError|can't allocate memory|cannot allocate memory",
                 line, re.IGNORECASE):
        return "out of memory: " + line
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return f"killed by signal {name}" + (f": {line}" if line else "")
    return line or f"exited with code {returncode}"


def trainer_denied_paths(eval_set: Path) -> list[Path]:
    """What a confined trainer may not read: every evaluation set, and the raw validation shard."""
    denied = [private_root()]
    try:
        shard = EvalSet.load(eval_set).source.get("val_file")
    except (FileNotFoundError, ValueError):
        shard = None
    if shard:
        denied.append(Path(shard))
    return denied


def trainer_env(root: Path, config_path: Path, run_dir: Path, device: str, marker: str, deadline: float,
                extra: dict[str, str] | None = None) -> dict[str, str]:
    """The user's environment without anything of ours (no lock token, no loop state), plus what
    the trainer needs: this repository's harness, its configuration, the run's folder, the deadline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_") or k in TRAINER_SWITCHES}
    env.pop("PYTHONPYCACHEPREFIX", None)
    env.update({
        "PYTHONPATH": str(root),  # the trainer imports this repository's harness (the one the session hashed)
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        CONFIG_ENV: str(config_path),
        RUN_DIR_ENV: str(run_dir),
        DEADLINE_ENV: f"{deadline:.3f}",
        DEVICE_ENV: device,
        MARKER_ENV: marker,
        IN_TRAINER_ENV: "1",
    })
    env.update(extra or {})
    return env


FROZEN_CODE_DIRS = ("harness", "loop", "autoresearch")


def remove_bytecode(root: Path) -> list[Path]:
    """Delete `__pycache__` folders under the frozen code: bytecode there is never trusted. Returns
    the folders that held files."""
    removed = []
    for name in FROZEN_CODE_DIRS:
        for cache in sorted((root / name).rglob("__pycache__")) if (root / name).is_dir() else []:
            if any(cache.iterdir()):
                removed.append(cache)
            shutil.rmtree(cache, ignore_errors=True)
    return removed


def read_facts(run_dir: Path) -> dict:
    try:
        facts = json.loads((run_dir / FACTS_FILE).read_text(encoding="utf-8"))
        return facts if isinstance(facts, dict) else {}
    except (OSError, ValueError):
        return {}


def _drop_artifact(run_dir: Path) -> None:
    """The artifact (a copy of the model) is large and was only needed for scoring."""
    shutil.rmtree(run_dir / ARTIFACT_DIR, ignore_errors=True)


def _wait(proc: subprocess.Popen, start: float, limit: float, log_path: Path,
          on_progress: Callable[[str], None] | None, descendants: Descendants) -> str:
    """'exited', or 'limit' when `limit` seconds passed first."""
    while True:
        remaining = start + limit - time.monotonic()
        if remaining <= 0:
            return "limit"
        try:
            proc.wait(timeout=min(remaining, 0.5))
            return "exited"
        except subprocess.TimeoutExpired:
            descendants.watch()
            if on_progress:
                on_progress(latest_line(log_path))


def latest_line(log_path: Path) -> str:
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            tail = f.read().decode(errors="replace")
    except OSError:
        return ""
    parts = [p.strip() for p in re.split(r"[\r\n]", tail) if p.strip()]
    return parts[-1] if parts else ""


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
