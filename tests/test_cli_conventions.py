"""What a newcomer meets at the command line, through the real CLI (`python -m autoresearch` in a
subprocess, off a terminal, as a script or a CI log would run it): messages that keep their text,
say what is wrong without stray quotes or unhelpful hints, and the usual CLI conventions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import copy_project

TRACEBACK = "Traceback"


def run_cli(cwd: Path, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """`python -m autoresearch ARGS` in `cwd`, with no terminal and no COLUMNS (as in a pipe)."""
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("COLUMNS", "LINES", "AUTORESEARCH_ROOT", "AUTORESEARCH_CONFIG")}
    full_env.update(env)
    return subprocess.run([sys.executable, "-m", "autoresearch", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the project (setup would write into its trainer), not yet set up."""
    return copy_project(tmp_path_factory.mktemp("newcomer"))


# -- item 2: message text is text, not Rich markup -----------------------------------------------

def test_setup_messages_keep_brackets_from_pip_extras_and_user_text(project):
    result = run_cli(project, "setup", "--backend", "cuda", "--preset", "cpu-tiny", "--set", "NOPE[v2]=1")
    assert result.returncode == 1
    # The backend's reason advises `pip install -e '.[cuda]'`: the extra must survive.
    assert "'.[cuda]'" in result.stderr
    assert "unknown evaluator constant 'NOPE[v2]'" in result.stderr
    assert TRACEBACK not in result.stderr


def test_a_path_that_looks_like_a_closing_tag_is_an_error_message_not_a_crash(project, tmp_path):
    folder = tmp_path / "corpus[/x]" / "[v2]"
    result = run_cli(project, "setup", "--preset", "cpu-tiny", "--data", f"local:{folder}")
    assert result.returncode == 1
    assert TRACEBACK not in result.stderr and "MarkupError" not in result.stderr
    assert f"{folder} does not exist" in result.stderr
    assert len(result.stderr.splitlines()) < 12


# -- item 4: rough messages ---------------------------------------------------------------------

GENERIC_HINT = "check the options"


@pytest.mark.parametrize("args, message", [
    (["--set", "EVAL_TOKENS=abc"], "Error: EVAL_TOKENS must be an integer, got 'abc'\n"),
    (["--set", "EVAL_TOKENS=8192.5"], "Error: EVAL_TOKENS must be an integer, got '8192.5'\n"),
    (["--set", "TIME_BUDGET=soon"], "Error: TIME_BUDGET must be a number, got 'soon'\n"),
    (["--data", "local:"], "Error: 'local:' names no folder; write local:PATH or local:PATH::VALIDATION_FILE\n"),
])
def test_setup_errors_keep_their_quotes_and_carry_no_generic_hint(project, args, message):
    result = run_cli(project, "setup", "--preset", "cpu-tiny", *args)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Hint:" not in result.stderr and GENERIC_HINT not in result.stderr


def test_a_download_error_keeps_its_own_hint(project, tmp_path):
    from test_download import FileServer

    server = FileServer().start()  # serves nothing: every shard is a 404
    try:
        result = run_cli(project, "setup", "--preset", "cpu-tiny", "--data", "tinystories",
                         AUTORESEARCH_CACHE=str(tmp_path / "cache"), HF_ENDPOINT=server.url)
    finally:
        server.stop()
    assert result.returncode == 1
    error = next(line for line in result.stderr.splitlines() if line.startswith("Error:"))
    assert "could not download" in error and "404" in error and "HF_ENDPOINT" not in error
    hint = next(line for line in result.stderr.splitlines() if line.startswith("Hint:"))
    assert "HF_ENDPOINT" in hint and "--data builtin" in hint
    assert GENERIC_HINT not in result.stderr
