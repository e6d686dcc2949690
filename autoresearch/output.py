"""One place for CLI output conventions: data on stdout, messages on stderr, errors with a hint.

Message text is never parsed as Rich markup or emoji codes: it carries paths, pip extras
(`pip install 'mlx[cpu]'`), git output and trainer logs, in which `[...]` and `:name:` are text.
Only the labels this module adds (`Error:`, `Warning:`) are styled. Lines are never hard-wrapped
(`soft_wrap`): off a terminal Rich would otherwise break paths and commands at 80 columns.
"""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.text import Text

err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)
out = Console(highlight=False, soft_wrap=True, emoji=False)


def print_json(data: Any) -> None:
    """Exactly one JSON document on stdout (tools parse it; nothing else goes there)."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def plain(message: str) -> Text:
    """`message` as literal text, for Rich calls that would read markup (e.g. `status.update`)."""
    return Text(message)


def info(message: str) -> None:
    err.print(plain(message))


def labelled(label: str, style: str, message: str) -> None:
    """`label: message` on stderr with only the label styled."""
    err.print(Text.assemble((f"{label}:", style), " ", message))


def success(label: str, message: str) -> None:
    labelled(label, "green", message)


def warn(message: str) -> None:
    labelled("Warning", "yellow", message)


def fail(message: str, hint: str | None = None, code: int = 1) -> NoReturn:
    """Print `Error: ...` (and `Hint: ...` when there is one that helps) on stderr and exit."""
    labelled("Error", "red", message)
    if hint:
        labelled("Hint", "dim", hint)
    raise typer.Exit(code)
