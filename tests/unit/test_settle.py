"""The rule that ends a probe's epochs once its peak has stopped rising (pure)."""

from __future__ import annotations

import pytest

from batchfit.core.settle import SETTLE_MIN_BYTES, SettleRule
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


def test_tolerance_follows_the_budget_with_a_floor() -> None:
    assert SettleRule.for_budget(512 << 20).tolerance_bytes == pytest.approx(0.0025 * (512 << 20))
    assert SettleRule.for_budget(None).tolerance_bytes == SETTLE_MIN_BYTES
    assert SettleRule.for_budget(1 << 20).tolerance_bytes == SETTLE_MIN_BYTES


@pytest.mark.parametrize("kwargs", [{"quiet": 0}, {"max_epochs": 0}, {"tolerance_bytes": -1.0}])
def test_bad_settings_are_refused_with_their_names(kwargs) -> None:
    args = {"tolerance_bytes": 1.0, **kwargs}
    with pytest.raises(InvalidInputError, match="quiet >= 1"):
        SettleRule(**args)
