"""Shared fixtures: an isolated cache, and a real `setup` of the cpu-tiny preset on the builtin
corpus in a throw-away copy of the project (so tests never edit this checkout's trainers)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parent.parent
COPIED = ("autoresearch", "harness", "loop", "backends", "presets", "program.md", "pyproject.toml")
# Small enough that a trainer run takes seconds on 2 cores, large enough to learn something.
TINY_OVERRIDES = {"TIME_BUDGET": "4", "EVAL_TOKENS": "8192", "BASELINE_REPEATS": "2"}


@dataclass(frozen=True)
class TinySetup:
    root: Path
    config_path: Path
    backend: str

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"AUTORESEARCH_CONFIG": str(self.config_path), "AUTORESEARCH_DEVICE": "cpu",
                    "AUTORESEARCH_ROOT": str(self.root), "PYTHONPATH": str(self.root)})
        env.update(extra)
        return env

    def run_trainer(self, timeout: float = 300, **extra_env: str) -> subprocess.CompletedProcess:
        script = self.root / "backends" / self.backend / "train.py"
        return subprocess.run([sys.executable, str(script)], cwd=self.root, env=self.env(**extra_env),
                              capture_output=True, text=True, timeout=timeout)


def copy_project(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        src = PROJECT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture(scope="session")
def test_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the whole run: the builtin corpus and tokenizer are built once."""
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("AUTORESEARCH_CACHE")
    os.environ["AUTORESEARCH_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("AUTORESEARCH_CACHE", None)
    else:
        os.environ["AUTORESEARCH_CACHE"] = old


def make_tiny_setup(root: Path, backend: str = "cuda", **overrides: str) -> TinySetup:
    from harness.config import default_config_path
    from harness.prepare import SetupRequest, run_setup

    run_setup(SetupRequest(root=root, backend=backend, preset="cpu-tiny",
                           overrides={**TINY_OVERRIDES, **overrides}), log=lambda _: None)
    return TinySetup(root=root, config_path=default_config_path(root), backend=backend)


@pytest.fixture(scope="session")
def tiny_setup(test_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> TinySetup:
    """A project copy set up for the cuda reference trainer on device cpu (cpu-tiny, builtin)."""
    root = copy_project(tmp_path_factory.mktemp("project"))
    return make_tiny_setup(root, "cuda")


@pytest.fixture(scope="session")
def tiny_setup_factory(test_cache: Path, tmp_path_factory: pytest.TempPathFactory):
    """Set up a fresh project copy for any backend: `tiny_setup_factory("mlx")`."""
    def factory(backend: str = "cuda", **overrides: str) -> TinySetup:
        root = copy_project(tmp_path_factory.mktemp(f"project-{backend}"))
        return make_tiny_setup(root, backend, **overrides)
    return factory
