"""Shared by the benches: a fresh project copy (this tree or a commit), set up and committed, in a
temporary folder, driven through the real CLI."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
TREE = ("autoresearch", "harness", "loop", "backends", "presets", "program.md", "pyproject.toml", ".gitignore")
GIT = ["git", "-c", "user.email=bench@example.com", "-c", "user.name=bench"]


def copy_tree(dest: Path, commit: str | None = None) -> Path:
    """The project's files at `commit` (default: this working tree) in `dest`."""
    dest.mkdir(parents=True)
    if commit:
        archive = subprocess.run(["git", "-C", str(PROJECT), "archive", commit, *TREE], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    else:
        for name in TREE:
            src = PROJECT / name
            if src.is_dir():
                shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
            elif src.exists():
                shutil.copy2(src, dest / name)
    return dest


def sh(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed in {cwd}:\n{done.stderr[-3000:]}")
    return done


def set_up(root: Path, env: dict[str, str], *settings: str) -> None:
    """`git init`, `autoresearch setup --preset cpu-tiny --data builtin --set ...`, commit."""
    cli = [sys.executable, "-m", "autoresearch"]
    sh([*GIT, "init", "-q", "-b", "main"], root, env)
    sh([*cli, "setup", "--preset", "cpu-tiny", "--data", "builtin", *(a for s in settings for a in ("--set", s))],
       root, env)
    sh([*GIT, "add", "-A"], root, env)
    sh([*GIT, "commit", "-q", "-m", "setup"], root, env)
