"""The errors of the ratchet: each says what is wrong and, in `hint`, what the user can do."""

from __future__ import annotations

from harness.scoring.runner import RunOutcome
from loop.session import Mismatch


class SessionError(Exception):
    """Something the user must fix; `hint` says how."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class FrozenEvaluatorError(SessionError):
    """A frozen file changed: the session stops until it is restored."""

    exit_code = 3  # not 2, typer's usage error: a script must tell a stopped session from a typo

    def __init__(self, mismatches: list[Mismatch], best_commit: str, when: str = "before this experiment"):
        names = ", ".join(str(m) for m in mismatches)
        in_tree = [m.path for m in mismatches if m.in_tree]
        hint = "Nothing was run or recorded. " if when == "before this experiment" else ""
        if in_tree:
            hint += (f"Restore the file(s) with `git checkout {best_commit[:7]} -- {' '.join(in_tree)}`, then "
                     "`autoresearch try` again (or `autoresearch session resume` to continue a loop). ")
        if len(in_tree) < len(mismatches):
            hint += "Files outside the repository cannot be restored by git: re-run `autoresearch setup` and start a new session. "
        hint += "Changing the evaluator means a new session (a new comparison track)."
        super().__init__(f"the frozen evaluator changed {when}: {names}", hint.strip())
        self.mismatches = mismatches


class BaselineFailed(SessionError):
    """The unchanged trainer did not run; `log_tail` keeps the end of its log (a failed start
    removes the session's files, logs included)."""

    def __init__(self, outcome: RunOutcome):
        super().__init__(f"a baseline run failed ({outcome.status}): {outcome.reason}",
                         "the unchanged trainer must run before a session can measure anything: fix it, commit, "
                         "and start again (`autoresearch run` runs it alone)")
        self.log_tail = outcome.log_tail(20)


class SessionTampered(SessionError):
    """The session's own state (its ledger, configuration or manifest) was changed outside the
    ratchet: the session stops, as for a changed evaluator."""

    exit_code = FrozenEvaluatorError.exit_code
