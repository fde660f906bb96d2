"""Unit tests of what checking the safe size under the default settings leaves (the policy is
core.confirm's; the verdict and its note are batchfit.verbs.safe_check's), against fakes."""

from __future__ import annotations

from batchfit.core.confirm import ConfirmPolicy, run_confirmation
from batchfit.core.search import Trial
from batchfit.verbs.safe_check import _outcome

SETTINGS = "the defaults"


def check(safe: int, fits_up_to: int, k: int = 3) -> tuple[object, list[Trial], list[str]]:
    """Run the check of ``safe`` on a device where sizes up to ``fits_up_to`` fit."""
    policy = ConfirmPolicy(k=k)
    seed = [Trial(safe, True)]
    made = run_confirmation(policy, seed, lambda b: Trial(b, b <= fits_up_to))
    notes: list[str] = []
    return _outcome(policy, seed, made, safe, k, SETTINGS, notes), made, notes


def test_a_safe_size_that_fits_under_the_defaults_stays() -> None:
    out, made, notes = check(50, 60)
    assert out.batch_size == 50 and out.confirmed and out.checks == 3
    assert [t.batch_size for t in made] == [50, 50, 50]  # k real fits: the seed is no check
    assert "also fitted 3 of 3" in notes[0]


def test_a_safe_size_that_fails_steps_down_until_it_fits_k_times() -> None:
    out, made, notes = check(50, 44)
    assert out.confirmed and out.batch_size <= 44
    assert all(t.fits == (t.batch_size <= 44) for t in made)
    assert sum(t.fits for t in made if t.batch_size == out.batch_size) == 3
    assert "stepped down to" in notes[0] and "50" in notes[0]


def test_nothing_fitting_under_the_defaults_is_said_not_confirmed() -> None:
    out, made, notes = check(50, 0)
    assert not out.confirmed and out.batch_size == 1  # the smallest size, said so
    assert len([t for t in made if not t.fits]) == ConfirmPolicy(k=3).max_failures
    assert "could not be confirmed" in notes[0]
