"""Validation against the holdout, for the baseline and the best: does the session's gain hold on
data nobody tuned against?

The holdout is scored for every experiment and never shown to the agent. A real improvement moves
both scores; a session whose best beat the baseline on validation by more than the noise floor
while the holdout kept less than half of that gain (and lost more than the floor of it) is flagged:
the search may have overfit the validation rows, or leaked them.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

from loop.results import ResultRow


@dataclass(frozen=True)
class HoldoutCheck:
    baseline_val: float
    baseline_holdout: float
    best_val: float
    best_holdout: float
    floor: float  # the noise floor the session keeps changes above

    @property
    def val_gain(self) -> float:
        return self.baseline_val - self.best_val

    @property
    def holdout_gain(self) -> float:
        return self.baseline_holdout - self.best_holdout

    @property
    def suspicious(self) -> bool:
        lost = self.val_gain - self.holdout_gain
        return self.val_gain > self.floor and lost > max(self.floor, self.val_gain / 2)

    @property
    def verdict(self) -> str:
        if self.suspicious:
            return "the validation gain does not hold on the holdout: the changes may fit the validation set"
        if self.val_gain <= self.floor:
            return "no validation gain above the noise floor to check"
        return "the validation gain holds on the holdout"

    def describe(self) -> str:
        return (f"validation {self.baseline_val:.6f} -> {self.best_val:.6f} ({-self.val_gain:+.6f}), "
                f"holdout {self.baseline_holdout:.6f} -> {self.best_holdout:.6f} ({-self.holdout_gain:+.6f}): "
                f"{self.verdict}")

    def to_dict(self) -> dict:
        return {**asdict(self), "val_gain": self.val_gain, "holdout_gain": self.holdout_gain,
                "suspicious": self.suspicious, "verdict": self.verdict}


def check_floor(sigma: float | None) -> float:
    """The gain a validation improvement must exceed to be checked: twice the noise, at least 3e-4."""
    return max(2 * (sigma or 0.0), 3e-4)


def holdout_check(rows: list[ResultRow], floor: float) -> HoldoutCheck | None:
    """The check for a ledger's rows, or None when the baseline or the best has no holdout score."""
    baseline = [r for r in rows if r.status == "baseline" and r.scored and r.holdout_bpb]
    if not baseline:
        return None
    kept = [r for r in rows if r.status == "keep" and r.scored]
    best = kept[-1:] or baseline
    if not all(r.holdout_bpb for r in best):
        return None
    return HoldoutCheck(
        baseline_val=statistics.fmean(r.val_bpb for r in baseline),
        baseline_holdout=statistics.fmean(r.holdout_bpb for r in baseline),
        best_val=statistics.fmean(r.val_bpb for r in best),
        best_holdout=statistics.fmean(r.holdout_bpb for r in best),
        floor=floor,
    )
