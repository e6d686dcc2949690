"""The runner judges a trainer process by what the harness wrote, not by what the trainer says.

These trainers are tiny real scripts run as real subprocesses; the result they write is the
harness's own format (`harness.scoring.context` writes it the same way after a real evaluation)."""

from __future__ import annotations

import os
import textwrap
import time
from pathlib import Path

import pytest

from harness.processes import pid_alive
from harness.scoring.runner import run_experiment

HARNESS_RESULT = """
import json, os
from harness.scoring.budget import format_summary
summary = {"val_bpb": 1.234567, "training_seconds": 1.0, "total_seconds": 2.0, "peak_vram_mb": 1.0,
           "mfu_percent": None, "total_tokens_M": 0.1, "num_steps": 12, "num_params_M": 0.5,
           "depth": 2, "backend": "cuda", "device": "cpu", "preset": "cpu-tiny",
           "eval_tokens": 8192, "tokens_per_sec": 1000.0, "unigram_bpb": 2.5}
print("\\n" + format_summary(summary), flush=True)
with open(os.environ["AUTORESEARCH_RESULT"], "w") as f:
    json.dump({"nonce": os.environ["AUTORESEARCH_RUN_NONCE"], "summary": summary}, f)
"""


def make_trainer(tmp_path: Path, body: str) -> Path:
    root = tmp_path / "project"
    script = root / "backends" / "cuda" / "train.py"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(textwrap.dedent(body))
    return root


def run(root: Path, timeout: float = 60):
    return run_experiment(root, "cuda", root / "config.json", root / "run.log", timeout=timeout,
                          extra_env={"PYTHONPATH": str(Path(__file__).resolve().parents[1])})


def test_a_clean_run_is_ok_and_reports_the_harness_score(tmp_path):
    outcome = run(make_trainer(tmp_path, HARNESS_RESULT))
    assert outcome.status == "ok", outcome.reason
    assert outcome.val_bpb == pytest.approx(1.234567)
    assert "val_bpb:" in outcome.log_path.read_text()


def test_a_trainer_that_prints_its_own_score_is_a_crash(tmp_path):
    outcome = run(make_trainer(tmp_path, 'print("---")\nprint("val_bpb:          0.100000")\n'))
    assert outcome.status == "crash"
    assert "printed a val_bpb itself" in outcome.reason


def test_a_fake_score_beside_the_real_one_is_a_crash(tmp_path):
    outcome = run(make_trainer(tmp_path, 'print("val_bpb: 0.100000")\n' + HARNESS_RESULT))
    assert outcome.status == "crash"
    assert "printed its own val_bpb" in outcome.reason


def test_a_result_without_this_runs_nonce_is_a_crash(tmp_path):
    outcome = run(make_trainer(tmp_path, HARNESS_RESULT.replace('os.environ["AUTORESEARCH_RUN_NONCE"]', '"guess"')))
    assert outcome.status == "crash"
    assert "not written by this run" in outcome.reason


def test_an_exception_is_a_crash_naming_the_error(tmp_path):
    outcome = run(make_trainer(tmp_path, 'raise ValueError("bad learning rate")\n'))
    assert outcome.status == "crash"
    assert outcome.reason == "ValueError: bad learning rate"
    assert "Traceback" in outcome.log_tail()


def test_a_syntax_error_is_a_crash(tmp_path):
    outcome = run(make_trainer(tmp_path, "def broken(:\n"))
    assert outcome.status == "crash"
    assert "SyntaxError" in outcome.reason


def test_out_of_memory_is_named(tmp_path):
    outcome = run(make_trainer(tmp_path, 'raise MemoryError("CUDA out of memory. Tried to allocate 2 GiB")\n'))
    assert outcome.status == "crash"
    assert outcome.reason.startswith("out of memory")


def test_divergence_is_reported_as_such(tmp_path):
    outcome = run(make_trainer(tmp_path, 'import sys\nprint("FAIL: training diverged (loss nan)")\nsys.exit(3)\n'))
    assert outcome.status == "diverged"
    assert "nan" in outcome.reason


def test_a_hung_trainer_and_its_children_are_killed_at_the_timeout(tmp_path):
    root = make_trainer(tmp_path, """
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open("child.pid", "w").write(str(child.pid))
        time.sleep(120)
    """)
    start = time.monotonic()
    outcome = run(root, timeout=3)
    assert outcome.status == "timeout"
    assert time.monotonic() - start < 30
    child = int((root / "child.pid").read_text())
    for _ in range(50):  # the child is reaped by init shortly after the kill
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the trainer's child process survived the timeout")


def test_progress_lines_reach_the_caller(tmp_path):
    root = make_trainer(tmp_path, """
        import time
        for i in range(4):
            print(f"\\rstep {i:05d}", end="", flush=True)
            time.sleep(0.4)
        raise SystemExit(1)
    """)
    seen: list[str] = []
    run_experiment(root, "cuda", root / "c.json", root / "run.log", timeout=30, on_progress=seen.append)
    assert any(line.startswith("step 0000") for line in seen)


def test_the_caller_learns_the_trainers_pid_as_soon_as_it_starts(tmp_path):
    root = make_trainer(tmp_path, """
        import os, time
        print(f"pid {os.getpid()}", flush=True)
        time.sleep(1)
    """)
    started: list[tuple[int, bool]] = []
    outcome = run_experiment(root, "cuda", root / "c.json", root / "run.log", timeout=30,
                             on_start=lambda pid: started.append((pid, pid_alive(pid))))
    assert outcome.status == "crash"  # it never reports a result; what matters is the pid
    assert started == [(int(outcome.log_path.read_text().split()[1]), True)]  # once, while it ran


def test_an_out_of_memory_the_ladder_recovered_from_does_not_name_a_later_crash(tmp_path):
    outcome = run(make_trainer(tmp_path, """
        print("out of memory at DEVICE_BATCH_SIZE=128; retrying at 64 with 4 accumulation steps")
        raise KeyError("lm_head")
    """))
    assert outcome.status == "crash"
    assert outcome.reason == "KeyError: 'lm_head'"
