"""Helpers for tests that run sessions in real temporary git repositories through the real CLI
(test_ratchet.py, test_crash_safety.py, test_session.py).

Most experiments are run by FAKE_TRAINER, a tiny trainer that honours the whole harness contract
(context, training batches, budget clock, `ctx.finish` with a forward function that the harness
evaluates and checks for causality) with a unigram model in numpy, so a run takes a second or two
instead of the reference trainer's tens of seconds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import PROJECT, copy_project, make_tiny_setup
from loop.session import SessionPaths
from harness.trainer_constants import write_constants
from loop.lock import LOCK_TOKEN_ENV
from loop.results import read_rows

TAG = "t"

# A unigram model (counts, no gradient) exported through torch, trained on the same batches every
# run (so identical trainers score identically). LOGIT_SCALE < 1 flattens its distribution, so
# setting it to 1.0 is a large, certain gain.
FAKE_TRAINER = '''\
"""A tiny trainer on the harness contract: a smoothed unigram model, counted, exported through torch."""
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from harness.scoring.context import load_context  # noqa: E402

# ---------------------------------------------------------------------------
# Hyperparameters (edit these directly)
# ---------------------------------------------------------------------------
LOGIT_SCALE = 0.5  # 1.0 is the model's own distribution
SMOOTHING = 1.0  # added to every count
DEVICE_BATCH_SIZE = 4  # rows per step
TRAIN_STEPS = 40  # counted batches (milliseconds of work); the rest of the budget idles
SEED = 42  # this model has no randomness; a seed change is a no-op


def main() -> None:
    ctx = load_context()
    counts = np.full(ctx.vocab_size, SMOOTHING, dtype=np.float64)
    batches = ctx.train_batches(DEVICE_BATCH_SIZE)
    budget = ctx.budget
    budget.untimed_steps = 1
    while not budget.done:
        budget.start_step()
        loss = None
        if budget.step < TRAIN_STEPS:  # the same data every run, whatever the machine's speed
            x, y = next(batches)
            loss = float(-np.log(counts[y] / counts.sum()).mean())
            np.add.at(counts, y.ravel(), 1)
        else:
            time.sleep(0.05)
        budget.end_step(DEVICE_BATCH_SIZE * ctx.MAX_SEQ_LEN, loss=loss, lrm=1.0)
    logp = torch.tensor(LOGIT_SCALE * np.log(counts / counts.sum()), dtype=torch.float32)

    def forward(inputs):
        return logp.expand(*inputs.shape, logp.numel()).clone()

    ctx.finish(forward, framework="torch", num_params=logp.numel(), flops_per_token=1.0, depth=1,
               device_name="cpu", peak_memory_mb=1.0)


if __name__ == "__main__":
    main()
'''

TRAINER = "backends/cuda/train.py"


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout.strip()


def started_session(dest: Path, *options: str, trainer_source: str | None = FAKE_TRAINER, **overrides: str) -> Path:
    """`make_repo` with session TAG started (`options` go to `session start`), as a fixture's template."""
    root = make_repo(dest, trainer_source=trainer_source, **overrides)
    result = cli(root, "session", "start", TAG, *options)
    assert result.returncode == 0, result.stderr
    return root


def make_repo(dest: Path, trainer_source: str | None = FAKE_TRAINER, constants: dict | None = None,
              **overrides: str) -> Path:
    """A set-up project copy committed in a fresh git repository (as a user's clone would be):
    the fake trainer, or the reference one (`trainer_source=None`) with `constants` rewritten."""
    root = copy_project(dest)
    shutil.copy(PROJECT / ".gitignore", root / ".gitignore")
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.email", "test@example.com")
    git(root, "config", "user.name", "test")
    make_tiny_setup(root, "cuda", **overrides)
    if trainer_source is not None:
        (root / TRAINER).write_text(trainer_source)
    if constants:
        write_constants(root / TRAINER, constants)
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "start")
    return root


def clone_dir(src: Path, dest: Path) -> Path:
    """A byte copy of a repository with its state folder (setup config), cheaper than a setup."""
    shutil.copytree(src, dest, symlinks=True)
    return dest


def cli_env(root: Path, **env: str) -> dict[str, str]:
    full_env = dict(os.environ, AUTORESEARCH_ROOT=str(root), AUTORESEARCH_DEVICE="cpu", COLUMNS="200", **env)
    full_env.pop(LOCK_TOKEN_ENV, None)
    return full_env


def cli(root: Path, *args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """`python -m autoresearch ARGS` in `root`. A session started here never voids a run for the
    machine's speed unless the test asks (`--max-drift`): on a shared test machine other jobs' load
    would decide verdicts. tests/test_noise.py is where voiding is tested."""
    args = tuple(args)
    if args[:2] == ("session", "start") and "--max-drift" not in args and "-h" not in args:
        args = (*args, "--max-drift", "0")
    return subprocess.run([sys.executable, "-m", "autoresearch", *args], cwd=root, env=cli_env(root, **env),
                          capture_output=True, text=True, timeout=timeout)


def session_paths(root: Path, tag: str = TAG) -> SessionPaths:
    return SessionPaths(root / ".git" / "autoresearch" / "sessions" / tag)


def ledger(root: Path, tag: str = TAG, rechecks: bool = False):
    """The session's rows; without `recheck` rows (runs of the incumbent the noise rule adds as it
    needs them) unless asked: the experiments, one row each."""
    rows = read_rows(session_paths(root, tag).ledger)
    return rows if rechecks else [r for r in rows if r.status != "recheck"]


def edit(root: Path, old: str, new: str, path: str = TRAINER) -> None:
    file = root / path
    text = file.read_text()
    assert old in text, f"{old!r} not in {path}"
    file.write_text(text.replace(old, new, 1))


def set_constant(root: Path, name: str, value) -> None:
    """Edit one hyperparameter of the trainer, whatever its current value (as an agent would)."""
    write_constants(root / TRAINER, {name: value})


def best_commit(root: Path) -> str:
    return git(root, "rev-parse", "HEAD")


def assert_clean_on_branch(root: Path, tag: str = TAG) -> None:
    assert git(root, "rev-parse", "--abbrev-ref", "HEAD") == f"autoresearch/{tag}"
    assert git(root, "status", "--porcelain") == ""
