"""The keep/revert verdict as a pure function: the noise rule against upstream's strict rule.

The first half covers the earlier interface (`decide`, which loop.ratchet still calls); the second
half the paired, drift-aware verdict (`decide_candidate`): pooling, drift voiding, confirmation."""

from __future__ import annotations

import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loop.decide import (
    DEFAULT_MIN_FLOOR,
    Noise,
    Policy,
    Run,
    decide,
    decide_candidate,
    incumbent_window,
    noise_floor,
    pooled_noise,
    student_t_cdf,
    student_t_quantile,
)

# Two baseline runs of the same code 0.01 apart: sigma ~0.00707, 2-sigma floor ~0.0141.
BASELINE = [2.4500, 2.4600]
SIGMA = statistics.stdev(BASELINE)


def test_the_noise_rule_refuses_a_seed_change_that_strict_would_keep():
    seed_only = [2.4540]  # 0.001 below the baseline mean: less than the noise floor
    strict = decide(seed_only, BASELINE, SIGMA, rule="strict")
    noise = decide(seed_only, BASELINE, SIGMA, rule="noise", z=2.0)
    assert strict.verdict == "keep" and not strict.rerun_needed
    assert noise.verdict == "discard" and not noise.rerun_needed
    assert noise.floor == pytest.approx(2 * SIGMA)
    assert "does not beat the noise floor" in noise.reason


def test_a_gain_well_above_the_floor_is_kept_at_once():
    decision = decide([2.40], BASELINE, SIGMA, rule="noise")
    assert decision.verdict == "keep" and not decision.rerun_needed
    assert decision.gain == pytest.approx(0.055)


def test_a_close_call_is_run_again_and_judged_on_the_mean():
    floor = 2 * SIGMA
    close = statistics.fmean(BASELINE) - floor - 0.5 * SIGMA  # just past the line, within one sigma
    first = decide([close], BASELINE, SIGMA, rule="noise")
    assert first.rerun_needed
    confirmed = decide([close, close - 0.002], BASELINE, SIGMA, rule="noise")
    assert not confirmed.rerun_needed and confirmed.verdict == "keep"
    assert confirmed.val_bpb == pytest.approx(close - 0.001)
    # The second run regresses to the mean: the pair no longer clears the floor, and no third run.
    refuted = decide([close, statistics.fmean(BASELINE)], BASELINE, SIGMA, rule="noise")
    assert not refuted.rerun_needed and refuted.verdict == "discard"
    assert "mean of" in refuted.reason


def test_a_deterministic_backend_still_needs_the_minimum_floor():
    same = [2.5, 2.5]
    assert decide([2.5 - DEFAULT_MIN_FLOOR / 3], same, 0.0).verdict == "discard"
    kept = decide([2.5 - 10 * DEFAULT_MIN_FLOOR], same, 0.0)
    assert kept.verdict == "keep" and not kept.rerun_needed
    assert noise_floor(0.0, 2.0, DEFAULT_MIN_FLOOR) == DEFAULT_MIN_FLOOR


def test_strict_is_upstream_equal_is_not_better():
    assert decide([2.455], BASELINE, SIGMA, rule="strict").verdict == "discard"
    assert decide([2.4549], BASELINE, SIGMA, rule="strict").verdict == "keep"


def test_a_run_without_a_score_is_a_crash():
    for rule in ("noise", "strict"):
        assert decide([None], BASELINE, SIGMA, rule=rule).verdict == "crash"
        assert decide([2.3, None], BASELINE, SIGMA, rule=rule).verdict == "crash"
        assert decide([float("nan")], BASELINE, SIGMA, rule=rule).verdict == "crash"


def test_bad_arguments_say_what_is_wrong():
    with pytest.raises(ValueError, match="unknown keep rule"):
        decide([2.4], BASELINE, SIGMA, rule="greedy")
    with pytest.raises(ValueError, match="no baseline"):
        decide([2.4], [], SIGMA)


scores = st.floats(min_value=0.5, max_value=5.0, allow_nan=False)


@given(candidate=st.lists(scores, min_size=1, max_size=2), best=st.lists(scores, min_size=1, max_size=3),
       sigma=st.floats(min_value=0.0, max_value=0.1), z=st.floats(min_value=0.5, max_value=4.0))
def test_the_noise_rule_never_keeps_what_strict_discards(candidate, best, sigma, z):
    noise = decide(candidate, best, sigma, rule="noise", z=z)
    strict = decide(candidate, best, sigma, rule="strict")
    if noise.verdict == "keep" and not noise.rerun_needed:
        assert strict.verdict == "keep"
    if len(candidate) == 2:
        assert not noise.rerun_needed  # at most one re-run


# -- the paired, drift-aware verdict ---------------------------------------------------------------

def test_sigma_is_pooled_over_every_repeated_group_with_its_degrees_of_freedom():
    baseline = [2.40, 2.42, 2.44, 2.46, 2.48]  # squares about the mean 2.44: 0.004, dof 4
    candidate_rerun = [2.30, 2.32]  # 0.0002, dof 1
    incumbent_recheck = [2.35, 2.38, 2.32]  # 0.0018, dof 2
    noise = pooled_noise([baseline, candidate_rerun, incumbent_recheck, [2.5]])  # one run: nothing
    assert noise.dof == 4 + 1 + 2
    assert noise.sigma == pytest.approx(((0.004 + 0.0002 + 0.0018) / 7) ** 0.5)
    # Pooling is not the spread of all runs together: the gaps between trainers are not noise.
    everything = baseline + candidate_rerun + incumbent_recheck
    assert noise.sigma < statistics.stdev(everything)


def test_pooling_more_groups_improves_the_estimate_of_a_small_baseline():
    two_runs = pooled_noise([[2.4500, 2.4523]])  # the "sigma = 0.0023" from two baseline runs
    assert two_runs.dof == 1
    night = pooled_noise([[2.4500, 2.4523], [2.31, 2.33, 2.29], [2.40, 2.42], [2.38, 2.35]])
    assert night.dof == 1 + 2 + 1 + 1
    assert night.sigma > 5 * two_runs.sigma  # the honest spread the two runs hid


def test_pooling_with_nothing_repeated_has_no_degrees_of_freedom():
    assert pooled_noise([]) == Noise(0.0, 0)
    assert pooled_noise([[2.4], [2.5]]) == Noise(0.0, 0)
    with pytest.raises(ValueError, match="scored runs only"):
        pooled_noise([[2.4, None]])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="scored runs only"):
        pooled_noise([[2.4, float("nan")]])


def test_student_t_matches_the_printed_tables():
    for p, dof, table in [(0.95, 1, 6.314), (0.95, 5, 2.015), (0.975, 4, 2.776), (0.99, 20, 2.528)]:
        assert student_t_quantile(p, dof) == pytest.approx(table, abs=1e-3)
    assert student_t_cdf(0.0, 3) == pytest.approx(0.5)
    assert student_t_cdf(-2.015, 5) == pytest.approx(0.05, abs=1e-4)


NOISE = Noise(sigma=0.01, dof=12)
INCUMBENT = [Run(2.40, speed=100.0), Run(2.41, speed=102.0), Run(2.39, speed=98.0)]  # mean 2.40, speed 100


def test_a_run_on_a_machine_that_drifted_is_void_never_kept_or_discarded():
    policy = Policy(max_drift_percent=10)
    # A machine whose load ended: an unchanged trainer looks much better, but ran 30 % faster.
    fast = decide_candidate([Run(2.16, speed=130.0)], INCUMBENT, NOISE, policy)
    assert fast.verdict == "void" and fast.needs_rerun and not fast.needs_confirmation
    assert "+30%" in fast.reason and "limit 10 %" in fast.reason
    # And the other way: a slowed machine makes a real gain look like a loss.
    slow = decide_candidate([Run(2.60, speed=80.0)], INCUMBENT, NOISE, policy)
    assert slow.verdict == "void" and slow.needs_rerun
    assert "-20%" in slow.reason
    # Within the limit the run counts.
    steady = decide_candidate([Run(2.60, speed=95.0)], INCUMBENT, NOISE, policy)
    assert steady.verdict == "discard" and not steady.needs_rerun


def test_load_that_came_during_the_run_voids_it_through_the_reading_after():
    during = decide_candidate([Run(2.45, speed=101.0, speed_after=60.0)], INCUMBENT, NOISE)
    assert during.verdict == "void" and during.needs_rerun
    assert "after the run" in during.reason and "-40%" in during.reason
    steady = decide_candidate([Run(2.45, speed=101.0, speed_after=97.0)], INCUMBENT, NOISE)
    assert steady.verdict == "discard"


def test_a_confirmation_run_that_drifted_voids_the_verdict_too():
    first = Run(2.34, speed=101.0)
    assert decide_candidate([first], INCUMBENT, NOISE).needs_confirmation
    drifted = decide_candidate([first, Run(2.33, speed=150.0)], INCUMBENT, NOISE)
    assert drifted.verdict == "void" and drifted.needs_rerun


def test_the_candidate_is_compared_with_incumbent_runs_from_a_machine_like_its_own():
    history = [Run(2.40, 100.0), Run(2.41, 101.0), Run(2.25, 140.0), Run(2.26, 139.0), Run(2.39, 99.0)]
    # Measured at 100 GFLOP/s: the incumbent's runs at ~100, not those of the faster spell.
    window = incumbent_window(history, speed=100.0, max_drift_percent=10)
    assert window == [history[0], history[1], history[4]]
    assert incumbent_window(history, speed=100.0, max_drift_percent=10, size=2) == [history[1], history[4]]
    # The machine is fast now: only the fast spell's runs compare, and a candidate there is judged.
    fast = incumbent_window(history, speed=141.0, max_drift_percent=10)
    assert fast == [history[2], history[3]]
    assert decide_candidate([Run(2.255, 141.0)], fast, NOISE).verdict == "discard"
    # Nothing measured at today's speed: the caller re-checks the incumbent first.
    assert incumbent_window(history, speed=60.0, max_drift_percent=10) == []
    assert incumbent_window(history, speed=None, max_drift_percent=10, size=2) == history[-2:]


def test_without_speed_readings_nothing_is_voided():
    unmeasured = [Run(2.40), Run(2.41), Run(2.39)]
    decision = decide_candidate([Run(2.16, speed=130.0)], unmeasured, NOISE)
    assert decision.verdict != "void"
    assert decide_candidate([Run(2.16)], INCUMBENT, NOISE).verdict != "void"


def test_an_apparent_keep_is_confirmed_by_a_second_run_and_judged_on_the_mean():
    first = decide_candidate([Run(2.34, speed=100.0)], INCUMBENT, NOISE)  # 6 sigma better on one run
    assert first.verdict == "keep" and first.needs_confirmation and not first.needs_rerun
    assert "confirming" in first.reason
    confirmed = decide_candidate([Run(2.34, speed=100.0), Run(2.36, speed=99.0)], INCUMBENT, NOISE)
    assert confirmed.verdict == "keep" and not confirmed.needs_confirmation
    assert confirmed.score == pytest.approx(2.35) and confirmed.gain == pytest.approx(0.05)
    assert (confirmed.sigma, confirmed.dof) == (0.01, 12)
    # A lucky first run: the second regresses to the incumbent, and the mean does not pass.
    refuted = decide_candidate([Run(2.37, speed=100.0), Run(2.41, speed=100.0)], INCUMBENT, NOISE)
    assert refuted.verdict == "discard" and not refuted.needs_confirmation
    assert "mean of" in refuted.reason and "t test" in refuted.reason


def test_the_confirmed_verdict_is_a_one_sided_t_test_on_the_pooled_sigma():
    policy = Policy(z=2.0)
    # Two candidate runs against three incumbent runs: SE = sigma * sqrt(1/2 + 1/3).
    se = NOISE.sigma * (1 / 2 + 1 / 3) ** 0.5
    t_crit = student_t_quantile(statistics.NormalDist().cdf(2.0), NOISE.dof)
    expected_floor = t_crit * se
    just_above = 2.40 - expected_floor - 1e-4
    just_below = 2.40 - expected_floor + 1e-4
    above = decide_candidate([Run(just_above), Run(just_above)], INCUMBENT, NOISE, policy)
    below = decide_candidate([Run(just_below), Run(just_below)], INCUMBENT, NOISE, policy)
    assert above.floor == pytest.approx(expected_floor) and above.verdict == "keep"
    assert below.verdict == "discard"
    # Fewer degrees of freedom: the same gain needs more evidence.
    unsure = decide_candidate([Run(just_above), Run(just_above)], INCUMBENT, Noise(0.01, 2), policy)
    assert unsure.floor > above.floor and unsure.verdict == "discard"


def test_a_clear_loser_costs_one_run():
    decision = decide_candidate([Run(2.45, speed=100.0)], INCUMBENT, NOISE)
    assert decision.verdict == "discard" and not decision.needs_confirmation and not decision.needs_rerun
    assert "below the screen" in decision.reason


def test_without_confirmation_one_run_is_judged_by_the_full_test():
    policy = Policy(confirm=False)
    decision = decide_candidate([Run(2.34)], INCUMBENT, NOISE, policy)
    assert decision.verdict == "keep" and not decision.needs_confirmation


def test_with_no_repeated_runs_yet_only_the_minimum_floor_guards():
    noise = Noise(0.0, 0)
    first = decide_candidate([Run(2.39)], [Run(2.40)], noise)
    assert first.needs_confirmation and first.floor == DEFAULT_MIN_FLOOR
    confirmed = decide_candidate([Run(2.39), Run(2.395)], [Run(2.40)], noise)
    assert confirmed.verdict == "keep" and "sigma unknown" in confirmed.reason
    assert decide_candidate([Run(2.40 - DEFAULT_MIN_FLOOR / 3)], [Run(2.40)], noise).verdict == "discard"


def test_strict_stays_upstreams_rule_whatever_the_speed():
    strict = Policy(rule="strict")
    kept = decide_candidate([Run(2.3999, speed=300.0)], INCUMBENT, NOISE, strict)
    assert kept.verdict == "keep" and not kept.needs_confirmation and not kept.needs_rerun
    assert decide_candidate([Run(2.40, speed=100.0)], INCUMBENT, NOISE, strict).verdict == "discard"


def test_a_candidate_without_a_score_is_a_crash_under_both_rules():
    for rule in ("noise", "strict"):
        policy = Policy(rule=rule)
        assert decide_candidate([Run(None, speed=100.0)], INCUMBENT, NOISE, policy).verdict == "crash"
        assert decide_candidate([Run(2.3), Run(float("nan"))], INCUMBENT, NOISE, policy).verdict == "crash"


def test_bad_policies_and_missing_incumbents_say_what_is_wrong():
    with pytest.raises(ValueError, match="unknown keep rule"):
        Policy(rule="greedy")
    with pytest.raises(ValueError, match="screen_z"):
        Policy(z=1.0, screen_z=2.0)
    with pytest.raises(ValueError, match="max_drift_percent"):
        Policy(max_drift_percent=0)
    with pytest.raises(ValueError, match="no baseline"):
        decide_candidate([Run(2.4)], [Run(None)], NOISE)


@given(gains=st.lists(st.floats(min_value=-0.05, max_value=0.05), min_size=1, max_size=2),
       sigma=st.floats(min_value=0.0, max_value=0.05), dof=st.integers(min_value=0, max_value=50))
def test_the_noise_rule_never_keeps_what_strict_discards_nor_keeps_without_confirmation(gains, sigma, dof):
    candidate = [Run(2.40 - g) for g in gains]
    noise = decide_candidate(candidate, INCUMBENT, Noise(sigma, dof))
    strict = decide_candidate(candidate, INCUMBENT, Noise(sigma, dof), Policy(rule="strict"))
    if noise.verdict == "keep":
        assert strict.verdict == "keep"
    if len(candidate) == 1 and noise.verdict == "keep":
        assert noise.needs_confirmation
    if len(candidate) == 2:
        assert not noise.needs_confirmation  # one confirmation run at most
