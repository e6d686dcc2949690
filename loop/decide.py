"""Keep or revert: the verdict on one candidate, as a pure function of its runs.

Two rules:

- `noise` (the default), through `decide_candidate`:
  - **An honest sigma.** The run-to-run spread is pooled over every repeated measurement the
    session made (`pooled_noise`): the baseline repeats, the re-runs of candidates, the re-checks
    of the incumbent. Pooled variance = sum of within-group squared deviations / sum of (n_i - 1);
    the sum of (n_i - 1) is the estimate's degrees of freedom, and both go into the ledger.
  - **Paired, drift-aware.** Before each run the runner reads the machine's speed
    (`harness.scoring.speed`). A candidate is compared with the incumbent's latest runs measured
    at a similar speed (`incumbent_window`; the incumbent is re-run at intervals, and whenever the
    window is too small). A candidate run whose speed moved more than `max_drift_percent` from
    the incumbent's reference speed (the median over that window) is `void`: neither kept nor
    discarded; the caller drops it and runs the candidate again later.
  - **Confirmation.** One run is a screen: a gain below `screen_z` standard errors is discarded at
    once (a clear loser costs one run); above it the candidate is an apparent keep, and a second
    run decides. The verdict on both runs is a one-sided Student t test of the mean gain against
    the mean of the incumbent's recent runs, with the pooled sigma and its degrees of freedom:
    keep when `gain > max(t(1 - alpha, dof) * sigma * sqrt(1/n_candidate + 1/n_incumbent), min_floor)`.
    Why this test: every run of every trainer in a session has the same noise (same machine, same
    evaluator), so one variance pooled over the whole session estimates it far better than each
    side's own handful of runs (Welch's test would rest on the candidate's 1 degree of freedom);
    t rather than normal quantiles charge for a sigma still estimated from few runs. `alpha` is the
    normal tail of `z` (z = 2: alpha = 2.3 %), so `--z` keeps its meaning of "sigmas" as dof grow.
    A null change is kept only if its two-run mean passes the test, so the false-keep rate is at
    most alpha while sigma is honest. Simulated with Gaussian noise, 5 incumbent runs, 20 dof:
    false keeps 1.5 % at 1.15 runs per null change; a 3-sigma gain kept 91 % of the time.
  - With no degrees of freedom yet (one baseline run), only `min_floor` guards a keep.
- `strict`: upstream's ratchet: keep when one run is strictly lower than the best. It ignores the
  speed probe and never asks for confirmation, for comparability with upstream.

`decide()` and `noise_floor()` are the earlier interface (one sigma from the baseline, a flat
`z * sigma` floor, a re-run only for a close call), kept unchanged for `loop.ratchet` until it
moves to `decide_candidate`.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Iterable, Sequence

RULES = ("noise", "strict")
DEFAULT_Z = 2.0
DEFAULT_SCREEN_Z = 1.0
# Quiet readings of harness.scoring.speed on a 2-core CPU spread about +-10 %; another job's load
# cut them 10-100x. Measured over 32 runs there: every loaded run was void at any limit up to 75 %;
# quiet runs voided (load arriving just before or after them): 7 of 12 at 10 %, 5 at 25 %.
DEFAULT_MAX_DRIFT_PERCENT = 25.0
# The floor never drops below this, even when the measured spread is zero (a deterministic
# backend): upstream PR #560 puts the structural floor of the fixed eval at a few 1e-4.
DEFAULT_MIN_FLOOR = 3e-4


@dataclass(frozen=True)
class Decision:
    verdict: str  # keep | discard | crash | void; a keep with needs_confirmation is provisional
    needs_rerun: bool  # the run does not count (void): run the candidate again later
    needs_confirmation: bool  # run the candidate once more now, then decide on both runs
    reason: str
    score: float | None  # the score the verdict was taken on (the mean of the candidate's runs)
    gain: float | None  # incumbent - score: positive is an improvement
    floor: float  # the gain the candidate had to beat for this verdict
    sigma: float = 0.0
    dof: int = 0

    # The names `loop.ratchet` reads today.
    @property
    def rerun_needed(self) -> bool:
        return self.needs_rerun or self.needs_confirmation

    @property
    def val_bpb(self) -> float | None:
        return self.score


@dataclass(frozen=True)
class Noise:
    """The session's run-to-run spread and the degrees of freedom it was estimated with."""

    sigma: float
    dof: int


@dataclass(frozen=True)
class Run:
    """One run of a trainer: its score (None: no score, a crash) and the machine speed read
    before and after it (GFLOP/s from `harness.scoring.speed`; None when not measured). Load that
    comes and goes within a run shows in one reading and not the other, so both are checked."""

    val_bpb: float | None
    speed: float | None = None
    speed_after: float | None = None


@dataclass(frozen=True)
class Policy:
    rule: str = "noise"
    z: float = DEFAULT_Z  # keep at the normal tail of z sigmas (alpha), with t quantiles for the dof
    screen_z: float = DEFAULT_SCREEN_Z  # one run below this many standard errors: discarded at once
    min_floor: float = DEFAULT_MIN_FLOOR
    max_drift_percent: float = DEFAULT_MAX_DRIFT_PERCENT
    confirm: bool = True  # an apparent keep needs a second run

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"unknown keep rule {self.rule!r}: use one of {', '.join(RULES)}")
        if not self.z > 0 or not 0 <= self.screen_z <= self.z:
            raise ValueError(f"z must be positive and screen_z between 0 and z (got z={self.z}, screen_z={self.screen_z})")
        if self.min_floor < 0 or not self.max_drift_percent > 0:
            raise ValueError("min_floor must not be negative and max_drift_percent must be positive")

    @property
    def alpha(self) -> float:
        """The one-sided level of the keep test."""
        return 1.0 - statistics.NormalDist().cdf(self.z)


# -- the honest sigma ---------------------------------------------------------------------------

def pooled_noise(groups: Iterable[Sequence[float]]) -> Noise:
    """Sigma pooled over groups of repeated runs, each group one unchanged trainer: sum of
    within-group squared deviations over sum of (n_i - 1). Groups of one run add nothing."""
    squares, dof = 0.0, 0
    for group in groups:
        values = list(group)
        if any(not isinstance(v, (int, float)) or not math.isfinite(v) for v in values):
            raise ValueError(f"a noise group holds a run without a finite score ({values}): pool scored runs only")
        if len(values) < 2:
            continue
        mean = statistics.fmean(values)
        squares += sum((v - mean) ** 2 for v in values)
        dof += len(values) - 1
    return Noise(math.sqrt(squares / dof) if dof else 0.0, dof)


# -- the verdict --------------------------------------------------------------------------------

def reference_speed(runs: Sequence[Run]) -> float | None:
    """The machine speed an incumbent was measured at: the median of its runs' readings before."""
    speeds = [r.speed for r in runs if r.speed is not None]
    return statistics.median(speeds) if speeds else None


def speed_drift(speed: float, reference: float) -> float:
    """Relative change from the reference: -0.2 is 20 % slower."""
    return speed / reference - 1.0


def incumbent_window(runs: Sequence[Run], speed: float | None, max_drift_percent: float,
                     size: int = 5) -> list[Run]:
    """The incumbent runs to compare a candidate with: the latest `size` of those (oldest first)
    measured within `max_drift_percent` of the machine's speed now. Without a speed reading, the
    latest `size` runs. Fewer than two back: re-check the incumbent before judging."""
    if size < 1:
        raise ValueError(f"the incumbent window needs at least one run, not {size}")
    if speed is None:
        return list(runs[-size:])
    close = [r for r in runs if r.speed is not None and abs(speed_drift(speed, r.speed)) * 100 <= max_drift_percent]
    return close[-size:]


def decide_candidate(candidate: Sequence[Run], incumbent: Sequence[Run], noise: Noise,
                     policy: Policy = Policy()) -> Decision:
    """The verdict on a candidate's runs so far (one, or two after a confirmation), against the
    incumbent's recent runs. Drop void runs before asking again."""
    best = [r.val_bpb for r in incumbent if r.val_bpb is not None]
    if not best:
        raise ValueError("no incumbent score to compare with: the session has no baseline yet")
    sigma, dof = max(noise.sigma, 0.0), noise.dof
    if not candidate or any(r.val_bpb is None or not math.isfinite(r.val_bpb) for r in candidate):
        return Decision("crash", False, False, "the run produced no score", None, None, 0.0, sigma, dof)
    score = statistics.fmean(r.val_bpb for r in candidate)  # type: ignore[misc]
    incumbent_score = statistics.fmean(best)
    gain = incumbent_score - score
    runs = _runs_text([r.val_bpb for r in candidate])

    if policy.rule == "strict":
        if gain > 0:
            return Decision("keep", False, False, f"{runs} is lower than the best {incumbent_score:.6f}",
                            score, gain, 0.0, sigma, dof)
        return Decision("discard", False, False, f"{runs} is not lower than the best {incumbent_score:.6f}",
                        score, gain, 0.0, sigma, dof)

    void = _void_reason(candidate, incumbent, policy.max_drift_percent)
    if void:
        return Decision("void", True, False, void, score, gain, 0.0, sigma, dof)

    se = sigma * math.sqrt(1 / len(candidate) + 1 / len(best))
    noise_text = f"sigma {sigma:.6f}, {dof} dof"
    if len(candidate) == 1 and policy.confirm:
        screen = max(critical_value(policy.screen_z, dof) * se, policy.min_floor)
        if gain > screen:
            return Decision("keep", False, True, f"gain {gain:+.6f} ({runs}) passes the screen {screen:.6f} "
                            f"({policy.screen_z:g} SE, {noise_text}): confirming with a second run",
                            score, gain, screen, sigma, dof)
        return Decision("discard", False, False, f"gain {gain:+.6f} ({runs}) is below the screen {screen:.6f} "
                        f"({policy.screen_z:g} SE, {noise_text})", score, gain, screen, sigma, dof)

    test_floor = critical_value(policy.z, dof) * se
    floor = max(test_floor, policy.min_floor)
    if dof == 0:
        line = f"the minimum floor {floor:.6f} (no repeated runs yet: sigma unknown)"
    elif test_floor >= policy.min_floor:
        line = (f"the one-sided t test's floor {floor:.6f} (alpha {policy.alpha:.3f}, {noise_text}, "
                f"{len(candidate)} vs {len(best)} runs)")
    else:
        line = f"the minimum floor {floor:.6f} ({noise_text})"
    if gain > floor:
        return Decision("keep", False, False, f"gain {gain:+.6f} ({runs}) beats {line}", score, gain, floor, sigma, dof)
    return Decision("discard", False, False, f"gain {gain:+.6f} ({runs}) does not beat {line}",
                    score, gain, floor, sigma, dof)


def _void_reason(candidate: Sequence[Run], incumbent: Sequence[Run], max_percent: float) -> str:
    reference = reference_speed(incumbent)
    if reference is None:
        return ""
    for run in candidate:
        for when, speed in (("before", run.speed), ("after", run.speed_after)):
            if speed is None:
                continue
            change = speed_drift(speed, reference)
            if abs(change) * 100 > max_percent:
                return (f"void: the machine ran at {speed:.3g} GFLOP/s {when} the run, {change:+.0%} from the "
                        f"incumbent's {reference:.3g} GFLOP/s (limit {max_percent:g} %); run it again when the "
                        "machine is back")
    return ""


def critical_value(z: float, dof: int) -> float:
    """The one-sided critical value at the normal tail of `z`: Student t with `dof` degrees of
    freedom (t > z, charging for a sigma estimated from few runs); `z` itself without any."""
    if dof <= 0:
        return z
    return student_t_quantile(statistics.NormalDist().cdf(z), dof)


# -- Student t, without scipy -------------------------------------------------------------------

def student_t_cdf(t: float, dof: int) -> float:
    """P(T <= t) for Student's t with `dof` degrees of freedom."""
    if dof <= 0:
        raise ValueError(f"Student t needs positive degrees of freedom, not {dof}")
    x = dof / (dof + t * t)
    tail = 0.5 * _regularized_beta(x, dof / 2, 0.5)
    return 1.0 - tail if t > 0 else tail


def student_t_quantile(p: float, dof: int) -> float:
    """The t with P(T <= t) = p, to 1e-9 (bisection on the cdf, which is monotone)."""
    if not 0 < p < 1:
        raise ValueError(f"a quantile needs 0 < p < 1, not {p}")
    low, high = -1.0, 1.0
    while student_t_cdf(low, dof) > p:
        low *= 2
    while student_t_cdf(high, dof) < p:
        high *= 2
    while high - low > 1e-9:
        mid = (low + high) / 2
        low, high = (mid, high) if student_t_cdf(mid, dof) < p else (low, mid)
    return (low + high) / 2


def _regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b) by its continued fraction (modified Lentz), on the side where it converges."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _regularized_beta(1 - x, b, a)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1) < 1e-15:
            break
    return math.exp(log_front) * fraction / a


# -- the earlier interface (loop.ratchet until it migrates) -------------------------------------

def noise_floor(sigma: float, z: float, min_floor: float) -> float:
    """The gain a change must beat under the earlier noise rule: max(z * sigma, min_floor)."""
    return max(z * max(sigma, 0.0), min_floor)


def decide(
    candidate: Sequence[float | None],
    best: Sequence[float],
    sigma: float,
    rule: str = "noise",
    z: float = DEFAULT_Z,
    min_floor: float = DEFAULT_MIN_FLOOR,
) -> Decision:
    """The earlier verdict: a flat floor of z sigma (the baseline's), one run decides unless it
    lands within one sigma of the floor, then the mean of two. Superseded by `decide_candidate`;
    a close call comes back with `needs_confirmation` (read as `rerun_needed`)."""
    if rule not in RULES:
        raise ValueError(f"unknown keep rule {rule!r}: use one of {', '.join(RULES)}")
    if not best:
        raise ValueError("no best score to compare with: the session has no baseline yet")
    floor = noise_floor(sigma, z, min_floor) if rule == "noise" else 0.0
    dof = 0  # this interface is handed a sigma without its degrees of freedom

    def verdict(name: str, reason: str, score: float | None = None, gain: float | None = None,
                confirm: bool = False) -> Decision:
        return Decision(name, False, confirm, reason, score, gain, floor, sigma, dof)

    if not candidate or any(v is None or not math.isfinite(v) for v in candidate):
        return verdict("crash", "the run produced no score")
    score = statistics.fmean(candidate)  # type: ignore[arg-type]
    incumbent = statistics.fmean(best)
    gain = incumbent - score
    runs = _runs_text(candidate)

    if rule == "strict":
        if gain > 0:
            return verdict("keep", f"{runs} is lower than the best {incumbent:.6f}", score, gain)
        return verdict("discard", f"{runs} is not lower than the best {incumbent:.6f}", score, gain)

    line = f"the noise floor {floor:.6f} ({z:g} sigma, sigma {sigma:.6f})" if z * sigma >= min_floor \
        else f"the minimum floor {floor:.6f} (sigma {sigma:.6f})"
    if len(candidate) == 1 and sigma > 0 and abs(gain - floor) < sigma:
        return verdict("discard", f"gain {gain:+.6f} is within one sigma of {line}: re-running", score, gain, True)
    if gain > floor:
        return verdict("keep", f"gain {gain:+.6f} ({runs}) beats {line}", score, gain)
    return verdict("discard", f"gain {gain:+.6f} ({runs}) does not beat {line}", score, gain)


def _runs_text(values: Sequence[float | None]) -> str:
    if len(values) == 1:
        return f"{values[0]:.6f}"
    return "mean of " + ", ".join(f"{v:.6f}" for v in values)  # type: ignore[str-format]
