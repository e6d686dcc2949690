"""The keep/revert verdict as a pure function: the noise rule against upstream's strict rule."""

from __future__ import annotations

import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loop.decide import DEFAULT_MIN_FLOOR, decide, noise_floor

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
