"""Where things live: the data cache, the project root and the per-repository state folder."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("cuda", "rocm", "mps", "mlx")


def cache_dir() -> Path:
    """Root of downloaded data, tokenizers and token files (`AUTORESEARCH_CACHE` overrides)."""
    env = os.environ.get("AUTORESEARCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "autoresearch"


class RepositoryNotFound(Exception):
    """The working directory is not inside a project checkout; `hint` says where to go."""

    def __init__(self, message: str, hint: str):
        super().__init__(message)
        self.hint = hint


def _is_project(folder: Path) -> bool:
    return (folder / "harness").is_dir() and (folder / "backends").is_dir()


def repo_root(start: Path | None = None) -> Path:
    """The repository the user works in: `AUTORESEARCH_ROOT`, else the nearest parent of the
    current directory holding `backends/` and `harness/`. Never a fallback: outside a checkout,
    silently working on the installed package's own checkout would edit the wrong trainer."""
    env = os.environ.get("AUTORESEARCH_ROOT")
    if env:
        return Path(env).expanduser().resolve()
    here = (start or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if _is_project(candidate):
            return candidate
    installed = (f"`cd {PROJECT_ROOT}` (the checkout this autoresearch is installed from)"
                 if _is_project(PROJECT_ROOT) else "cd into your clone of the project")
    raise RepositoryNotFound(f"{here} is not inside an autoresearch repository (no folder up from it "
                             "holds harness/ and backends/)",
                             f"{installed}, or set AUTORESEARCH_ROOT to the repository to work on")


def state_dir(root: Path) -> Path:
    """Per-repository state (setup config, sessions, locks). Inside `.git/` when the root is a
    git repository, so that it sits outside the working tree an agent edits."""
    git = root / ".git"
    return git / "autoresearch" if git.is_dir() else root / ".autoresearch"


def trainer_path(root: Path, backend: str) -> Path:
    return root / "backends" / backend / "train.py"
