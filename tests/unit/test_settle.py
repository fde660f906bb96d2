"""The rule that ends a probe's epochs once its peak has stopped rising (pure)."""

from __future__ import annotations

import pytest

from batchfit.core.settle import SETTLE_MIN_BYTES, SettleRule, limit_note, limit_outcome
from batchfit.errors import InvalidInputError

# ResNet50 (64x64, Adam) at 16 under 512 MiB, the peak after each epoch of 3 steps (MiB)
RESNET = [446.0, 456.0, 465.0, 466.0, 470.0, 470.5, 470.5, 470.5]


def test_the_measured_resnet_climb_settles_at_its_level_not_before() -> None:
    rule = SettleRule(tolerance_bytes=1.3, quiet=2, max_epochs=8)
    stops = [n for n in range(1, len(RESNET) + 1) if rule.settled(RESNET[:n])]
    assert stops[0] == 7  # one quiet epoch (466) then a rise of 4 MiB: not settled there
    assert RESNET[stops[0] - 1] == max(RESNET)


def test_a_flat_peak_stops_after_the_quiet_epochs() -> None:
    rule = SettleRule(tolerance_bytes=0.0, quiet=2, max_epochs=8)
    assert [rule.settled([42.5] * n) for n in (1, 2, 3)] == [False, False, True]


def test_a_peak_that_keeps_rising_stops_at_max_epochs() -> None:
    rule = SettleRule(tolerance_bytes=1.0, quiet=2, max_epochs=4)
    assert not rule.settled([1.0, 5.0, 9.0])
    assert rule.settled([1.0, 5.0, 9.0, 13.0])
    assert SettleRule(tolerance_bytes=1.0, max_epochs=1).settled([1.0])


def test_a_peak_clear_of_the_line_ends_after_two_epochs_and_one_near_it_settles() -> None:
    # ResNet50's climb (446 -> 470.5 MiB) under 768 MiB: at its largest rise (10 MiB) for the 6
    # epochs left it stays under the 3% line (745 MiB): two epochs, a validation pass between.
    line = 0.97 * 768
    far = SettleRule(tolerance_bytes=1.9, quiet=2, max_epochs=8, clear_below=line)
    stops = [n for n in range(1, len(RESNET) + 1) if far.settled(RESNET[:n])]
    assert stops[0] == 2
    # The same climb 260 MiB higher could reach the line: it settles as without one (epoch 7).
    near = [p + 260.0 for p in RESNET]
    assert next(n for n in range(1, 9) if far.settled(near[:n])) == 7
    # A climb that speeds up is followed, whatever the line
    assert not far.settled([100.0, 110.0, 500.0])
    # One epoch alone never ends it early (no validation pass has run before a training epoch)
    assert not far.settled([1.0])


def test_the_clear_line_follows_the_budget_and_the_margin() -> None:
    assert SettleRule.for_budget(None).clear_below is None
    assert SettleRule.for_budget(1000).clear_below == pytest.approx(970.0)
    assert SettleRule.for_budget(1000, limit_margin=0.1).clear_below == pytest.approx(900.0)


def test_tolerance_follows_the_budget_with_a_floor() -> None:
    assert SettleRule.for_budget(512 << 20).tolerance_bytes == pytest.approx(0.0025 * (512 << 20))
    assert SettleRule.for_budget(None).tolerance_bytes == SETTLE_MIN_BYTES
    assert SettleRule.for_budget(1 << 20).tolerance_bytes == SETTLE_MIN_BYTES


@pytest.mark.parametrize("kwargs", [{"quiet": 0}, {"max_epochs": 0}, {"tolerance_bytes": -1.0}])
def test_bad_settings_are_refused_with_their_names(kwargs) -> None:
    args = {"tolerance_bytes": 1.0, **kwargs}
    with pytest.raises(InvalidInputError, match="quiet >= 1"):
        SettleRule(**args)


# The CNN of the examples under 256 MiB, the user's fit of 40 epochs of 4 batches, the peak read
# around every step (share of the budget): the median step and the largest.
CNN_FITS = {340: (0.735, 0.989), 360: (0.727, 0.993), 375: (0.756, 0.993)}
CNN_FAILS = {385: (0.957, 0.992), 395: (0.964, 0.993)}  # fit ran out of memory in some runs


def test_a_peak_near_the_cap_in_a_few_steps_fits_and_in_the_typical_step_does_not() -> None:
    for typical, peak in CNN_FITS.values():
        assert limit_outcome(peak, 1.0) == "at_limit"  # the largest peak alone: too close
        assert limit_outcome(peak, 1.0, typical=typical) == "fits"
    for typical, peak in CNN_FAILS.values():
        assert limit_outcome(peak, 1.0, typical=typical) == "at_limit"


def test_the_lstm_whose_answer_failed_the_users_fit_stays_at_limit() -> None:
    # The LSTM under 16 MiB: 293 failed the user's fit 2 of 3 (its steps 95.5-97.1% of the
    # budget), 287 trained (95.0-96.4%)
    assert limit_outcome(0.971, 1.0, typical=0.959) == "at_limit"
    assert limit_outcome(0.964, 1.0, typical=0.955) == "fits"


@pytest.mark.parametrize("typical", [None, 0.5])
def test_a_peak_over_the_budget_never_fits(typical: float | None) -> None:
    assert limit_outcome(1.01, 1.0, typical=typical) == "over_budget"


def test_the_margins_are_the_callers() -> None:
    assert limit_outcome(0.92, 1.0, margin=0.1) == "at_limit"
    assert limit_outcome(0.92, 1.0, margin=0.1, typical=0.85, typical_margin=0.1) == "fits"
    assert limit_outcome(0.92, 1.0, margin=0.1, typical=0.91, typical_margin=0.1) == "at_limit"


@pytest.mark.parametrize("typical", [None, 0.5, 0.96])
@pytest.mark.parametrize("peak", [0.5, 0.96, 0.975, 0.99, 1.0, 1.01])
def test_the_note_says_what_the_verdict_decided(peak: float, typical: float | None) -> None:
    outcome = limit_outcome(peak, 1.0, typical=typical)
    note = limit_note(outcome, peak, 1.0, typical=typical)
    assert ("exceeds the budget" in note) == (outcome == "over_budget")
    assert ("too close to count" in note) == (outcome == "at_limit")
    # a near peak that still fits says why; a peak far from the budget says nothing
    assert ("counted as fitting" in note) == (outcome == "fits" and peak >= 0.97)
    assert (note == "") == (outcome == "fits" and peak < 0.97)
