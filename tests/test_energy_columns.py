"""Energy per experiment: the runner reads the GPU's energy counter around each run, the ledger
records joules and mean watts, `results` shows energy per kept improvement. NVML is faked only at
its boundary (tests/test_energy.py's FakeNVML, the real pynvml signatures); the plumbing is real:
a real trainer run, a real session, the real CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
from ratchet_helpers import FAKE_TRAINER, TAG, cli, ledger, make_repo, session_paths

from harness.hardware.energy import EnergyMeter
from harness.scoring.evalset import load_eval_pointer
from harness.scoring.runner import run_experiment
from loop.lock import RepoLock
from loop.ratchet import Session

pytest.importorskip("pynvml", reason="nvidia-ml-py is not installed (pip install -e '.[dev]')")
from test_energy import FakeNVML  # noqa: E402

JOULES_PER_READ = 250.0


class WorkingGPU(FakeNVML):
    """GPU 0 burns JOULES_PER_READ between any two readings of its counter."""

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        if handle == 0:
            self.millijoules[0] += int(JOULES_PER_READ * 1000)
        return super().nvmlDeviceGetTotalEnergyConsumption(handle)


def meter() -> EnergyMeter:
    opened, why = EnergyMeter.open("cuda:0", {}, nvml=WorkingGPU())
    assert opened is not None, why
    return opened


def test_the_runner_reads_the_counter_from_spawn_to_verdict(tiny_setup_factory, tmp_path):
    project = tiny_setup_factory("cuda")
    (project.root / "backends" / "cuda" / "train.py").write_text(FAKE_TRAINER)
    outcome = run_experiment(project.root, "cuda", project.config_path, tmp_path / "run.log",
                             eval_set=load_eval_pointer(project.root), run_dir=tmp_path / "run", device="cpu",
                             energy=meter())
    assert outcome.ok, outcome.reason
    assert outcome.energy_j == pytest.approx(JOULES_PER_READ)  # one reading at spawn, one at the verdict
    assert outcome.summary["mean_watts"] == pytest.approx(JOULES_PER_READ / outcome.summary["total_seconds"])
    assert "energy_j:         250" in outcome.log_path.read_text()


def test_the_ledger_and_results_carry_the_energy(test_cache: Path, tmp_path: Path, monkeypatch):
    root = make_repo(tmp_path / "repo", TIME_BUDGET="2", WARMUP_ALLOWANCE="4")
    assert cli(root, "session", "start", TAG, "--repeats", "1").returncode == 0
    monkeypatch.setenv("AUTORESEARCH_DEVICE", "cpu")
    session = Session.active(root)
    session.energy = meter()  # the GPU counter the session would open on a GPU machine
    trainer = root / "backends" / "cuda" / "train.py"
    trainer.write_text(trainer.read_text().replace("LOGIT_SCALE = 0.5", "LOGIT_SCALE = 1.0"))
    with RepoLock(root, "test"):
        result = session.try_change("LOGIT_SCALE 0.5 -> 1.0")
    assert result.verdict == "keep", result.line()
    row = ledger(root)[-1]
    runs = len(row.runs.split(";"))
    assert row.energy_j == pytest.approx(runs * JOULES_PER_READ)
    assert row.mean_watts == pytest.approx(row.energy_j / row.seconds, rel=0.02)  # both cells rounded
    shown = cli(root, "results", str(session_paths(root).ledger))
    assert shown.returncode == 0, shown.stderr
    assert "Wh per kept improvement" in shown.stdout
