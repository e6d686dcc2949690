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


def repo_root(start: Path | None = None) -> Path:
    """The repository the user works in: `AUTORESEARCH_ROOT`, else the nearest parent of the
    current directory holding `backends/` and `harness/`, else this project's own checkout."""
    env = os.environ.get("AUTORESEARCH_ROOT")
    if env:
        return Path(env).resolve()
    here = (start or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / "harness").is_dir() and (candidate / "backends").is_dir():
            return candidate
    return PROJECT_ROOT


def state_dir(root: Path) -> Path:
    """Per-repository state (setup config, sessions, locks). Inside `.git/` when the root is a
    git repository, so that it sits outside the working tree an agent edits."""
    git = root / ".git"
    return git / "autoresearch" if git.is_dir() else root / ".autoresearch"


def trainer_path(root: Path, backend: str) -> Path:
    return root / "backends" / backend / "train.py"
