"""Git for the ratchet: the session branch, candidate commits, and putting the tree back exactly on a commit."""

from __future__ import annotations

import os
from pathlib import Path

from loop.errors import SessionError


class GitFailure(SessionError):
    """A git command the ratchet needs failed; the message is git's own."""


class Git:
    """The few git operations the ratchet needs (GitPython), with errors that say what to do."""

    def __init__(self, root: Path):
        import git

        self._git = git
        try:
            self.repo = git.Repo(root)
        except (git.InvalidGitRepositoryError, git.NoSuchPathError):
            raise SessionError(f"{root} is not a git repository",
                               "a session lives on a git branch: `git init && git add -A && git commit -m start`") from None
        self.root = Path(self.repo.working_tree_dir or root)

    def _run(self, *args: str, **kwargs) -> str:
        return getattr(self.repo.git, args[0])(*args[1:], **kwargs)

    def head(self) -> str | None:
        try:
            return self.repo.head.commit.hexsha
        except ValueError:
            return None

    def branch(self) -> str | None:
        return None if self.repo.head.is_detached else self.repo.active_branch.name

    def branch_exists(self, name: str) -> bool:
        return name in {h.name for h in self.repo.heads}

    def valid_branch_name(self, name: str) -> bool:
        try:
            self._run("check_ref_format", "--branch", name)
            return True
        except self._git.GitCommandError:
            return False

    def dirty(self) -> list[str]:
        """Every path that differs from HEAD, untracked (not ignored) files included."""
        changed = _split(self._run("diff", "--name-only", "--no-renames", "-z", "HEAD"))
        return sorted(set(changed) | set(self.untracked()))

    def tracked(self, path: str) -> bool:
        return bool(self._run("ls_files", "--", path).strip())

    def untracked(self) -> list[str]:
        return _split(self._run("ls_files", "--others", "--exclude-standard", "-z"))

    def changes_since(self, commit: str) -> list[str]:
        """Paths where the working tree differs from `commit` (committed, staged or not, untracked)."""
        changed = _split(self._run("diff", "--name-only", "--no-renames", "-z", commit))
        return sorted(set(changed) | set(self.untracked()))

    def create_branch(self, name: str) -> None:
        self._run("checkout", "-b", name)

    def ensure_ignored(self, name: str) -> None:
        """Make git ignore `name` in this clone (through .git/info/exclude) if nothing does yet."""
        try:
            self._run("check_ignore", "-q", name)
            return
        except self._git.GitCommandError:
            pass
        exclude = Path(self.repo.git_dir) / "info" / "exclude"
        exclude.parent.mkdir(parents=True, exist_ok=True)
        text = exclude.read_text() if exclude.exists() else ""
        exclude.write_text(text + ("" if text.endswith("\n") or not text else "\n") + f"/{name}\n")

    def commit_file(self, base: str, path: str, message: str) -> str:
        """Commit `path` as it is in the working tree on top of `base` (the agent's own commits
        since `base` are squashed into this one); returns the new commit's sha. Raises GitFailure
        with git's message."""
        try:
            if self.head() != base:
                self._run("reset", "--soft", base)
            self._run("add", "-A", "--", path)
            with self.repo.git.custom_environment(**self._identity()):
                self.repo.git(c="commit.gpgsign=false").commit("--no-verify", "--allow-empty", "-q",
                                                               "-m", message, "--", path)
        except self._git.GitCommandError as exc:
            raise GitFailure(_git_message(exc)) from None
        return self.head() or ""

    def _identity(self) -> dict[str, str]:
        env: dict[str, str] = {}
        reader = self.repo.config_reader()
        for key, default in (("name", "autoresearch"), ("email", "autoresearch@localhost")):
            try:
                reader.get_value("user", key)
            except Exception:  # configparser errors: no such section / option
                if f"GIT_AUTHOR_{key.upper()}" not in os.environ:
                    env[f"GIT_AUTHOR_{key.upper()}"] = default
                    env[f"GIT_COMMITTER_{key.upper()}"] = default
        return env

    def restore(self, branch: str, commit: str) -> None:
        """Put the session branch and the whole working tree exactly on `commit` (ignored files
        aside): back on the branch if HEAD left it, hard reset, untracked files removed. A stale
        `index.lock` (a git killed mid-way; the caller holds the session lock) is removed first
        when git refuses because of it."""
        for attempt in range(2):
            try:
                if self.branch() != branch:
                    self._run("checkout", "-f", branch)
                self._run("reset", "-q", "--hard", commit)
                self._run("clean", "-q", "-f", "-d")
                return
            except self._git.GitCommandError as exc:
                if attempt == 0 and self.remove_stale_index_lock():
                    continue
                raise GitFailure(f"could not put the tree back on {commit[:7]}: {_git_message(exc)}",
                                 "fix the repository by hand (`git status`), then `autoresearch session resume`") from None

    def checkout_file(self, commit: str, path: str) -> None:
        """Put `path` in the working tree as it is in `commit` (index and HEAD untouched)."""
        try:
            data = self.repo.git.show(f"{commit}:{path}", stdout_as_string=False, strip_newline_in_stdout=False)
        except self._git.GitCommandError as exc:
            raise GitFailure(_git_message(exc)) from None
        (self.root / path).write_bytes(data)

    def resolve(self, rev: str) -> str:
        try:
            return self._run("rev_parse", "--verify", "-q", f"{rev}^{{commit}}")
        except self._git.GitCommandError:
            raise SessionError(f"commit {rev} is not in this repository",
                               "the session's history was rewritten; start a new session") from None

    def is_ancestor(self, ancestor: str, descendant: str) -> bool:
        try:
            self._run("merge_base", "--is-ancestor", ancestor, descendant)
            return True
        except self._git.GitCommandError:
            return False

    def message(self, commit: str) -> str:
        return self.repo.commit(commit).message.strip()

    def parents(self, commit: str) -> list[str]:
        return [p.hexsha for p in self.repo.commit(commit).parents]

    def remove_stale_index_lock(self) -> bool:
        """A git command killed mid-way leaves `index.lock`; only called while we hold the
        session lock after our own process died, so it is ours."""
        lock = Path(self.repo.git_dir) / "index.lock"
        if lock.exists():
            lock.unlink(missing_ok=True)
            return True
        return False

    def delete_branch(self, name: str) -> None:
        self._run("branch", "-D", name)

    def checkout(self, ref: str) -> None:
        self._run("checkout", "-q", "-f", ref)


def _git_message(exc: Exception) -> str:
    stderr = getattr(exc, "stderr", "") or str(exc)
    lines = [line.strip() for line in str(stderr).strip().strip("'").splitlines() if line.strip()]
    return " ".join(lines)[:300] or str(exc)[:300]


def _split(output: str) -> list[str]:
    return [p for p in output.split("\0") if p]
