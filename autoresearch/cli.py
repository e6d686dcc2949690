"""The `autoresearch` command: wiring only. Each noun lives in its own `cmd_*` module, which
imports heavy dependencies (torch, mlx, pyarrow) inside its functions so `--help` stays fast."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="autoresearch",
    help="Autonomous LLM-training research on any hardware: detect, setup, run, ratchet.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)

# Modules are registered in the order their commands appear in --help.
COMMAND_MODULES = ("cmd_detect", "cmd_setup", "cmd_session", "cmd_results", "cmd_program")

for _name in COMMAND_MODULES:
    importlib.import_module(f"autoresearch.{_name}").register(app)


def main() -> None:
    app()
