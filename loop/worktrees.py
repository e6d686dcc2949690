"""One git worktree per worker: where a parallel loop's candidates are proposed, committed and run.

The worktrees live in the session's folder (`sessions/TAG/worktrees/w1`, ...), outside the working
tree an agent edits, and share the repository's objects: a commit made in one is visible to the
head at once. Each stays on a detached HEAD; only the head moves the session branch (in the main
working tree). Git's own bookkeeping (`git worktree list`) names them, so a head that died leaves
nothing `remove_all` cannot find again.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from loop.git import GitFailure

WORKTREES_DIR = "worktrees"


def _git(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["git", "-c", "commit.gpgsign=false", *args], cwd=cwd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        message = " ".join((proc.stderr or proc.stdout).split())[:300]
        raise GitFailure(f"git {' '.join(args[:2])} failed in {cwd}: {message}")
    return proc


class Worktrees:
    """The worktrees of one session: `root` is the main working tree, `folder` holds the others."""

    def __init__(self, root: Path, folder: Path):
        self.root = root
        self.folder = folder
        self.identity = _identity(root)  # shared by the worktrees: the repository's configuration

    def path(self, slot: str) -> Path:
        return self.folder / slot

    def add(self, slot: str, commit: str) -> Path:
        """A fresh worktree for `slot`, detached at `commit` (an old one of that name is replaced)."""
        path = self.path(slot)
        if path.exists() or slot in self.listed():
            self.remove(slot)
        self.folder.mkdir(parents=True, exist_ok=True)
        _git(self.root, "worktree", "add", "--detach", "-f", str(path), commit)
        return path

    def listed(self) -> dict[str, Path]:
        """The worktrees git knows in our folder, by slot name."""
        out = _git(self.root, "worktree", "list", "--porcelain").stdout
        found = {}
        for line in out.splitlines():
            if line.startswith("worktree "):
                path = Path(line.removeprefix("worktree "))
                if path.parent == self.folder:
                    found[path.name] = path
        return found

    def remove(self, slot: str) -> None:
        path = self.path(slot)
        _git(self.root, "worktree", "remove", "--force", "--force", str(path), check=False)
        shutil.rmtree(path, ignore_errors=True)
        _git(self.root, "worktree", "prune", check=False)

    def remove_all(self) -> None:
        """Every worktree of this session, the folder with them, and git's records of them."""
        for slot in self.listed():
            self.remove(slot)
        shutil.rmtree(self.folder, ignore_errors=True)
        _git(self.root, "worktree", "prune", check=False)

    # -- what the head does in a worktree (the fewest git processes: the head does it per experiment) --
    @staticmethod
    def reset(path: Path, commit: str) -> None:
        """The worktree exactly at `commit`, detached: tracked files and the index as the commit
        has them (local changes thrown away), untracked files removed, ignored ones kept."""
        _git(path, "checkout", "-q", "--detach", "-f", commit)
        _git(path, "clean", "-q", "-f", "-d")

    @staticmethod
    def head(path: Path) -> str:
        """The commit checked out, read from the worktree's own HEAD file (a detached HEAD holds the
        sha); git is asked only when it names a branch (an agent checked one out)."""
        try:
            gitdir = Path((path / ".git").read_text(encoding="utf-8").split("gitdir:", 1)[1].strip())
            text = (gitdir if gitdir.is_absolute() else path / gitdir).joinpath("HEAD").read_text().strip()
            if len(text) == 40 and all(c in "0123456789abcdef" for c in text):
                return text
        except (OSError, IndexError):
            pass
        return _git(path, "rev-parse", "HEAD").stdout.strip()

    @staticmethod
    def changes_since(path: Path, commit: str) -> list[str]:
        """Paths where the worktree differs from `commit` (committed or not, untracked included)."""
        if Worktrees.head(path) == commit:  # one `git status` tells both
            out = _git(path, "status", "--porcelain=v1", "-z", "--untracked-files=all", "--no-renames").stdout
            return sorted({entry[3:] for entry in out.split("\0") if len(entry) > 3})
        changed = _git(path, "diff", "--name-only", "--no-renames", "-z", commit).stdout.split("\0")
        untracked = _git(path, "ls-files", "--others", "--exclude-standard", "-z").stdout.split("\0")
        return sorted({p for p in changed + untracked if p})

    def commit_file(self, path: Path, base: str, file: str, message: str) -> str:
        """Commit `file` as it is in the worktree on top of `base` (an agent's own commits squashed)."""
        if Worktrees.head(path) != base:
            _git(path, "reset", "-q", "--soft", base)
            _git(path, "add", "-A", "--", file)
        _git(path, *self.identity, "commit", "--no-verify", "--allow-empty", "-q", "-m", message, "--", file)
        return Worktrees.head(path)

    def cherry_pick(self, path: Path, onto: str, commit: str) -> str | None:
        """Re-apply `commit`'s change on top of `onto` in the worktree; the new commit, or None when
        it no longer applies (a conflict: the worktree is put back on `onto`)."""
        Worktrees.reset(path, onto)
        picked = _git(path, *self.identity, "cherry-pick", "--allow-empty", "--keep-redundant-commits", commit, check=False)
        if picked.returncode != 0:
            _git(path, "cherry-pick", "--abort", check=False)
            Worktrees.reset(path, onto)
            return None
        return Worktrees.head(path)


def _identity(path: Path) -> list[str]:
    """`-c` options naming a committer where the repository has none (as `loop.git` does)."""
    options = []
    for key, default in (("user.name", "autoresearch"), ("user.email", "autoresearch@localhost")):
        if not _git(path, "config", key, check=False).stdout.strip():
            options += ["-c", f"{key}={default}"]
    return options
