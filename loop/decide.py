"""Keep or revert: the verdict on one candidate, as a pure function of its scores.

Two rules:

- `noise` (the default): keep a candidate only when its gain over the best beats the noise floor,
  `max(z * sigma, min_floor)`, where sigma is the run-to-run spread the session measured on the
  unchanged trainer. A single run landing within one sigma of that line (on either side) is too
  close to call: the caller runs the candidate once more and asks again with both scores, and the
  verdict is taken on their mean (no third run).
- `strict`: upstream's ratchet: keep when one run is strictly lower than the best.

"best" is the score of the incumbent: the mean of its runs (the baseline's k repeats, or a kept
candidate's one or two runs). A candidate run that produced no score (`None`) is a crash.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

RULES = ("noise", "strict")
DEFAULT_Z = 2.0
# The floor never drops below this, even when the measured spread is zero (a deterministic
# backend): upstream PR #560 puts the structural floor of the fixed eval at a few 1e-4.
DEFAULT_MIN_FLOOR = 3e-4


@dataclass(frozen=True)
class Decision:
    verdict: str  # "keep", "discard" or "crash"; meaningless while rerun_needed
    rerun_needed: bool
    reason: str
    val_bpb: float | None  # the score the verdict was taken on (the mean of the runs)
    gain: float | None  # best - val_bpb: positive is an improvement
    floor: float  # the gain a candidate had to beat


def noise_floor(sigma: float, z: float, min_floor: float) -> float:
    """The gain a change must beat under the noise rule."""
    return max(z * max(sigma, 0.0), min_floor)


def decide(
    candidate: Sequence[float | None],
    best: Sequence[float],
    sigma: float,
    rule: str = "noise",
    z: float = DEFAULT_Z,
    min_floor: float = DEFAULT_MIN_FLOOR,
) -> Decision:
    """The verdict on a candidate given its runs so far (one, or two after a re-run)."""
    if rule not in RULES:
        raise ValueError(f"unknown keep rule {rule!r}: use one of {', '.join(RULES)}")
    if not best:
        raise ValueError("no best score to compare with: the session has no baseline yet")
    floor = noise_floor(sigma, z, min_floor) if rule == "noise" else 0.0
    if not candidate or any(v is None or not math.isfinite(v) for v in candidate):
        return Decision("crash", False, "the run produced no score", None, None, floor)
    score = statistics.fmean(candidate)  # type: ignore[arg-type]
    incumbent = statistics.fmean(best)
    gain = incumbent - score
    runs = _runs_text(candidate)

    if rule == "strict":
        if gain > 0:
            return Decision("keep", False, f"{runs} is lower than the best {incumbent:.6f}", score, gain, floor)
        return Decision("discard", False, f"{runs} is not lower than the best {incumbent:.6f}", score, gain, floor)

    line = f"the noise floor {floor:.6f} ({z:g} sigma, sigma {sigma:.6f})" if z * sigma >= min_floor \
        else f"the minimum floor {floor:.6f} (sigma {sigma:.6f})"
    if len(candidate) == 1 and sigma > 0 and abs(gain - floor) < sigma:
        return Decision("discard", True, f"gain {gain:+.6f} is within one sigma of {line}: re-running",
                        score, gain, floor)
    if gain > floor:
        return Decision("keep", False, f"gain {gain:+.6f} ({runs}) beats {line}", score, gain, floor)
    return Decision("discard", False, f"gain {gain:+.6f} ({runs}) does not beat {line}", score, gain, floor)


def _runs_text(values: Sequence[float | None]) -> str:
    if len(values) == 1:
        return f"{values[0]:.6f}"
    return "mean of " + ", ".join(f"{v:.6f}" for v in values)  # type: ignore[str-format]
