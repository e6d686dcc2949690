"""A session's frozen evaluator: its configuration and the manifest of hashes that pins it.

A session (`autoresearch session start TAG`) is one comparison track: one backend, one preset, one
data source, one set of evaluator constants, one keep rule. Its files live outside the working
tree an agent edits, in `state_dir(root)/sessions/TAG/`:

    session.json   the SessionConfig (with a copy of the run configuration)
    run.json       the run configuration every experiment of the session runs under
                   (passed to the trainer through AUTORESEARCH_CONFIG; a later `setup` cannot move it)
    manifest.json  SHA-256 of every frozen file, taken when the session started
    results.tsv    the session's ledger (the repository's results.tsv is a copy of it)
    journal.json   the experiment in flight, if any (see loop.journal)
    logs/          one trainer log per run

The manifest covers the code that produces and judges a score (`FROZEN_CODE`: the harness's
scoring path and its shared modules, `loop/`, the CLI), the other files of the tree an experiment
may not change (`presets/`, `program.md`, the dependency lock), the session's own config files, the
tokenizer with its token byte table, and the evaluator's data: the evaluation set (validation and
holdout rows with their canaries, the token byte table it scores with) and the validation shard it
was made from. Files that were absent when the session started are recorded as absent, so creating
one later is a change too. Python's caches (`__pycache__`, `*.pyc`) are never trusted: the runner
deletes them before every run (`harness.scoring.runner.remove_bytecode`).

Nothing here imports torch or mlx, and nothing here decides what to do about a mismatch: that is
the ratchet's job (`loop.ratchet`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from harness.config import RunConfig
from harness.files import atomic_write_text, sha256_file
from harness.paths import state_dir
from harness.scoring.evalset import EVAL_SET_FILE, EvalSet

# The code that produces and judges a score: a change to it stops the session.
FROZEN_CODE = ("harness/__init__.py", "harness/config.py", "harness/files.py", "harness/paths.py",
               "harness/processes.py", "harness/scoring", "loop", "autoresearch")
MANIFEST_DIRS = ("harness", "presets", "loop", "autoresearch")  # every file below these, relative to the repository
MANIFEST_FILES = ("program.md", "pyproject.toml", "uv.lock")  # recorded even when absent


@dataclass(frozen=True)
class SessionConfig:
    """What a session is: fixed when it starts, hashed into its manifest."""

    tag: str
    branch: str
    backend: str
    preset: str
    rule: str  # "noise" or "strict" (loop.decide)
    z: float  # the noise rule keeps a gain above max(z * sigma, min_floor)
    min_floor: float
    repeats: int  # baseline runs that measure sigma
    timeout: float  # hard wall-clock limit of one trainer run, seconds
    trainer: str  # the one mutable file, relative to the repository root (posix)
    base_commit: str  # the commit the session branch started from (the baseline's code)
    run: RunConfig
    created: str = ""
    eval_set: str = ""  # the evaluator's data (harness.scoring.evalset), out of the trainer's reach
    chained: bool = False  # ledger rows carry a hash chain (loop.integrity); False in older sessions
    max_drift: float = 25.0  # noise rule: percent of machine-speed drift that voids a run (0: never)
    recheck_every: int = 5  # noise rule: experiments judged against one incumbent before it is re-run

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "SessionConfig":
        data = dict(data)
        data["run"] = RunConfig.from_dict(data["run"])
        return cls(**data)


def now_utc() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class SessionPaths:
    """Where one session's files live (outside the working tree)."""

    directory: Path

    @classmethod
    def of(cls, root: Path, tag: str) -> "SessionPaths":
        return cls(sessions_dir(root) / tag)

    @property
    def config(self) -> Path:
        return self.directory / "session.json"

    @property
    def run_config(self) -> Path:
        return self.directory / "run.json"

    @property
    def manifest(self) -> Path:
        return self.directory / "manifest.json"

    @property
    def ledger(self) -> Path:
        return self.directory / "results.tsv"

    @property
    def journal(self) -> Path:
        return self.directory / "journal.json"

    @property
    def loop_state(self) -> Path:
        return self.directory / "loop.json"

    @property
    def logs(self) -> Path:
        return self.directory / "logs"

    @property
    def runs(self) -> Path:
        """One folder per run: the trainer's facts and training curve (the artifact is deleted)."""
        return self.directory / "runs"


def sessions_dir(root: Path) -> Path:
    return state_dir(root) / "sessions"


def save_session_config(config: SessionConfig, paths: SessionPaths) -> None:
    """Write session.json and the session's own run.json (what every run of it uses)."""
    atomic_write_text(paths.run_config, config.run.to_json())
    atomic_write_text(paths.config, config.to_json())


def load_session_config(paths: SessionPaths) -> SessionConfig:
    if not paths.config.is_file():
        raise FileNotFoundError(f"no session configuration at {paths.config}")
    return SessionConfig.from_dict(json.loads(paths.config.read_text(encoding="utf-8")))


# -- the manifest ---------------------------------------------------------------------------------

def _hidden_or_cache(path: Path) -> bool:
    return any(part == "__pycache__" or part.startswith(".") for part in path.parts) or path.suffix == ".pyc"


def _files_under(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.rglob("*") if p.is_file() and not _hidden_or_cache(p.relative_to(directory)))


def frozen_files(root: Path, config: SessionConfig, paths: SessionPaths) -> dict[str, Path]:
    """Every file the manifest pins, by the name a mismatch reports: a path relative to the
    repository for files in it (the session's own files too: a repository copied with its state
    still verifies), an absolute path for the rest."""
    files: dict[str, Path] = {}
    for name in MANIFEST_DIRS:
        for path in _files_under(root / name):
            files[path.relative_to(root).as_posix()] = path
    for name in MANIFEST_FILES:
        files[name] = root / name
    for path in (paths.config, paths.run_config):
        files[path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)] = path
    for path in _files_under(Path(config.run.tokenizer_dir)):  # tokenizer + token byte table
        files[str(path)] = path
    if config.eval_set:
        try:
            eval_set = EvalSet.load(Path(config.eval_set))
        except (FileNotFoundError, ValueError):  # gone or damaged: the description itself is the mismatch
            path = Path(config.eval_set) / EVAL_SET_FILE
            files[str(path)] = path
        else:
            for path in eval_set.files():
                files[str(path)] = path
            if eval_set.source.get("val_file"):  # the validation text the rows were made from
                path = Path(eval_set.source["val_file"])
                files[str(path)] = path
    return files


def is_frozen_code(name: str) -> bool:
    """Whether a manifest entry (a path relative to the repository) is code that judges scores."""
    return any(name == entry or name.startswith(entry + "/") for entry in FROZEN_CODE)


def build_manifest(root: Path, config: SessionConfig, paths: SessionPaths) -> dict[str, str | None]:
    """The hash of every frozen file (None: the file does not exist)."""
    return {name: sha256_file(path) if path.is_file() else None
            for name, path in frozen_files(root, config, paths).items()}


def save_manifest(manifest: dict[str, str | None], paths: SessionPaths) -> None:
    atomic_write_text(paths.manifest, json.dumps(manifest, indent=1, sort_keys=True))


def load_manifest(paths: SessionPaths) -> dict[str, str | None]:
    if not paths.manifest.is_file():
        raise FileNotFoundError(f"the session's manifest is missing ({paths.manifest})")
    return json.loads(paths.manifest.read_text(encoding="utf-8"))


def _in_tree(root: Path, name: str) -> bool:
    """Whether git can restore a manifest entry: relative, and not in the state folder."""
    if os.path.isabs(name):
        return False
    state = state_dir(root)
    return not (root / name).is_relative_to(state)


@dataclass(frozen=True)
class Mismatch:
    """A frozen file that is not what it was when the session started."""

    path: str  # relative to the repository, or absolute for files outside it
    problem: str  # "changed", "missing" or "added"
    in_tree: bool  # inside the repository (git can restore it)

    def __str__(self) -> str:
        return f"{self.path} ({self.problem})"


def verify_manifest(root: Path, config: SessionConfig, paths: SessionPaths) -> list[Mismatch]:
    """Every frozen file whose hash differs from the session's manifest, sorted by path; an
    empty list means the evaluator is exactly the one the session started with."""
    saved = load_manifest(paths)
    current = build_manifest(root, config, paths)
    mismatches = []
    for name in sorted(set(saved) | set(current)):
        before, after = saved.get(name), current.get(name)
        if before == after:
            continue
        problem = "added" if before is None else "missing" if after is None else "changed"
        mismatches.append(Mismatch(name, problem, _in_tree(root, name)))
    return mismatches
