"""The knee as a range given the timing error, and the machine's drift (no TensorFlow)."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchfit.backend.machine import reference_rate
from batchfit.core.recommend import ThroughputCriterion, TuneFacts, recommend
from batchfit.core.throughput import drift, knee, knee_range, median_error
from batchfit.errors import InvalidInputError

SIZES = [16, 32, 64, 128, 256, 512]


def flat_curve(b: int) -> float:
    """Saturates early: 64, 128, 256 and 512 are within 5% of each other."""
    return 6000.0 * b / (b + 4.0)


def noisy_run(rng: random.Random, windows: int = 5, noise: float = 0.03):
    """One run's medians and their errors, each window's rate off by ``noise`` (relative)."""
    rates, errors = [], []
    for b in SIZES:
        w = [flat_curve(b) * (1 + rng.gauss(0, noise)) for _ in range(windows)]
        rates.append(sorted(w)[windows // 2])
        errors.append(median_error(w))
    return rates, errors


def test_flat_curve_knees_flip_between_runs_but_ranges_overlap() -> None:
    rng = random.Random(7)
    runs = [noisy_run(rng) for _ in range(12)]
    plain = {knee(SIZES, r, tolerance=0.05) for r, _ in runs}
    ranges = [knee_range(SIZES, r, e, tolerance=0.05) for r, e in runs]
    assert len(plain) > 1, "the synthetic curve should reproduce the flip between neighbours"
    # every pair of runs' ranges overlap: the noise is honest, the bounds cover it
    assert all(a[0] <= b[1] and b[0] <= a[1] for a in ranges for b in ranges)
    # without the error bars (z=0) the "ranges" are the plain knees, which do not overlap
    points = [knee_range(SIZES, r, e, tolerance=0.05, z=0.0) for r, e in runs]
    assert not all(a[0] <= b[1] and b[0] <= a[1] for a in points for b in points)


def test_without_error_the_range_is_the_plain_knee() -> None:
    rates = [flat_curve(b) for b in SIZES]
    k = knee(SIZES, rates, tolerance=0.02)
    assert knee_range(SIZES, rates, [0.0] * len(SIZES), tolerance=0.02) == (k, k)
    assert knee_range(SIZES, rates, [None] * len(SIZES), tolerance=0.02) == (k, k)


def test_unknown_error_opens_the_range_to_the_smallest_size() -> None:
    rates = [flat_curve(b) for b in SIZES]
    assert knee_range(SIZES, rates, [math.inf] * len(SIZES))[0] == SIZES[0]


@given(st.lists(st.tuples(st.floats(1.0, 1e6), st.floats(0.0, 0.3)), min_size=1, max_size=10),
       st.floats(0.0, 0.5))
def test_range_brackets_the_plain_knee(rows, tol) -> None:
    sizes = list(range(1, len(rows) + 1))
    rates, errors = [r for r, _ in rows], [e for _, e in rows]
    lo, hi = knee_range(sizes, rates, errors, tolerance=tol)
    best = sizes[max(range(len(rates)), key=rates.__getitem__)]
    assert lo <= knee(sizes, rates, tolerance=tol) <= hi <= max(hi, best)
    assert lo <= best


def test_bad_errors_are_refused() -> None:
    with pytest.raises(InvalidInputError, match="one entry per batch size"):
        knee_range([1, 2], [1.0, 2.0], [0.1])
    with pytest.raises(InvalidInputError, match="errors must be >= 0"):
        knee_range([1, 2], [1.0, 2.0], [0.1, -0.1])
    with pytest.raises(InvalidInputError, match="z must be"):
        knee_range([1, 2], [1.0, 2.0], [0.1, 0.1], z=math.nan)


def test_criterion_proposes_the_smallest_member_and_says_the_range() -> None:
    rates = (900.0, 1500.0, 1560.0, 1600.0)
    f = TuneFacts(max_batch=300, safe_batch=270, batch_sizes=(32, 64, 128, 256),
                  throughputs=rates, errors=(0.005,) * 4)
    v = ThroughputCriterion().judge(f)
    assert v is not None and v.batch_size == 64
    assert "64-128" in v.reason
    assert recommend(f).batch_size == 64
    # the same curve without errors: the plain knee, no range in the reason
    plain = ThroughputCriterion().judge(TuneFacts(max_batch=300, safe_batch=270,
                                                  batch_sizes=(32, 64, 128, 256),
                                                  throughputs=rates))
    assert plain is not None and plain.batch_size == 128 and "lies in" not in plain.reason


def test_facts_refuse_errors_of_the_wrong_length() -> None:
    with pytest.raises(InvalidInputError, match="errors"):
        TuneFacts(max_batch=10, safe_batch=9, batch_sizes=(1, 2), throughputs=(1.0, 2.0),
                  errors=(0.1,))


def test_drift_and_the_reference_workload() -> None:
    assert drift(100.0, 110.0) == pytest.approx(0.1)
    with pytest.raises(InvalidInputError):
        drift(0.0, 1.0)
    with pytest.raises(InvalidInputError):
        reference_rate(seconds=0)
    assert reference_rate(seconds=0.02, windows=2) > 0


def test_throughput_result_keeps_range_and_drift_and_reads_old_json() -> None:
    from batchfit.results import ThroughputPoint, ThroughputResult

    r = ThroughputResult(points=[ThroughputPoint(64, "ok", samples_per_second=10.0)], knee=64,
                         tolerance=0.05, device="CPU:0", window_target_seconds=0.3,
                         gpu_metrics="none", knee_range=[64, 128], machine_drift=-0.03)
    back = ThroughputResult.from_json(r.to_json())
    assert back.knee_range == [64, 128] and back.machine_drift == pytest.approx(-0.03)
    old = r.to_dict()
    del old["knee_range"], old["machine_drift"]
    legacy = ThroughputResult.from_dict(old)
    assert legacy.knee_range is None and legacy.machine_drift is None
