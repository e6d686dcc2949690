"""`autoresearch detect` and `autoresearch presets` through typer's runner, and `detect --json`
once as a real `python -m autoresearch` subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from autoresearch import cmd_detect
from harness.hardware import presets as presets_module

PROJECT = Path(__file__).resolve().parent.parent
TIERS = ["h100", "a100-40gb", "rtx4090", "rtx3060", "gpu-6gb", "amd-mi300", "amd-24gb",
         "apple-64gb+", "apple-32gb", "apple-16gb", "cpu-tiny"]


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    app = typer.Typer()
    cmd_detect.register(app)
    return app


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


def _has_usable_gpu() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available() or torch.backends.mps.is_available()


cpu_only = pytest.mark.skipif(_has_usable_gpu(), reason="expects this CPU-only CI machine")


@cpu_only
def test_detect_json_is_one_object_with_the_cpu_choice(app, runner):
    result = runner.invoke(app, ["detect", "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert {"os", "arch", "wsl", "python", "frameworks", "accelerators", "cpu", "absent", "choice"} <= set(data)
    choice = data["choice"]
    assert (choice["backend"], choice["device"], choice["preset"]) == ("cuda", "cpu", "cpu-tiny")
    assert set(choice["reasons"]) == {"backend", "device", "preset"}


@cpu_only
def test_detect_prints_a_readable_report_and_the_reasons(app, runner):
    result = runner.invoke(app, ["detect"])
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    for text in ("OS", "Python", "CPU", "torch", "Accelerators", "Choice", "cpu-tiny", "nvml"):
        assert text in out, text
    assert "the cuda trainer (PyTorch) on the CPU" in out


def test_detect_overrides(app, runner):
    pytest.importorskip("mlx.core")
    result = runner.invoke(app, ["detect", "--json", "--backend", "mlx", "--preset", "gpu-6gb"])
    assert result.exit_code == 0, result.stderr
    choice = json.loads(result.stdout)["choice"]
    assert (choice["backend"], choice["preset"]) == ("mlx", "gpu-6gb")
    assert "--preset" in choice["reasons"]["preset"]


@pytest.mark.parametrize("args, message", [
    (["--preset", "h1000"], "unknown preset 'h1000'"),
    (["--backend", "tpu"], "unknown backend 'tpu'"),
])
def test_detect_rejects_bad_overrides_on_stderr_only(app, runner, args, message):
    result = runner.invoke(app, ["detect", "--json", *args])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert message in result.stderr and "Error" in result.stderr


def test_presets_lists_every_tier(app, runner):
    for args in (["presets"], ["presets", "list"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0].split()[:3] == ["NAME", "BACKEND", "MATCH"]
        assert [line.split()[0] for line in lines[1:]] == TIERS
    h100 = next(line for line in lines if line.startswith("h100 "))
    assert "nvidia >= 64 GB" in h100 and "2048" in h100 and "SSSL" in h100


def test_presets_json(app, runner):
    for args in (["presets", "--json"], ["presets", "list", "--json"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.stderr
        data = json.loads(result.stdout)
        assert [p["name"] for p in data["presets"]] == TIERS


def test_presets_show(app, runner):
    result = runner.invoke(app, ["presets", "show", "h100"])
    assert result.exit_code == 0, result.stderr
    assert "[trainer]" in result.stdout and "DEPTH = 8" in result.stdout and "EVAL_TOKENS = 20971520" in result.stdout
    result = runner.invoke(app, ["presets", "show", "cpu-tiny", "--json"])
    data = json.loads(result.stdout)
    assert data["evaluator"]["DATA_SOURCE"] == "builtin" and data["trainer"]["WINDOW_PATTERN"] == "SL"
    result = runner.invoke(app, ["presets", "show", "nope"])
    assert result.exit_code == 1 and "known presets: h100" in result.stderr


def test_a_broken_preset_file_is_reported_not_raised(app, runner, tmp_path, monkeypatch):
    text = (presets_module.PRESETS_DIR / "h100.toml").read_text().replace("DEPTH = 8", "DEPTH = 'eight'")
    (tmp_path / "h100.toml").write_text(text)
    monkeypatch.setattr(presets_module, "PRESETS_DIR", tmp_path)
    for args in (["presets"], ["detect"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 1
        assert "h100.toml" in result.stderr and "trainer.DEPTH" in result.stderr
        assert "Traceback" not in result.stderr + result.stdout


def test_cli_modules_do_not_import_frameworks():
    code = ("import sys, autoresearch.cmd_detect, harness.hardware.detect, harness.hardware.presets; "
            "print(sorted(m for m in ('torch', 'mlx.core', 'pynvml') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_python_m_autoresearch_detect_json(tmp_path):
    env = {**os.environ, "AUTORESEARCH_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-m", "autoresearch", "detect", "--json"], cwd=PROJECT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)  # the whole of stdout is one JSON document
    assert data["python"] and isinstance(data["accelerators"], list)
    choice = data["choice"]
    if not _has_usable_gpu():
        assert (choice["backend"], choice["device"], choice["preset"]) == ("cuda", "cpu", "cpu-tiny")
    assert choice["preset"] in TIERS


def _imported_modules(importtime_stderr: str) -> set[str]:
    """Module names from `python -X importtime` lines: `import time: self | cumulative | name`."""
    return {line.rsplit("|", 1)[1].strip() for line in importtime_stderr.splitlines()
            if line.startswith("import time:") and line.count("|") == 2}


def test_detect_reads_the_frameworks_without_importing_them_and_verify_imports_them(tmp_path):
    def detect_json(*args: str):
        out = subprocess.run([sys.executable, "-X", "importtime", "-m", "autoresearch", "detect", "--json", *args],
                             cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout), _imported_modules(out.stderr)

    fast, fast_modules = detect_json()
    assert "typer" in fast_modules  # the measurement works
    assert not {"torch", "mlx.core", "mlx"} & fast_modules
    verified, verified_modules = detect_json("--verify")
    assert fast["choice"] == verified["choice"] and fast["torch_build"] == verified["torch_build"]
    for name, module in (("torch", "torch"), ("mlx", "mlx.core")):
        if verified["frameworks"][name] is None:
            continue
        assert module in verified_modules
        assert (fast["frameworks"][name]["source"], verified["frameworks"][name]["source"]) == ("files", "import")
        assert {**fast["frameworks"][name], "source": "import"} == verified["frameworks"][name]


def _torch_build() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return "rocm" if torch.version.hip else "cuda" if torch.version.cuda else "cpu"


@pytest.mark.skipif(os.name != "posix" or _torch_build() != "cpu" or _has_usable_gpu(),
                    reason="a CPU build of torch on a machine without a GPU, where a recorded rocm-smi stands in")
def test_detect_names_a_torch_build_that_cannot_use_the_gpu_and_the_command_that_fixes_it(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    rocm_smi = bin_dir / "rocm-smi"  # answers as rocm-smi does on a Radeon RX 7900 XT
    rocm_smi.write_text(f"#!/bin/sh\ncat '{PROJECT / 'tests' / 'fixtures' / 'detect' / 'rocm_smi_7900xt.json'}'\n")
    rocm_smi.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    fix = "pip uninstall -y torch && pip install torch --index-url https://download.pytorch.org/whl/rocm6.4"
    text = subprocess.run([sys.executable, "-m", "autoresearch", "detect"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert text.returncode == 0, text.stderr
    assert "wrong build: torch" in text.stdout and "a CPU build, which cannot use the Radeon RX 7900 XT" in text.stdout
    assert f"fix: {fix}\n" in text.stdout and "uv sync --extra rocm" in text.stdout
    data = json.loads(subprocess.run([sys.executable, "-m", "autoresearch", "detect", "--json"], cwd=tmp_path,
                                     env=env, capture_output=True, text=True, timeout=120).stdout)
    assert (data["torch_build"]["installed"], data["torch_build"]["wanted"]) == ("cpu", "rocm")
    assert data["torch_build"]["command"] == fix
    assert fix in data["choice"]["reasons"]["backend"]


def test_detect_says_nothing_about_a_build_that_fits(tmp_path):
    out = subprocess.run([sys.executable, "-m", "autoresearch", "detect", "--json"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    data = json.loads(out.stdout)
    if _torch_build() == "cpu" and not data["accelerators"]:
        assert data["torch_build"] is None
    text = subprocess.run([sys.executable, "-m", "autoresearch", "detect"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120).stdout
    assert ("wrong build" in text) == (data["torch_build"] is not None)
