"""GuidedPolicy with a prior line (an XLA step's compile-time memory) against fake devices."""

from __future__ import annotations

import pytest

from batchfit.core.estimate import guided_start
from batchfit.core.search import GuidedPolicy, Trial, make_policy, run_search
from batchfit.errors import InvalidInputError
from batchfit.results.estimate import LinearFit

MiB = 1 << 20
BUDGET = 500 * MiB
MARGIN = 0.02


def device(fixed: float, per_sample: float, *, oom_without_peak: bool = True):
    """A sharp linear device: fits under (1 - margin) of the budget; above the budget an
    out-of-memory error (no peak), between the two a peak 'at the limit'."""

    def trial(b: int) -> Trial:
        peak = fixed + per_sample * b
        if peak > BUDGET and oom_without_peak:
            return Trial(b, False, None)
        return Trial(b, peak < (1 - MARGIN) * BUDGET, peak)

    return trial


def search(line: LinearFit, trial, granularity: int = 8, tolerance: float = 0.0):
    init = guided_start(line, BUDGET, margin=MARGIN, granularity=granularity)
    policy = make_policy("guided", budget_bytes=BUDGET, granularity=granularity,
                         saturation=MARGIN, tolerance=tolerance, init=init,
                         prior=(line.fixed_bytes, line.per_sample_bytes))
    history = run_search(policy, trial)
    return policy, history


def truth(trial, granularity: int = 8) -> int:
    return max(b for b in range(granularity, 4000, granularity) if trial(b).fits)


@pytest.mark.parametrize("slope_error, fixed_error", [
    (0.015, 0), (-0.015, 0), (0.0, 3 * MiB), (0.0, -3 * MiB), (0.01, 1 * MiB)])
def test_a_prior_off_by_little_brackets_to_the_granule_in_four_probes(slope_error, fixed_error):
    line = LinearFit(fixed_bytes=10 * MiB, per_sample_bytes=1 * MiB)
    trial = device(10 * MiB + fixed_error, (1 + slope_error) * MiB)
    policy, history = search(line, trial)
    assert policy.best(history) == truth(trial) and policy.bracketed(history)
    assert len(history) <= 4, [(t.batch_size, t.fits) for t in history]
    assert sum(1 for t in history if not t.fits and t.peak_bytes is None) <= 1


def test_the_usual_case_is_three_probes_one_failure():
    # XLA's prediction misses only the allocator's fragmentation: a constant ~1 MiB.
    line = LinearFit(fixed_bytes=10 * MiB, per_sample_bytes=1 * MiB)
    trial = device(11 * MiB, 1 * MiB)
    policy, history = search(line, trial)
    assert policy.best(history) == truth(trial)
    assert len(history) <= 3 and sum(not t.fits for t in history) == 1


def test_a_prior_far_off_still_ends_at_the_limit():
    # 30% under-predicted per sample: the prior's first step fails; the search recovers.
    line = LinearFit(fixed_bytes=10 * MiB, per_sample_bytes=1 * MiB)
    trial = device(10 * MiB, 1.3 * MiB)
    policy, history = search(line, trial)
    assert policy.best(history) == truth(trial) and policy.bracketed(history)
    assert len(history) <= 10


def test_without_a_prior_the_same_device_takes_more_probes():
    line = LinearFit(fixed_bytes=10 * MiB, per_sample_bytes=1 * MiB)
    trial = device(11 * MiB, 1 * MiB)
    plain = GuidedPolicy(BUDGET, 8, saturation=MARGIN)
    history = run_search(plain, trial)
    assert plain.best(history) == truth(trial)
    assert len(history) > len(search(line, trial)[1])


@pytest.mark.parametrize("bad", [(1.0,), (0.0, 0.0), (0.0, float("nan")), "ab"])
def test_a_bad_prior_is_refused(bad):
    with pytest.raises(InvalidInputError, match="prior"):
        GuidedPolicy(BUDGET, prior=bad)


def test_a_need_the_peaks_do_not_show_is_searched_with_prior_peak():
    # An XLA step on TensorFlow's capped allocator: it needs room for its temporaries twice
    # over, while a fit's peak reads them once (and ~1 MiB of fragmentation more).
    fixed, temp = 4 * MiB, 1 * MiB

    def trial(b: int) -> Trial:
        need = fixed + 2 * temp * b
        if need > (1 - MARGIN) * BUDGET:
            return Trial(b, False, float(BUDGET))            # waited, read the budget
        return Trial(b, True, fixed + temp * b + MiB)

    init = guided_start(LinearFit(fixed_bytes=fixed, per_sample_bytes=2 * temp), BUDGET,
                        margin=MARGIN, granularity=1)
    policy = make_policy("guided", budget_bytes=BUDGET, saturation=MARGIN, init=init,
                         prior=(fixed, 2 * temp), prior_peak=(fixed, temp))
    history = run_search(policy, trial)
    assert policy.best(history) == max(b for b in range(1, 400) if trial(b).fits)
    assert len(history) <= 4 and sum(not t.fits for t in history) <= 2, history


def test_failures_reading_the_budget_hand_over_instead_of_crawling():
    # The prior says 2x what fits, and every failure reads the budget (censored): 3% steps
    # from the prediction would take a dozen probes (measured on the CNN at 256 MiB).
    line = LinearFit(fixed_bytes=4 * MiB, per_sample_bytes=1 * MiB)

    def trial(b: int) -> Trial:
        peak = 4 * MiB + 2 * MiB * b
        return Trial(b, True, peak) if peak < (1 - MARGIN) * BUDGET else Trial(b, False, BUDGET)

    policy, history = search(line, trial, granularity=1)
    assert policy.best(history) == truth(trial, 1) and policy.bracketed(history)
    first, second, third = (t.batch_size for t in history[:3])
    assert second == int(0.97 * first) and third < 0.5 * second, history[:3]


def test_a_prior_that_over_counts_steps_up_by_the_peak_line_not_by_granules():
    # The need line counts the temporaries twice, but this step fits on its peak alone.
    fixed, per_sample = 4 * MiB, 100 * 1024

    def trial(b: int) -> Trial:
        peak = fixed + per_sample * b
        return Trial(b, peak < (1 - MARGIN) * BUDGET, float(min(peak, BUDGET)))

    need = (fixed, 2 * per_sample)
    init = guided_start(LinearFit(fixed_bytes=need[0], per_sample_bytes=need[1]), BUDGET,
                        margin=MARGIN)
    policy = make_policy("guided", budget_bytes=BUDGET, saturation=MARGIN, init=init,
                         prior=need, prior_peak=(fixed, per_sample), tolerance=0.02)
    history = run_search(policy, trial)
    best = max(b for b in range(1, 6000) if trial(b).fits)
    # 5 probes until session 16; since then a second fit steps up by at most 2% (the next
    # test), and the peak line leads from the third: 7, every one a fit
    assert best * 0.98 <= policy.best(history) <= best and len(history) <= 7, history
    assert all(t.fits for t in history[:3]), history


def test_a_prior_a_little_low_on_a_sharp_xla_limit_costs_one_failure():
    # The example CNN at 128 MiB, XLA-compiled: the prior predicted 41 where 42 fits and 43
    # does not; each fit's peak reads about half the budget (the temporaries need a second
    # contiguous chunk no peak shows), so the peak line says "twice as far". Following it ran
    # out of memory 4 times (10 s each); a second fit now steps up by at most 2%.
    fixed, temp = 4 * MiB, 5 * MiB
    limit = 42

    def trial(b: int) -> Trial:
        if b > limit:
            return Trial(b, False, None)                     # out of memory, no peak
        return Trial(b, True, fixed + temp * b + MiB)

    need = (75 * MiB, 2 * temp)                            # what must fit: 41 predicted
    init = guided_start(LinearFit(fixed_bytes=need[0], per_sample_bytes=need[1]), BUDGET,
                        margin=MARGIN)
    assert init == limit - 1
    policy = make_policy("guided", budget_bytes=BUDGET, saturation=MARGIN, init=init,
                         prior=need, prior_peak=(fixed, temp), tolerance=0.05)
    history = run_search(policy, trial)
    assert policy.best(history) == limit, history
    assert len(history) <= 3 and sum(not t.fits for t in history) == 1, history


def test_a_failure_whose_peak_ran_just_over_corrects_the_prior():
    line = LinearFit(fixed_bytes=10 * MiB, per_sample_bytes=1 * MiB)
    trial = device(12 * MiB, 1 * MiB, oom_without_peak=False)  # 2 MiB more than predicted
    _, history = search(line, trial, granularity=1)
    assert not history[0].fits and history[0].peak_bytes < BUDGET
    assert history[1].batch_size == truth(trial, 1) and len(history) <= 3, history
