"""The machine-speed probe: a positive, finite figure per framework, and a slowed machine reads as drift.

No test compares a reading with a fixed number: speeds differ between machines. A slowed
machine is simulated by the probe's own slowdown hook (it sleeps inside the timed region), and the
slowed reading is compared with the best plain reading taken around it, so a load change on the
machine between readings cannot make it pass or fail by itself.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.scoring.speed import (
    CPU_WORKLOAD,
    MIN_CHUNKS,
    SLOWDOWN_ENV,
    SpeedReading,
    drift,
    drifted,
    measure_speed,
)

ROOT = Path(__file__).resolve().parents[1]
SHORT = 0.05  # seconds of timed work: enough for the median of a few chunks


def reading(gflops: float, framework: str = "torch", device: str = "cpu", size: int = 256) -> SpeedReading:
    return SpeedReading(framework, device, size, gflops, chunks=10, seconds=0.25)


@pytest.mark.parametrize("framework", ["numpy", "torch", "mlx"])
def test_the_probe_reads_a_positive_finite_speed_on_each_framework(framework):
    if framework == "torch":
        pytest.importorskip("torch")
    if framework == "mlx":
        pytest.importorskip("mlx.core")
    first = measure_speed(framework, "cpu", seconds=SHORT)
    second = measure_speed(framework, "cpu", seconds=SHORT)
    for r in (first, second):
        assert r.gflops > 0 and math.isfinite(r.gflops)
        assert r.chunks >= MIN_CHUNKS
        assert (r.framework, r.device, r.size) == (framework, "cpu", CPU_WORKLOAD.size)
    assert first.comparable(second)


def test_a_slowed_machine_reads_as_drift():
    plain_before = measure_speed("numpy", "cpu", seconds=SHORT)
    slowed = measure_speed("numpy", "cpu", seconds=SHORT, slowdown=20.0)
    plain_after = measure_speed("numpy", "cpu", seconds=SHORT)
    reference = max(plain_before, plain_after, key=lambda r: r.gflops)
    assert drift(slowed, reference) < -0.5
    assert drifted(slowed, reference, max_percent=25)


def test_drift_is_relative_and_counts_both_directions():
    reference = reading(100.0)
    assert drift(reading(80.0), reference) == pytest.approx(-0.2)
    assert drift(reading(130.0), reference) == pytest.approx(0.3)
    assert drifted(reading(80.0), reference, max_percent=10)
    assert drifted(reading(130.0), reference, max_percent=10)  # a load that ended is drift too
    assert not drifted(reading(95.0), reference, max_percent=10)
    assert not drifted(reading(109.0), reference, max_percent=10)


def test_readings_of_different_workloads_are_not_compared():
    with pytest.raises(ValueError, match="cannot compare"):
        drift(reading(100.0, framework="mlx"), reading(100.0))
    with pytest.raises(ValueError, match="cannot compare"):
        drift(reading(100.0, device="cuda", size=2048), reading(100.0))
    with pytest.raises(ValueError, match="positive percentage"):
        drifted(reading(100.0), reading(100.0), max_percent=0)


def test_bad_arguments_say_what_is_wrong():
    with pytest.raises(ValueError, match="unknown framework"):
        measure_speed("jax", "cpu")
    with pytest.raises(ValueError, match="CPU only"):
        measure_speed("numpy", "cuda")
    with pytest.raises(ValueError, match="slowdown"):
        measure_speed("numpy", "cpu", slowdown=0.5)


def _probe_cli(*args: str, slowdown: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != SLOWDOWN_ENV}
    if slowdown:
        env[SLOWDOWN_ENV] = slowdown
    return subprocess.run([sys.executable, "-m", "harness.scoring.speed", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_probe_runs_in_a_fresh_process_and_prints_one_json_reading():
    pytest.importorskip("torch")
    out = _probe_cli("--framework", "torch", "--device", "cpu", "--seconds", str(SHORT), "--json")
    assert out.returncode == 0, out.stderr
    parsed = SpeedReading.from_dict(json.loads(out.stdout))
    assert parsed.framework == "torch" and parsed.gflops > 0


def test_the_fresh_process_probe_reads_a_simulated_slow_machine():
    args = ("--framework", "numpy", "--seconds", str(SHORT), "--json")
    before = _probe_cli(*args)
    slowed = _probe_cli(*args, slowdown="20")
    plain = [before, _probe_cli(*args)]
    assert all(p.returncode == 0 for p in plain + [slowed]), [p.stderr for p in plain + [slowed]]
    reference = max((SpeedReading.from_dict(json.loads(p.stdout)) for p in plain), key=lambda r: r.gflops)
    assert drifted(SpeedReading.from_dict(json.loads(slowed.stdout)), reference, max_percent=25)


def test_a_probe_that_cannot_run_says_so_on_stderr():
    out = _probe_cli("--framework", "numpy", "--device", "mps")
    assert out.returncode == 1 and out.stdout == ""
    assert "speed probe failed" in out.stderr and "CPU only" in out.stderr
