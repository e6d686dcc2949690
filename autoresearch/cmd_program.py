"""`autoresearch program`: program.md with the session's facts filled in (backend, preset, baseline,
noise floor, memory ceiling, best, what has been tried), printed or written to a file."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from autoresearch.output import fail, info, warn


def program(
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the filled program here instead of printing it.")] = None,
    results_path: Annotated[Optional[Path], typer.Option("--results", help="The results file (default: results.tsv in the repository).")] = None,
) -> None:
    """Print program.md with the session's facts filled in.

    The facts come from the run configuration, the active session and results.tsv; before a
    session, facts not measured yet are said to be so."""
    from harness.files import atomic_write_text
    from harness.paths import repo_root
    from loop.agents import fill_facts, render_facts

    root = repo_root()
    template = root / "program.md"
    if not template.is_file():
        fail(f"no program.md in {root}", "the repository ships one; restore it with `git checkout program.md`")
    facts = gather_facts(root, template.read_text(encoding="utf-8"), results_path)
    filled = fill_facts(facts.program, render_facts(facts))
    if output is None:
        sys.stdout.write(filled)
        return
    if output.resolve() == template.resolve():
        fail("refusing to overwrite program.md: it is the template (frozen during a session)",
             "print it, or write the filled copy elsewhere, e.g. --output /tmp/program.md")
    atomic_write_text(output, filled)
    info(f"wrote {output}")


def gather_facts(root: Path, program_text: str, results_path: Path | None = None):
    """PromptFacts for this repository from what exists: the run config (after `setup`), the
    active session, the results file. Missing pieces stay unknown instead of failing."""
    from harness.config import default_config_path, load_config
    from loop.agents import facts_from_rows, memory_ceiling_gb
    from loop.results import read_rows

    session = _session_facts(root)
    config = session.get("run")
    if config is None:
        try:
            config = load_config(default_config_path(root))
        except FileNotFoundError:
            warn("no run configuration yet: run `autoresearch setup` for the backend, preset and budget")
        except (ValueError, KeyError, TypeError) as exc:
            warn(f"the run configuration is unreadable ({exc}); re-run `autoresearch setup`")
    path = results_path or session.get("results_path") or root / "results.tsv"
    try:
        rows = read_rows(Path(path))
    except FileNotFoundError:
        rows = []
    last = rows[-1] if rows else None
    backend = session.get("backend") or (config.backend if config else "") or (last.backend if last else "")
    preset = session.get("preset") or (config.preset if config else "") or (last.preset if last else "")
    device = session.get("device") or (config.device if config else "") or (last.device if last else "")
    trainer = session.get("trainer") or (f"backends/{backend}/train.py" if backend else "backends/<backend>/train.py")
    extra = {
        "device": device,
        "time_budget": config.evaluator.TIME_BUDGET if config else None,
        "noise_floor": session.get("noise_floor"),
        "rule": session.get("rule", ""),
        "memory_ceiling_gb": session.get("memory_ceiling_gb") or memory_ceiling_gb(device),
    }
    if session.get("noise_sigma") is not None:
        extra["noise_sigma"] = session["noise_sigma"]
    return facts_from_rows(program_text, backend or "not set up", preset or "not set up", trainer, rows,
                           recent=0, **extra)


def _session_facts(root: Path) -> dict:
    """What the active session knows (its run config, rule, noise floor, ledger), or {} when the
    repository is not on a session branch (`autoresearch/TAG`)."""
    from loop.session import SessionPaths, load_session_config
    from loop.decide import noise_floor
    from loop.results import noise_sigma_of, read_rows

    branch = _current_branch(root)
    if not branch or not branch.startswith("autoresearch/"):
        return {}
    paths = SessionPaths.of(root, branch.removeprefix("autoresearch/"))
    try:
        config = load_session_config(paths)
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return {}
    try:
        sigma = noise_sigma_of(read_rows(paths.ledger))
    except FileNotFoundError:
        sigma = None
    if config.rule == "strict":
        rule = "strict (upstream): keep when one run is lower than the best"
        floor = None
    else:
        rule = (f"noise: keep when the gain beats max({config.z:g} sigma, {config.min_floor:g}); "
                "a result within one sigma of that line is re-run and judged on the mean")
        floor = noise_floor(sigma, config.z, config.min_floor) if sigma is not None else None
    return {"run": config.run, "backend": config.backend, "preset": config.preset, "device": config.run.device,
            "trainer": config.trainer, "rule": rule, "noise_floor": floor, "noise_sigma": sigma, "results_path": paths.ledger}


def _current_branch(root: Path) -> str | None:
    import subprocess

    try:
        done = subprocess.run(["git", "symbolic-ref", "--short", "-q", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None  # a detached HEAD or not a git repository
    return done.stdout.strip() or None


def register(app: typer.Typer) -> None:
    app.command(rich_help_panel="Research loop")(program)
