"""The `autoresearch` command: wiring only. Each noun lives in its own `cmd_*` module, which
imports heavy dependencies (torch, mlx, pyarrow) inside its functions so `--help` stays fast."""

from __future__ import annotations

import importlib
import sys
from typing import Annotated

import typer

from autoresearch.conventions import Group, print_version

app = typer.Typer(
    name="autoresearch",
    cls=Group,
    help="Autonomous LLM-training research on any hardware: detect, setup, run, ratchet.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    pass


# Modules are registered in the order their commands appear in --help.
COMMAND_MODULES = ("cmd_detect", "cmd_setup", "cmd_session", "cmd_results", "cmd_program")

for _name in COMMAND_MODULES:
    importlib.import_module(f"autoresearch.{_name}").register(app)


def main() -> None:
    from harness.paths import RepositoryNotFound

    try:
        # One program name whichever way it starts (`autoresearch`, `python -m autoresearch`):
        # the usage lines match the README, and shell completion reads _AUTORESEARCH_COMPLETE.
        app(prog_name="autoresearch")
    except RepositoryNotFound as exc:  # any command that works on a repository, in one place
        from autoresearch.output import labelled

        labelled("Error", "red", str(exc))
        labelled("Hint", "dim", exc.hint)
        sys.exit(1)
