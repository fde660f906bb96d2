"""Throughput statistics, pure: size grids, step-count adaptation, window summaries, the knee.

Nothing here imports TensorFlow; the backend measures (``Backend.measure_throughput``,
orchestrated by :mod:`batchfit.verbs.throughput`), this module decides what to measure and what
the measurements say.

Example:

>>> geometric_grid(100)
[1, 2, 4, 8, 16, 32, 64, 100]
>>> knee([8, 16, 32, 64], [1000.0, 1900.0, 2500.0, 2550.0], tolerance=0.05)
32
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import InvalidInputError
from .validate import check_int

__all__ = ["TimingPlan", "WindowStats", "drift", "geometric_grid", "knee", "knee_range", "median_error",
           "needs_more_windows", "steps_per_window", "summarize_windows", "window_rates"]


@dataclass(frozen=True)
class TimingPlan:
    """How each batch size is timed: windows of about equal wall time, after untimed warm-up.

    Args:
        window_seconds: wall time each timed window aims at.
        windows: timed windows per size at least (the median is reported).
        max_windows: timed windows per size at most; past ``windows`` a size gets more while
            its median's estimated relative standard error is above ``target_error``.
        target_error: the relative standard error of the median to reach.
        warmup_steps: untimed steps per size before timing (tracing happens here).

    Example:

    >>> TimingPlan(window_seconds=0.3, windows=5, max_windows=15, target_error=0.02,
    ...            warmup_steps=2).max_windows
    15
    """

    window_seconds: float
    windows: int
    max_windows: int
    target_error: float
    warmup_steps: int

    def needs_more(self, rates: Sequence[float]) -> bool:
        """Whether a size whose windows gave ``rates`` (samples/s) gets another window."""
        return needs_more_windows(rates, minimum=self.windows, maximum=self.max_windows,
                                  target_error=self.target_error)


def geometric_grid(largest: int, *, smallest: int = 1, factor: float = 2.0,
                   granularity: int = 1) -> list[int]:
    """Batch sizes ``smallest, smallest*factor, ...`` up to ``largest``, ``largest`` included.

    Sizes are rounded to multiples of ``granularity`` (never below it) and deduplicated; the
    largest size (the largest batch that fits) is always measured, since it is a candidate.

    Args:
        largest: the largest size to include (e.g. the largest batch that fits).
        smallest: the first size (default 1).
        factor: ratio between neighbours, > 1 (default 2: powers of two).
        granularity: only multiples of this (e.g. 8 for tensor cores).
    """
    for name, value in (("largest", largest), ("smallest", smallest), ("granularity", granularity)):
        check_int(name, value, minimum=1)
    if not factor > 1:
        raise InvalidInputError(f"factor must be > 1, got {factor!r}")
    smallest = max(smallest, granularity)
    if largest < smallest:
        return [max(granularity, (largest // granularity) * granularity)]
    sizes: list[int] = []
    x = float(smallest)
    while x <= largest * (1 + 1e-9):
        b = max(granularity, round(x / granularity) * granularity)
        if b <= largest and (not sizes or b > sizes[-1]):
            sizes.append(b)
        x *= factor
    top = (largest // granularity) * granularity
    if top >= granularity and top not in sizes:
        sizes.append(top)
    return sorted(set(sizes))


def steps_per_window(step_seconds: float, window_seconds: float, *, minimum: int = 1,
                     maximum: int = 10_000) -> int:
    """How many steps make a timed window of about ``window_seconds``.

    Adapting the step count to the measured step time makes every batch size cost about the
    same wall time: a size whose step takes 5 ms gets 40 steps per 0.2 s window, one whose step
    takes 100 ms gets 2, and a step longer than the window gets ``minimum``.

    Example:

    >>> steps_per_window(0.005, 0.2), steps_per_window(0.1, 0.2), steps_per_window(1.0, 0.2)
    (40, 2, 1)
    """
    if not step_seconds > 0 or not math.isfinite(step_seconds):
        raise InvalidInputError(f"step_seconds must be a positive number, got {step_seconds!r}")
    if not window_seconds > 0:
        raise InvalidInputError(f"window_seconds must be > 0, got {window_seconds!r}")
    return int(min(maximum, max(minimum, round(window_seconds / step_seconds))))


@dataclass(frozen=True)
class WindowStats:
    """Summary of the timed windows at one batch size.

    Args:
        samples_per_second: median over windows of ``steps * batch / seconds``.
        low: the slowest window's throughput.
        high: the fastest window's throughput.
        cv: coefficient of variation of the window throughputs (stdev / mean; 0 for one window).
        step_seconds: median seconds per step.
        median_error: estimated relative standard error of the median (see
            :func:`median_error`).
    """

    samples_per_second: float
    low: float
    high: float
    cv: float
    step_seconds: float
    median_error: float


def window_rates(batch_size: int, steps: int, window_seconds: Sequence[float]) -> list[float]:
    """Throughput (samples/s) of each timed window of ``steps`` steps at ``batch_size``.

    Example:

    >>> [round(r) for r in window_rates(32, 10, [0.1, 0.2])]
    [3200, 1600]
    """
    if batch_size < 1 or steps < 1:
        raise InvalidInputError("batch_size and steps must be >= 1")
    times = [float(t) for t in window_seconds]
    if any(not t > 0 for t in times):
        raise InvalidInputError(f"window times must be positive, got {times!r}")
    return [batch_size * steps / t for t in times]


def summarize_windows(batch_size: int, steps: int, window_seconds: Sequence[float]) -> WindowStats:
    """Median throughput of the timed windows, with its spread.

    Example:

    >>> s = summarize_windows(32, 10, [0.10, 0.11, 0.09])
    >>> round(s.samples_per_second), round(s.low), round(s.high)
    (3200, 2909, 3556)
    """
    times = [float(t) for t in window_seconds]
    if not times:
        raise InvalidInputError("no window times given")
    rates = window_rates(batch_size, steps, times)
    mean = statistics.fmean(rates)
    cv = statistics.stdev(rates) / mean if len(rates) > 1 else 0.0
    return WindowStats(samples_per_second=statistics.median(rates), low=min(rates),
                       high=max(rates), cv=cv, step_seconds=statistics.median(times) / steps,
                       median_error=median_error(rates))


def median_error(values: Sequence[float]) -> float:
    """Estimated relative standard error of the median of ``values`` (``inf`` below two).

    The spread is the median absolute deviation scaled to a standard deviation (1.4826 MAD:
    one window slowed by a burst of other work barely moves it, as it barely moves the
    median), and the median's standard error is ``1.2533 * sigma / sqrt(n)`` (its asymptotic
    efficiency under a normal spread). Timings are continuous, so the deviations do not tie
    at zero by chance; identical values do give 0.

    Example:

    >>> round(median_error([100.0, 102.0, 98.0, 101.0, 99.0]), 4)
    0.0083
    >>> median_error([100.0])
    inf
    """
    xs = [float(v) for v in values]
    if len(xs) < 2:
        return math.inf
    if any(not (math.isfinite(v) and v > 0) for v in xs):
        raise InvalidInputError(f"values must be positive and finite, got {xs!r}")
    med = statistics.median(xs)
    mad = statistics.median(abs(v - med) for v in xs)
    return 1.2533 * 1.4826 * mad / math.sqrt(len(xs)) / med


def needs_more_windows(values: Sequence[float], *, minimum: int, maximum: int,
                       target_error: float) -> bool:
    """Whether a size should get another timed window.

    Every size gets ``minimum`` windows; past that, more only while the median's estimated
    relative standard error (:func:`median_error`) is above ``target_error``, up to
    ``maximum`` windows. Noisy sizes get the extra time, steady ones stop early.

    Example:

    >>> needs_more_windows([100.0, 101.0], minimum=3, maximum=9, target_error=0.02)
    True
    >>> needs_more_windows([100.0, 101.0, 99.0], minimum=3, maximum=9, target_error=0.02)
    False
    >>> needs_more_windows([100.0, 130.0, 80.0], minimum=3, maximum=9, target_error=0.02)
    True
    """
    if minimum < 1 or maximum < minimum:
        raise InvalidInputError(f"need 1 <= minimum <= maximum, got {minimum}, {maximum}")
    n = len(values)
    if n < minimum:
        return True
    if n >= maximum:
        return False
    return median_error(values) > target_error


def knee(batch_sizes: Sequence[int], throughputs: Sequence[float], *,
         tolerance: float = 0.05) -> int:
    """The smallest batch size whose throughput is within ``tolerance`` of the best measured.

    Past the knee a larger batch buys at most ``tolerance`` more samples per second, for more
    memory and, usually, worse generalization per sample.

    Args:
        batch_sizes: the sizes measured (any order).
        throughputs: samples/s at each size (``nan``/``None``-free).
        tolerance: fraction of the best throughput that counts as "as good" (default 0.05).
    """
    if len(batch_sizes) != len(throughputs) or not batch_sizes:
        raise InvalidInputError("batch_sizes and throughputs must be non-empty and of equal length")
    if not 0 <= tolerance < 1:
        raise InvalidInputError(f"tolerance must be a fraction in [0, 1), got {tolerance!r}")
    pairs = sorted(zip(batch_sizes, throughputs))
    if any(not (t >= 0 and math.isfinite(t)) for _, t in pairs):
        raise InvalidInputError("throughputs must be finite and >= 0")
    best = max(t for _, t in pairs)
    return next(b for b, t in pairs if t >= (1 - tolerance) * best)


def knee_range(batch_sizes: Sequence[int], throughputs: Sequence[float],
               errors: Sequence[float | None], *, tolerance: float = 0.05,
               z: float = 2.0) -> tuple[int, int]:
    """The sizes that may be the knee, given each median's measured error: ``(low, high)``.

    Where the curve is flat, the knee of one run is a draw: two neighbours within the tolerance
    of each other swap places from run to run. Each median is known to about ``z`` standard
    errors (``errors``: relative standard errors, :func:`median_error`; ``None`` counts as 0,
    ``inf`` as unknown). ``low`` is the smallest size that *may* be within ``tolerance`` of the
    best (its upper bound reaches the threshold set by the best's lower bound); ``high`` the
    smallest that *surely* is (its lower bound reaches the threshold set by the best's upper
    bound), or the best size itself when none is sure. Every size in between is within the
    tolerance as far as the measurement can tell; ``low`` is the one to recommend, and two runs
    of a steady machine give overlapping ranges where their knees differ.

    Args:
        batch_sizes: the sizes measured (any order).
        throughputs: samples/s at each size.
        errors: relative standard error of each median.
        tolerance: fraction of the best throughput that counts as "as good".
        z: how many standard errors make a bound (2: about 95%).

    Example:

    >>> knee_range([32, 64, 128, 256], [900.0, 1500.0, 1560.0, 1600.0], [0.005] * 4)
    (64, 128)
    >>> knee_range([32, 64, 128, 256], [900.0, 1500.0, 1560.0, 1600.0], [0.0] * 4)
    (128, 128)
    """
    if len(errors) != len(batch_sizes):
        raise InvalidInputError("errors must have one entry per batch size")
    knee(batch_sizes, throughputs, tolerance=tolerance)  # validates sizes, rates, tolerance
    if not (z >= 0 and math.isfinite(z)):
        raise InvalidInputError(f"z must be a finite number >= 0, got {z!r}")
    rows = sorted((b, t, 0.0 if e is None else float(e))
                  for b, t, e in zip(batch_sizes, throughputs, errors))
    if any(math.isnan(e) or e < 0 for _, _, e in rows):
        raise InvalidInputError("errors must be >= 0 (inf for unknown)")
    b_best, t_best, e_best = max(rows, key=lambda r: r[1])

    def bound(t: float, e: float, sign: int) -> float:
        return max(0.0, t * (1 + sign * z * e)) if math.isfinite(e) else (
            math.inf if sign > 0 else 0.0)

    low_threshold = (1 - tolerance) * bound(t_best, e_best, -1)
    high_threshold = (1 - tolerance) * bound(t_best, e_best, +1)
    low = next(b for b, t, e in rows if bound(t, e, +1) >= low_threshold)
    high = next((b for b, t, e in rows if bound(t, e, -1) >= high_threshold), b_best)
    return low, max(low, min(high, b_best))


def drift(before: float, after: float) -> float:
    """Relative change of a fixed workload's rate over a run: ``after / before - 1``.

    The same NumPy workload timed before and after a measurement tells how much the machine
    itself sped up or slowed down meanwhile (other work on a shared machine, clock changes):
    differences between sizes smaller than this are not the model's.

    Example:

    >>> round(drift(1000.0, 950.0), 3)
    -0.05
    """
    if not (before > 0 and after > 0 and math.isfinite(before) and math.isfinite(after)):
        raise InvalidInputError(f"rates must be positive and finite, got {before!r}, {after!r}")
    return after / before - 1
