"""The runner (harness/scoring/runner.py): the trainer in a subprocess under a budget the runner holds,
every process of the run ended with it, then a separate evaluator scores what the trainer exported.

Trainers here are tiny real scripts in a set-up project copy, run as real subprocesses; the ones
that must be scored are the fake unigram trainer of ratchet_helpers (a real torch export)."""

from __future__ import annotations

import dataclasses
import json
import textwrap
import time
from pathlib import Path

import pytest
from ratchet_helpers import FAKE_TRAINER

from harness.config import RunConfig, load_config, save_config
from harness.processes import pid_alive, process_running
from harness.scoring.evalset import load_eval_pointer
from harness.scoring.runner import remove_bytecode, run_experiment


@pytest.fixture(scope="module")
def project(tiny_setup_factory):
    """A project copy set up once (cpu-tiny, 4 s budget); each test writes its own trainer."""
    return tiny_setup_factory("cuda")


def write_trainer(project, body: str) -> None:
    (project.root / "backends" / "cuda" / "train.py").write_text(textwrap.dedent(body))


def config_with(project, tmp_path: Path, **constants) -> Path:
    """The project's run configuration with other evaluator constants (a new file)."""
    config = load_config(project.config_path)
    path = tmp_path / "run.json"
    save_config(dataclasses.replace(config, evaluator=dataclasses.replace(config.evaluator, **constants)), path)
    return path


def run(project, tmp_path: Path, timeout: float = 120, config: Path | None = None, **kwargs):
    return run_experiment(project.root, "cuda", config or project.config_path, tmp_path / "run.log",
                          eval_set=load_eval_pointer(project.root), run_dir=tmp_path / "run", timeout=timeout,
                          device="cpu", **kwargs)


def test_a_trained_model_is_scored_by_the_evaluator_and_the_runner_writes_the_summary(project, tmp_path):
    write_trainer(project, FAKE_TRAINER)
    outcome = run(project, tmp_path)
    assert outcome.status == "ok", outcome.reason + outcome.log_tail()
    summary = outcome.summary
    assert 0 < summary["val_bpb"] < summary["unigram_bpb"] + 0.5
    assert summary["holdout_bpb"] > 0 and summary["eval_tokens"] == 8192
    assert summary["probe"]["rows"] > 0
    assert all(not c["leaked"] for c in summary["canaries"].values())
    # The runner's clock, not the trainer's: spawn to exit, and to the verdict.
    assert summary["total_seconds"] >= summary["training_seconds"] > 0
    log = outcome.log_path.read_text()
    assert log.count("\nval_bpb:") == 1 and f"val_bpb:          {summary['val_bpb']:.6f}" in log
    # The artifact is gone after scoring; the facts and the training curve stay.
    assert not (outcome.run_dir / "artifact").exists()
    assert outcome.facts["num_steps"] >= 1
    curve = [json.loads(line) for line in (outcome.run_dir / "curve.jsonl").read_text().splitlines()]
    assert len(curve) == outcome.facts["num_steps"] and {"step", "tokens_per_sec", "loss", "lrm"} <= set(curve[0])


@pytest.mark.parametrize("body, status, words", [
    ('print("---")\nprint("val_bpb:          0.100000")\n', "crash", "printed a val_bpb itself"),
    ('raise ValueError("bad learning rate")\n', "crash", "ValueError: bad learning rate"),
    ("def broken(:\n", "crash", "SyntaxError"),
    ('raise MemoryError("CUDA out of memory. Tried to allocate 2 GiB")\n', "crash", "out of memory"),
    ('raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can\'t allocate memory: '
     'you tried to allocate 8589934592 bytes")\n', "crash", "out of memory: RuntimeError"),
    ('import sys\nprint("FAIL: training diverged (loss nan)")\nsys.exit(3)\n', "diverged", "nan"),
    ('print("trained, but never handed the model over")\n', "crash", "no exported model"),
    ('print("out of memory at DEVICE_BATCH_SIZE=128; retrying at 64")\nraise KeyError("lm_head")\n', "crash",
     "KeyError: 'lm_head'"),
])
def test_a_trainer_without_a_model_to_score_ends_with_its_reason(project, tmp_path, body, status, words):
    write_trainer(project, body)
    outcome = run(project, tmp_path)
    assert outcome.status == status and words in outcome.reason, outcome.reason
    assert outcome.summary is None


def test_the_runner_stops_a_trainer_past_budget_and_allowance(project, tmp_path):
    write_trainer(project, """
        import time
        for second in range(120):  # trains on, whatever its own clock says
            print(f"step {second}", flush=True)
            time.sleep(1)
    """)
    config = config_with(project, tmp_path, TIME_BUDGET=1, WARMUP_ALLOWANCE=1)
    start = time.monotonic()
    outcome = run(project, tmp_path, config=config, timeout=600)
    assert outcome.status == "over budget", outcome.reason
    assert "past TIME_BUDGET 1 s + WARMUP_ALLOWANCE 1 s" in outcome.reason and outcome.summary is None
    assert time.monotonic() - start < 30


def test_a_hung_trainer_is_killed_at_the_timeout(project, tmp_path):
    write_trainer(project, "import time\ntime.sleep(120)\n")
    outcome = run(project, tmp_path, timeout=3)
    assert outcome.status == "timeout" and "timed out after 3 s" in outcome.reason


def test_every_process_of_a_run_ends_with_it(project, tmp_path):
    """Children in the trainer's group, a child that started a session of its own, and one that
    also cleared its environment (no marker to find it by) are all gone after the run."""
    write_trainer(project, f"""
        import os, subprocess, sys, time
        sleep = [sys.executable, "-c", "import time; time.sleep(120)"]
        kids = [subprocess.Popen(sleep), subprocess.Popen(sleep, start_new_session=True),
                subprocess.Popen(sleep, start_new_session=True, env={{}})]
        open({str(tmp_path / "kids")!r}, "w").write(" ".join(str(k.pid) for k in kids))
        time.sleep(1.5)
    """)
    outcome = run(project, tmp_path)
    assert outcome.status == "crash"  # it exported nothing; what matters is what it left behind
    kids = [int(pid) for pid in (tmp_path / "kids").read_text().split()]
    deadline = time.monotonic() + 10
    while any(process_running(pid) for pid in kids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(process_running(pid) for pid in kids)


def test_the_trainer_gets_no_lock_token_or_loop_state(project, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_LOCK_TOKEN", "secret-token")
    monkeypatch.setenv("AUTORESEARCH_COMPILE", "0")
    write_trainer(project, """
        import os
        print("ENV", sorted(k for k in os.environ if k.startswith("AUTORESEARCH_")), flush=True)
    """)
    run(project, tmp_path)
    line = next(line for line in (tmp_path / "run.log").read_text().splitlines() if line.startswith("ENV"))
    assert "AUTORESEARCH_LOCK_TOKEN" not in line and "AUTORESEARCH_COMPILE" in line
    assert "AUTORESEARCH_IN_TRAINER" in line and "AUTORESEARCH_DEADLINE" in line


def test_progress_lines_and_the_pid_reach_the_caller(project, tmp_path):
    write_trainer(project, """
        import os, time
        print(f"pid {os.getpid()}", flush=True)
        for i in range(4):
            print(f"\\rstep {i:05d}", end="", flush=True)
            time.sleep(0.4)
    """)
    seen: list[str] = []
    started: list[tuple[int, bool]] = []
    outcome = run(project, tmp_path, on_progress=seen.append, on_start=lambda pid: started.append((pid, pid_alive(pid))))
    assert any(line.startswith("step 0000") for line in seen)
    pid_line = next(line for line in outcome.log_path.read_text().splitlines() if line.startswith("pid "))
    assert started == [(int(pid_line.split()[1]), True)]  # once, while it ran


def test_bytecode_beside_the_frozen_code_is_removed_before_a_run(tmp_path):
    cache = tmp_path / "harness" / "scoring" / "__pycache__"
    cache.mkdir(parents=True)
    (cache / "evaluate.cpython-311.pyc").write_bytes(b"planted")
    (tmp_path / "backends" / "cuda" / "__pycache__").mkdir(parents=True)
    assert remove_bytecode(tmp_path) == [cache]
    assert not cache.exists() and (tmp_path / "backends" / "cuda" / "__pycache__").exists()


def test_a_run_config_names_no_evaluator_data(project):
    config = json.loads(project.config_path.read_text())
    assert set(config) == {f.name for f in dataclasses.fields(RunConfig)}
    text = json.dumps(config)
    assert "private" not in text and "val" not in Path(config["tokens_dir"]).name
    assert sorted(p.name for p in Path(config["tokens_dir"]).iterdir()) == ["train.bin", "train.idx", "train.json"]
