"""`autoresearch setup` and `autoresearch run`: prepare once, then run one experiment."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from autoresearch.output import err, fail, info, print_json, success
from autoresearch.progress import progress_reporter, refuse_inside_trainer

BackendOpt = Annotated[Optional[str], typer.Option("--backend", help="Trainer backend: cuda, rocm, mps or mlx (default: detected).")]
PresetOpt = Annotated[Optional[str], typer.Option("--preset", help="Hardware preset (default: detected; see `autoresearch presets`).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]


def _parse_sets(items: list[str]) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"--set expects KEY=VALUE, got {item!r}", "e.g. --set TIME_BUDGET=60")
        pairs[key.strip()] = value.strip()
    return pairs


def setup(
    backend: BackendOpt = None,
    preset: PresetOpt = None,
    data: Annotated[Optional[str], typer.Option("--data", help="Data source: climbmix, fineweb-edu, tinystories, builtin or local:PATH (default: the preset's).")] = None,
    num_shards: Annotated[Optional[int], typer.Option("--num-shards", min=1, help="Training shards to download (default: the preset's).")] = None,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Parallel download workers.")] = 8,
    set_: Annotated[list[str], typer.Option("--set", help="Override an evaluator constant, e.g. --set TIME_BUDGET=120 (starts a new comparison track).")] = [],
    json_output: JsonOpt = False,
) -> None:
    """Prepare data, tokenizer, token files and the run configuration (safe to re-run).

    Downloads or builds the preset's data, trains the tokenizer, tokenizes once, computes the
    unigram baseline and writes the preset's starting constants into the trainer. Artefacts that
    are intact are reused; partial or corrupt ones are rebuilt.
    """
    from harness.data.download import DownloadError
    from harness.paths import repo_root
    from harness.prepare import SetupRequest, run_setup

    root = repo_root()
    info(f"repository: {root}")
    request = SetupRequest(root=root, backend=backend, preset=preset, data=data,
                           num_shards=num_shards, overrides=_parse_sets(set_), workers=workers)
    try:
        config = run_setup(request, log=info)
    except DownloadError as exc:
        fail(exc.message, exc.hint)
    except (ValueError, FileNotFoundError) as exc:
        # The messages name the valid values or the fix; a hint is printed only where one exists.
        fail(str(exc), getattr(exc, "hint", None))
    except KeyError as exc:  # str(KeyError) is the key in quotes: show the message itself
        fail(str(exc.args[0]) if exc.args else "a required key is missing", getattr(exc, "hint", None))
    if json_output:
        print_json(json.loads(config.to_json()))
    else:
        ev = config.evaluator
        success("ready", f"backend {config.backend} on {config.device}, preset {config.preset}, "
                f"data {ev.DATA_SOURCE}, seq {ev.MAX_SEQ_LEN}, budget {ev.TIME_BUDGET:g} s, "
                f"unigram baseline {config.unigram_bpb:.4f} bpb")
        info("next: `autoresearch run`")


def run(
    timeout: Annotated[float, typer.Option("--timeout", min=1, help="Kill the trainer after this many seconds.")] = 600,
    log: Annotated[Path, typer.Option("--log", help="Where the trainer's output goes.")] = Path("run.log"),
    json_output: JsonOpt = False,
) -> None:
    """Run one experiment with the configured trainer and print its summary.

    The trainer runs in a subprocess with its output in run.log, under the budget the runner
    holds; a separate evaluator process scores the model it exports. Exits 1 on a crash,
    divergence, timeout or a run over budget, showing the end of the log.
    """
    import os
    import signal

    from harness.config import default_config_path, load_config
    from harness.hardware.energy import EnergyMeter
    from harness.paths import repo_root, state_dir
    from harness.scoring.budget import format_summary
    from harness.scoring.evalset import load_eval_pointer
    from harness.scoring.runner import run_experiment
    from loop.errors import SessionError
    from loop.lock import RepoLock

    refuse_inside_trainer("run")
    root = repo_root()
    config_path = default_config_path(root)
    try:
        config = load_config(config_path)
        eval_set = load_eval_pointer(root)
    except FileNotFoundError as exc:
        fail(str(exc), "run `autoresearch setup` first")
    log_path = log if log.is_absolute() else root / log
    try:
        lock = RepoLock(root, "autoresearch run").acquire()  # one run (or session) at a time
    except SessionError as exc:
        fail(str(exc), exc.hint)

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through the runner, which kills the trainer's tree

    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), stop)
    info(f"running backends/{config.backend}/train.py ({config.preset}, {config.device}); output in {log_path}")
    energy, _ = EnergyMeter.open(os.environ.get("AUTORESEARCH_DEVICE") or config.device)
    try:
        with progress_reporter("starting...") as report:
            outcome = run_experiment(root, config.backend, config_path, log_path, eval_set=eval_set,
                                     run_dir=state_dir(root) / "runs" / "latest", timeout=timeout,
                                     compile_cache=state_dir(root) / "compile-cache", energy=energy,
                                     on_progress=report)
    finally:
        if energy is not None:
            energy.close()
        lock.release()
    if json_output:
        print_json({"status": outcome.status, "reason": outcome.reason, "summary": outcome.summary,
                    "seconds": round(outcome.seconds, 1), "log": str(log_path)})
    elif outcome.ok:
        print(format_summary(outcome.summary))
    if not outcome.ok:
        err.print(outcome.log_tail(20), markup=False, highlight=False)
        fail(f"run {outcome.status}: {outcome.reason}", f"full log: {log_path}")


def register(app: typer.Typer) -> None:
    app.command(rich_help_panel="Main job")(setup)
    app.command(rich_help_panel="Main job")(run)
