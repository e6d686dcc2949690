"""CLI conventions typer leaves to us: `--help` that reads well, and `--version`.

`Group` is the root command's class. Each command it resolves (nested groups included) is tidied
once: flags lose the `<bool>` type typer 0.29's rich help prints beside them (a flag takes no
value), and docstring paragraphs are reflowed, since that help keeps the docstring's line breaks
and would print half-empty lines.
"""

from __future__ import annotations

import inspect
import re
from importlib import metadata
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperGroup

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

PACKAGE = "autoresearch"
PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def version() -> str:
    """The version of the code that runs: its checkout's pyproject.toml, else the installed
    package's metadata."""
    try:
        return tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]["version"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        pass
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return "unknown"


def print_version(value: bool) -> None:
    """Eager `--version` callback: print and exit before any command runs."""
    if value:
        typer.echo(f"{PACKAGE} {version()}")
        raise typer.Exit()


def reflow(text: str | None) -> str | None:
    """Paragraphs (blank-line separated) as single lines; `\\b` paragraphs stay as written."""
    if not text:
        return text
    paragraphs = re.split(r"\n\s*\n", inspect.cleandoc(text))
    return "\n\n".join(p if p.startswith("\b") else " ".join(p.split()) for p in paragraphs)


def _tidy(command: Any, ctx: typer.Context) -> None:
    if getattr(command, "_tidied", False):
        return
    command._tidied = True
    command.help = reflow(command.help)
    for param in command.get_params(ctx):
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    for sub in getattr(command, "commands", {}).values():
        _tidy(sub, ctx)


class Group(TyperGroup):
    """The root group: tidies itself and every command it hands out (see the module docstring)."""

    def get_params(self, ctx: typer.Context) -> list:
        _tidy(self, ctx)
        return super().get_params(ctx)

    def get_command(self, ctx: typer.Context, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            _tidy(command, ctx)
        return command
