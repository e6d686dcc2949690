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

PROJECT = Path(__file__).resolve().parent.parent
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

def test_setup_messages_keep_brackets_and_markup_like_user_text(project):
    result = run_cli(project, "setup", "--preset", "cpu-tiny", "--set", "NOPE[v2]=1", "--set", "[bold]X[/bold]=1")
    assert result.returncode == 1
    assert "unknown evaluator constant 'NOPE[v2]'" in result.stderr
    result = run_cli(project, "setup", "--preset", "cpu-tiny", "--set", "[bold]X[/bold]=1")
    assert "unknown evaluator constant '[bold]X[/bold]'" in result.stderr
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


# -- item 7: CLI conventions --------------------------------------------------------------------

def test_version_and_short_help(tmp_path):
    import tomllib

    expected = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]["version"]
    version = run_cli(tmp_path, "--version")
    assert version.returncode == 0 and version.stdout == f"autoresearch {expected}\n"
    for args in (["-h"], ["setup", "-h"], ["session", "start", "-h"], ["presets", "show", "-h"]):
        short, long = run_cli(tmp_path, *args), run_cli(tmp_path, *args[:-1], "--help")
        assert short.returncode == 0 and short.stdout == long.stdout, args
        assert "Usage: autoresearch" in short.stdout


def test_help_shows_no_type_beside_flags_and_reads_as_paragraphs(tmp_path):
    for args in ([], ["detect"], ["setup"], ["session", "status"], ["loop"]):
        result = run_cli(tmp_path, *args, "--help")
        assert result.returncode == 0, result.stderr
        assert "<bool>" not in result.stdout, args
    detect = run_cli(tmp_path, "detect", "--help").stdout
    # The docstring's second paragraph is reflowed, not cut where the source line ended.
    assert "and the probes that found nothing" in " ".join(detect.replace("│", " ").split())
    assert not any(line.strip() == "that found nothing; then the choice, each part with its reason."
                   for line in detect.splitlines())


def test_shell_completion_completes_commands_and_subcommands(tmp_path):
    def complete(*words: str) -> list[str]:
        result = run_cli(tmp_path, _AUTORESEARCH_COMPLETE="complete_bash",
                         COMP_WORDS=" ".join(("autoresearch", *words)), COMP_CWORD=str(len(words)))
        assert result.returncode == 0, result.stderr
        return result.stdout.split()

    assert complete("se") == ["setup", "session"]
    assert complete("session", "st") == ["start", "status"]
    assert complete("setup", "--da") == ["--data"]
    # The script bash sources (what `--show-completion` prints where it can detect the shell; a test
    # runner's process tree may have no shell to detect).
    script = run_cli(tmp_path, _AUTORESEARCH_COMPLETE="source_bash")
    assert script.returncode == 0 and "_AUTORESEARCH_COMPLETE=complete_bash" in script.stdout


def test_frozen_evaluator_stop_has_its_own_exit_code_documented_in_the_readme(tmp_path):
    from loop.errors import FrozenEvaluatorError

    usage = run_cli(tmp_path, "setup", "--no-such-option")
    assert usage.returncode == 2  # typer's usage error
    assert FrozenEvaluatorError.exit_code not in (0, 1, 2, 130)
    readme = " ".join((PROJECT / "README.md").read_text().split())
    assert f"names the file, with exit code {FrozenEvaluatorError.exit_code}" in readme


def test_messages_are_not_wrapped_at_80_columns_off_a_terminal(project, tmp_path):
    folder = tmp_path / ("a-folder-with-a-long-name-" * 4) / "corpus"
    result = run_cli(project, "setup", "--preset", "cpu-tiny", "--data", f"local:{folder}")
    assert result.returncode == 1
    error = next(line for line in result.stderr.splitlines() if line.startswith("Error:"))
    assert len(error) > 120 and f"{folder} does not exist" in error


def test_outside_a_repository_commands_say_so_instead_of_using_the_installed_checkout(tmp_path):
    outside = tmp_path / "somewhere"
    outside.mkdir()
    for args in (["setup"], ["session", "status"], ["program"], ["results"]):
        result = run_cli(outside, *args)
        assert result.returncode == 1, args
        assert f"Error: {outside} is not inside an autoresearch repository" in result.stderr, args
        assert "AUTORESEARCH_ROOT" in result.stderr and TRACEBACK not in result.stderr


def test_the_repository_is_found_from_a_subfolder_and_named(project, tmp_path):
    repo = tmp_path / "my-clone"
    (repo / "harness").mkdir(parents=True)
    (repo / "backends" / "cuda").mkdir(parents=True)
    (repo / "program.md").write_text((PROJECT / "program.md").read_text() + "\nThis is my-clone's program.\n")
    program = run_cli(repo / "backends" / "cuda", "program")
    assert program.returncode == 0, program.stderr
    assert "This is my-clone's program." in program.stdout
    setup = run_cli(project / "backends", "setup", "--preset", "cpu-tiny", "--set", "NOPE=1")
    assert setup.stderr.startswith(f"repository: {project}\n")
