"""What a newcomer meets, through the real CLI on a fresh project: the README's workflow, a bad
evaluator constant, a tiny validation file, a run that is never silent, an honest summary."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from ratchet_helpers import cli, git, make_repo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(test_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh clone, set up and committed (the README's `setup` then `git commit -am`)."""
    return make_repo(tmp_path_factory.mktemp("newcomer") / "repo", TIME_BUDGET="7", WARMUP_ALLOWANCE="8")


def test_the_readme_workflow_run_then_commit_then_session_start(project):
    result = cli(project, "run")
    assert result.returncode == 0, result.stderr
    assert git(project, "status", "--porcelain") == ""  # nothing `run` writes dirties the tree
    # Off a terminal the run is never silent: a progress line every few seconds on stderr.
    assert any(line.startswith("[") and " s] " in line for line in result.stderr.splitlines()), result.stderr
    summary = dict(line.split(":", 1) for line in result.stdout.splitlines() if ":" in line)
    assert summary["device"].strip() == "cpu"  # the device, as everywhere else; the CPU's name is elsewhere
    assert "process RSS" in summary["peak_vram_mb"]  # on a CPU the figure is the process's, said so
    started = cli(project, "session", "start", "first", "--repeats", "1")
    assert started.returncode == 0, started.stderr


def test_an_evaluator_constant_out_of_range_is_refused_with_the_range(project):
    config = project / ".git" / "autoresearch" / "setup.json"
    before = config.read_text()
    result = cli(project, "setup", "--set", "TIME_BUDGET=-5")
    assert result.returncode == 1
    assert "TIME_BUDGET must be between 1 and 86400 seconds, got -5" in result.stderr
    assert config.read_text() == before  # never saved, never trained on


def test_a_tiny_validation_file_names_the_users_data_not_a_cache_path(project, test_cache, tmp_path):
    folder = tmp_path / "mydata"
    folder.mkdir()
    train = sorted((test_cache / "data" / "builtin").glob("train_*.parquet"))
    for shard in train:
        shutil.copy(shard, folder / shard.name)
    (folder / "zz_validation.txt").write_text("Just one short paragraph.\n")
    result = cli(project, "setup", "--data", f"local:{folder}", "--set", "VOCAB_SIZE=4096")
    assert result.returncode == 1, result.stderr
    message = " ".join(result.stderr.split())
    assert f"the validation data of local:{folder}" in message and "too small" in message, message
    assert "at most 0" not in message and str(test_cache) not in message
