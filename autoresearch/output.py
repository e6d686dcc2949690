"""One place for CLI output conventions: data on stdout, messages on stderr, errors with a hint."""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import typer
from rich.console import Console

err = Console(stderr=True, highlight=False)
out = Console(highlight=False, soft_wrap=True)


def print_json(data: Any) -> None:
    """Exactly one JSON document on stdout (tools parse it; nothing else goes there)."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def info(message: str) -> None:
    err.print(message)


def warn(message: str) -> None:
    err.print(f"[yellow]Warning:[/yellow] {message}")


def fail(message: str, hint: str | None = None, code: int = 1) -> NoReturn:
    """Print `Error: ...` (and `Hint: ...`) on stderr and exit non-zero."""
    err.print(f"[red]Error:[/red] {message}")
    if hint:
        err.print(f"[dim]Hint:[/dim] {hint}")
    raise typer.Exit(code)
