"""Throughput statistics, the knee and the recommendation on synthetic curves (no TensorFlow)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchfit.core.recommend import (
    MemoryCriterion,
    ThroughputCriterion,
    TuneFacts,
    interpolate_throughput,
    plan_target,
    recommend,
)
from batchfit.core.throughput import (
    geometric_grid,
    knee,
    median_error,
    needs_more_windows,
    steps_per_window,
    summarize_windows,
)
from batchfit.errors import InvalidInputError
from batchfit.results import Recommendation, TargetPlan, Verdict


def saturating(b: float, peak: float = 5000.0, half: float = 64.0) -> float:
    """A throughput curve that saturates: peak * b / (b + half)."""
    return peak * b / (b + half)


# -- grids and windows --------------------------------------------------------------------------

def test_grid_is_powers_of_two_and_ends_at_the_largest_fit() -> None:
    assert geometric_grid(481) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 481]
    assert geometric_grid(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert geometric_grid(1) == [1]


def test_grid_respects_granularity() -> None:
    grid = geometric_grid(300, granularity=8)
    assert all(b % 8 == 0 for b in grid)
    assert grid[0] == 8 and grid[-1] == 296


def test_grid_rejects_bad_input() -> None:
    with pytest.raises(InvalidInputError, match="largest"):
        geometric_grid(0)
    with pytest.raises(InvalidInputError, match="factor"):
        geometric_grid(10, factor=1.0)


def test_steps_per_window_gives_each_size_the_same_wall_time() -> None:
    window = 0.3
    for step in (0.001, 0.004, 0.02, 0.1):
        n = steps_per_window(step, window)
        assert abs(n * step - window) <= step  # within one step of the target
    assert steps_per_window(2.0, window) == 1  # a step longer than the window: one step
    with pytest.raises(InvalidInputError):
        steps_per_window(0.0, window)


def test_window_summary_is_the_median_with_its_spread() -> None:
    s = summarize_windows(10, 5, [1.0, 0.5, 2.0])
    assert s.samples_per_second == pytest.approx(50.0)
    assert (s.low, s.high) == (pytest.approx(25.0), pytest.approx(100.0))
    assert s.step_seconds == pytest.approx(0.2)
    assert s.cv > 0.5
    assert summarize_windows(10, 5, [1.0, 1.0]).cv == 0.0
    with pytest.raises(InvalidInputError):
        summarize_windows(10, 5, [])


def test_median_error_shrinks_with_more_windows_and_ignores_one_slow_window() -> None:
    rng = __import__("random").Random(1)
    few = [1000 * (1 + rng.gauss(0, 0.05)) for _ in range(5)]
    many = few + [1000 * (1 + rng.gauss(0, 0.05)) for _ in range(40)]
    assert median_error(many) < median_error(few)
    assert median_error(many) == pytest.approx(1.2533 * 0.05 / math.sqrt(45), rel=0.35)
    steady = [1000.0, 1010.0, 990.0, 1005.0, 995.0]
    burst = steady[:4] + [400.0]  # one window slowed by other work on the machine
    assert median_error(burst) < 3 * median_error(steady)  # the stdev alone would be 10x
    assert median_error([5.0]) == math.inf
    assert median_error([5.0, 5.0]) == 0.0
    with pytest.raises(InvalidInputError):
        median_error([1.0, -1.0])


@given(st.lists(st.floats(1.0, 1e6), min_size=2, max_size=30), st.floats(1e-4, 0.5))
def test_more_windows_only_between_minimum_and_maximum(rates, target) -> None:
    n = len(rates)
    assert needs_more_windows(rates, minimum=n + 1, maximum=n + 5, target_error=target)
    assert not needs_more_windows(rates, minimum=2, maximum=n, target_error=target)
    if n < 30:
        assert needs_more_windows(rates, minimum=2, maximum=40, target_error=target) == (
            median_error(rates) > target)
    with pytest.raises(InvalidInputError):
        needs_more_windows(rates, minimum=5, maximum=4, target_error=target)


# -- the knee -----------------------------------------------------------------------------------

def test_knee_on_a_saturating_curve() -> None:
    sizes = [2**i for i in range(11)]
    rates = [saturating(b) for b in sizes]
    k = knee(sizes, rates, tolerance=0.05)
    best = max(rates)
    assert rates[sizes.index(k)] >= 0.95 * best
    smaller = [b for b in sizes if b < k]
    assert all(rates[sizes.index(b)] < 0.95 * best for b in smaller)


def test_knee_is_the_largest_size_when_throughput_keeps_growing() -> None:
    sizes = [1, 2, 4, 8]
    assert knee(sizes, [10.0, 20.0, 40.0, 80.0]) == 8


def test_knee_with_a_dip_after_the_peak() -> None:
    # throughput falls past 64 (cache effects): the knee is at or before the peak
    assert knee([16, 32, 64, 128, 256], [800.0, 1500.0, 2000.0, 1700.0, 1200.0]) == 64


def test_knee_tolerance_zero_is_the_argmax() -> None:
    assert knee([1, 2, 3], [5.0, 9.0, 7.0], tolerance=0.0) == 2


@given(st.lists(st.floats(1.0, 1e6), min_size=1, max_size=12), st.floats(0.0, 0.5))
def test_knee_properties(rates, tol) -> None:
    sizes = list(range(1, len(rates) + 1))
    k = knee(sizes, rates, tolerance=tol)
    assert k in sizes
    assert rates[k - 1] >= (1 - tol) * max(rates)
    assert all(r < (1 - tol) * max(rates) for r in rates[:k - 1])


# -- the recommendation -------------------------------------------------------------------------

def facts(max_batch=1000, safe=900, sizes=(16, 32, 64, 128, 256, 512, 900, 1000), **kw):
    return TuneFacts(max_batch=max_batch, safe_batch=safe, batch_sizes=tuple(sizes),
                     throughputs=tuple(saturating(b) for b in sizes), **kw)


def test_throughput_decides_when_the_knee_is_below_the_memory_cap() -> None:
    rec = recommend(facts())
    assert rec.decided_by == "throughput"
    assert rec.batch_size == knee(facts().batch_sizes, facts().throughputs)
    assert "stops improving past" in rec.reasons[0]
    assert any("largest batch that fits" in r for r in rec.reasons[1:])


def test_a_slower_largest_size_is_said_in_words() -> None:
    # The knee is the best size and the largest is a little slower: "-0%" read as nonsense.
    for largest, words in ((997.0, "no faster at 321"), (930.0, "7% slower at 321")):
        f = TuneFacts(max_batch=321, safe_batch=300, batch_sizes=(32, 64, 128, 321),
                      throughputs=(500.0, 800.0, 1000.0, largest))
        reason = recommend(f).reasons[0]
        assert reason.startswith("throughput stops improving past 128: ") and words in reason
        assert "-" not in reason.split(":")[1]


def test_memory_decides_when_throughput_grows_past_what_fits() -> None:
    f = facts(max_batch=100, safe=90, sizes=(8, 16, 32, 64, 90, 100))
    rec = recommend(f)
    assert rec.decided_by in ("memory", "throughput")
    assert rec.batch_size <= 90  # never above the safe size
    # when the knee (100, still growing) is above the safe size, memory decides
    f2 = TuneFacts(max_batch=100, safe_batch=90, batch_sizes=(8, 16, 32, 64, 100),
                   throughputs=(100.0, 200.0, 400.0, 800.0, 1600.0))
    rec2 = recommend(f2)
    assert (rec2.batch_size, rec2.decided_by) == (90, "memory")
    assert "throughput would take 100" in rec2.reasons[0]


def test_reason_states_gain_and_memory_cost() -> None:
    f = facts(bytes_at={b: 1e6 + 1e5 * b for b in (16, 32, 64, 128, 256, 512, 900, 1000)})
    rec = recommend(f)
    assert "memory" in rec.reasons[0] and "%" in rec.reasons[0]


def test_recommendation_respects_granularity() -> None:
    f = TuneFacts(max_batch=100, safe_batch=90, batch_sizes=(8, 16, 100),
                  throughputs=(1.0, 2.0, 4.0), granularity=8)
    assert recommend(f).batch_size % 8 == 0


class PreferSmall:
    """A further criterion, as the noise scale will add: proposes a size, higher priority."""

    name = "goodput"

    def judge(self, facts: TuneFacts) -> Verdict:
        return Verdict("goodput", int(facts.extras["noise_scale"]), "propose", priority=20,
                       reason=f"statistical efficiency falls past {facts.extras['noise_scale']}")


def test_a_new_criterion_plugs_in_and_decides() -> None:
    f = facts(extras={"noise_scale": 48})
    rec = recommend(f, [MemoryCriterion(), ThroughputCriterion(), PreferSmall()])
    assert (rec.batch_size, rec.decided_by) == (48, "goodput")
    assert any("stops improving" in r for r in rec.reasons)  # the knee is still reported
    assert {v.criterion for v in rec.verdicts} == {"memory", "throughput", "goodput"}


def test_no_throughput_measured_falls_back_to_memory() -> None:
    rec = recommend(TuneFacts(max_batch=50, safe_batch=40))
    assert (rec.batch_size, rec.decided_by) == (40, "memory")


def test_recommendation_round_trips_through_json() -> None:
    rec = recommend(facts())
    assert Recommendation.from_json(rec.to_json()) == rec


# -- target batch plans -------------------------------------------------------------------------

def test_target_that_fits_needs_no_accumulation() -> None:
    p = plan_target(256, facts())
    assert (p.fits, p.micro_batch, p.accumulation_steps) == (True, 256, 1)


@pytest.mark.parametrize("target", [1024, 1000, 4096, 1021, 3000, 7919])
def test_target_that_does_not_fit_is_reached_by_accumulation(target) -> None:
    f = facts(max_batch=300, safe=270, sizes=(16, 64, 256, 270, 300))
    p = plan_target(target, f)
    assert not p.fits
    assert p.micro_batch <= 270
    assert p.micro_batch * p.accumulation_steps == p.effective_batch >= target
    assert p.accumulation_steps == math.ceil(target / 270) or target % p.accumulation_steps == 0
    if target % p.accumulation_steps == 0 and (target // p.accumulation_steps) <= 270:
        assert p.effective_batch == target
    assert f"gradient_accumulation_steps={p.accumulation_steps}" in p.summary
    assert p.relative_to_best is not None and 0 < p.relative_to_best <= 1
    assert TargetPlan.from_dict(p.to_dict()) == p


def test_target_plan_exact_divisor() -> None:
    p = plan_target(1024, facts(max_batch=300, safe=270, sizes=(64, 256)))
    assert (p.micro_batch, p.accumulation_steps, p.effective_batch) == (256, 4, 1024)


def test_target_plan_granularity() -> None:
    f = TuneFacts(max_batch=300, safe_batch=270, batch_sizes=(64,), throughputs=(1.0,),
                  granularity=8)
    p = plan_target(1000, f)
    assert p.micro_batch % 8 == 0 and p.effective_batch >= 1000


def test_bad_target_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="target"):
        plan_target(0, facts())


def test_interpolation_in_log_batch() -> None:
    assert interpolate_throughput([10, 100], [1.0, 2.0], 10**1.5) == pytest.approx(1.5)
    assert interpolate_throughput([10, 100], [1.0, 2.0], 200) is None


# -- the goodput criterion (gradient noise scale) -----------------------------------------------

def test_goodput_decides_when_a_noise_scale_is_known() -> None:
    from batchfit.core.recommend import GoodputCriterion  # noqa: F401 - part of the defaults

    f = facts(extras={"noise_scale": 50.0})
    rec = recommend(f)
    assert rec.decided_by == "goodput"
    knee_size = knee(f.batch_sizes, f.throughputs)
    assert rec.batch_size < knee_size  # a small noise scale: more samples per step are wasted
    assert "noise scale" in rec.reasons[0]
    assert any("stops improving" in r for r in rec.reasons)  # the knee is still reported


def test_goodput_has_no_opinion_without_a_noise_scale() -> None:
    rec = recommend(facts())
    assert "goodput" not in {v.criterion for v in rec.verdicts}


def test_large_noise_scale_favours_large_batches_within_the_cap() -> None:
    f = facts(extras={"noise_scale": 1e9})
    rec = recommend(f)
    assert rec.decided_by == "goodput" and rec.batch_size == 900  # the cap (safe size)


@given(st.floats(1.0, 1e5))
def test_goodput_choice_lies_between_smallest_probed_and_cap(noise) -> None:
    f = facts(extras={"noise_scale": noise})
    rec = recommend(f)
    assert min(f.batch_sizes) <= rec.batch_size <= f.safe_batch
