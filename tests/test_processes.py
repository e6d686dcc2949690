"""Child processes stopped whole, and a trainer orphaned by a dead loop found again by its pid
(harness/processes.py, loop/orphans.py). Real processes throughout."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.processes import kill_process_tree, new_process_group, process_running, process_start_time
from loop.orphans import kill_orphaned_trainer

# A "loop" that starts a trainer (which starts a worker) in a process group of its own, records
# what the journal would, and dies without cleaning up: the trainer and its worker are orphans.
DYING_LOOP = """
import json, os, subprocess, sys, time
sys.path.insert(0, sys.argv[2])
from harness.processes import new_process_group
trainer = subprocess.Popen([sys.executable, "-c",
    "import subprocess, sys, time; w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
    "print(w.pid, flush=True); time.sleep(120)"], stdout=subprocess.PIPE, text=True, **new_process_group())
entry = {"trainer_pid": trainer.pid, "trainer_started": time.time()}
entry["worker_pid"] = int(trainer.stdout.readline())
open(sys.argv[1], "w").write(json.dumps(entry))
os._exit(0)
"""


def _orphan(tmp_path: Path) -> dict:
    record = tmp_path / "journal.json"
    subprocess.run([sys.executable, "-c", DYING_LOOP, str(record), str(Path(__file__).resolve().parents[1])],
                   check=True, timeout=60)
    entry = json.loads(record.read_text())
    assert process_running(entry["trainer_pid"]) and process_running(entry["worker_pid"])
    return entry


def _gone(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while process_running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_an_orphaned_trainer_and_its_worker_are_killed_by_the_recorded_pid(tmp_path):
    entry = _orphan(tmp_path)
    assert kill_orphaned_trainer(entry) == 0
    assert _gone(entry["trainer_pid"]) and _gone(entry["worker_pid"])


def test_a_process_that_reused_the_pid_is_left_alone(tmp_path):
    entry = _orphan(tmp_path)
    try:
        # The same pid, but the journal says the trainer started an hour earlier: not ours.
        kill_orphaned_trainer(dict(entry, trainer_started=entry["trainer_started"] - 3600))
        time.sleep(0.3)
        assert process_running(entry["trainer_pid"]) and process_running(entry["worker_pid"])
    finally:
        kill_orphaned_trainer(entry)
    assert _gone(entry["trainer_pid"]) and _gone(entry["worker_pid"])


def test_the_start_time_of_a_process_is_known_to_about_a_second():
    before = time.time()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], **new_process_group())
    try:
        assert process_start_time(proc.pid) == pytest.approx(before, abs=2.0)
    finally:
        kill_process_tree(proc)
    assert proc.returncode is not None and not process_running(proc.pid)
    assert process_start_time(proc.pid) is None
