"""Fit the linear memory model ``peak(batch) = fixed + per_sample * batch`` to measured peaks.

A training step's peak memory is, to a good approximation, a constant part (weights, optimizer
state, batch-independent workspace) plus a part proportional to the batch (activations,
gradients of activations, inputs). Two caveats shape the API:

* small batches (1..8) are dominated by the constant part and by allocator rounding, so a
  slope from them alone is imprecise: :func:`fit_memory_model` gives the global least-squares
  line, which is right for reports;
* memory can *jump* between far-apart sizes (a kernel switching algorithm: +13% to +34%
  between neighbouring batch sizes), so near the limit the best evidence is the line through
  the measurements closest to it: :func:`local_model`, which guided search uses.

Example:

>>> m = fit_memory_model([(8, 180.0), (16, 260.0), (32, 420.0)])
>>> round(m.fixed_bytes), round(m.per_sample_bytes), m.r_squared
(100, 10, 1.0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..errors import InvalidInputError
from ..results import MemoryModel
from .validate import is_int

__all__ = ["fit_memory_model", "local_model"]


def _clean(points: Sequence[tuple[int, float]]) -> list[tuple[int, float]]:
    """Validate ``(batch_size, peak_bytes)`` pairs; return them as ``(int, float)``."""
    try:
        items = list(points)
    except TypeError:
        raise InvalidInputError(
            f"points must be a sequence of (batch_size, peak_bytes) pairs, got {points!r}"
        ) from None
    out: list[tuple[int, float]] = []
    for item in items:
        try:
            b, m = item
        except (TypeError, ValueError):
            raise InvalidInputError(
                f"each point must be a (batch_size, peak_bytes) pair, got {item!r}"
            ) from None
        if not is_int(b) or b < 1:
            raise InvalidInputError(f"batch size must be an integer >= 1, got {b!r} in {item!r}")
        if isinstance(m, bool):
            raise InvalidInputError(f"peak bytes must be a number, got {m!r} in {item!r}")
        try:
            mf = float(m)
        except (TypeError, ValueError):
            raise InvalidInputError(f"peak bytes must be a number, got {m!r} in {item!r}") from None
        if not math.isfinite(mf) or mf < 0:
            raise InvalidInputError(
                f"peak bytes must be finite and >= 0, got {m!r} in {item!r}")
        out.append((int(b), mf))
    return out


def _need_two_sizes(points: list[tuple[int, float]]) -> None:
    if len({b for b, _ in points}) < 2:
        sizes = sorted({b for b, _ in points})
        raise InvalidInputError(
            "a memory model needs peaks measured at >= 2 different batch sizes, got "
            f"{len(points)} point(s) at size(s) {sizes}; probe one more batch size")


def fit_memory_model(points: Sequence[tuple[int, float]]) -> MemoryModel:
    """Least-squares line of peak bytes on batch size.

    With exactly two points this is the line through them (``r_squared`` is ``None``: two
    points always fit a line perfectly). With three or more, ``r_squared`` tells how linear
    the memory is; a value well under 0.99 hints at a kernel switching algorithm between the
    sizes measured. Repeated batch sizes are allowed (each counts as one observation).

    Args:
        points: ``(batch_size, peak_bytes)`` pairs, e.g. from probes that fit.

    Returns:
        A :class:`batchfit.results.MemoryModel` (``points`` is ``len(points)``).

    Raises:
        InvalidInputError: with fewer than two distinct batch sizes, or a malformed point
            (batch size < 1, negative or non-finite bytes).

    Example:

    >>> fit_memory_model([(2, 30.0), (4, 50.0)]).predict(10)
    110.0
    """
    pts = _clean(points)
    _need_two_sizes(pts)
    x = np.array([b for b, _ in pts], dtype=np.float64)
    y = np.array([m for _, m in pts], dtype=np.float64)
    if len(pts) == 2:
        slope = (y[1] - y[0]) / (x[1] - x[0])
        return MemoryModel(fixed_bytes=float(y[0] - slope * x[0]),
                           per_sample_bytes=float(slope), r_squared=None, points=2)
    x_mean, y_mean = x.mean(), y.mean()
    sxx = float(((x - x_mean) ** 2).sum())
    slope = float(((x - x_mean) * (y - y_mean)).sum()) / sxx
    fixed = float(y_mean - slope * x_mean)
    residual = y - (fixed + slope * x)
    ss_res = float((residual**2).sum())
    ss_tot = float(((y - y_mean) ** 2).sum())
    if ss_tot > 0:
        r2 = 1.0 - ss_res / ss_tot
    else:  # every peak identical: a flat line explains them perfectly
        r2 = 1.0
    return MemoryModel(fixed_bytes=fixed, per_sample_bytes=slope,
                       r_squared=float(min(r2, 1.0)), points=len(pts))


def local_model(points: Sequence[tuple[int, float]], near: float, *,
                min_span: int = 1) -> MemoryModel:
    """The line through the two measured sizes closest to ``near``.

    Memory is locally linear but can jump between far-apart sizes, so near the limit the two
    measurements closest to it predict better than a global fit that small, fixed-cost
    dominated sizes pull off. Peaks measured more than once at one size are averaged first.
    The first point is the size closest to ``near``; the second is the closest of those at
    least ``min_span`` away from the first (a wider base damps allocator rounding noise), or,
    if none is that far, the farthest one.

    Args:
        points: ``(batch_size, peak_bytes)`` pairs.
        near: the batch size the model should be good at (e.g. the largest size that fits).
        min_span: smallest preferred distance between the two sizes used. Default 1.

    Returns:
        A two-point :class:`batchfit.results.MemoryModel` (``r_squared`` ``None``,
        ``points`` 2).

    Raises:
        InvalidInputError: with fewer than two distinct batch sizes or a malformed point.

    Example:

    >>> pts = [(8, 100.0), (64, 660.0), (128, 1300.0), (129, 1700.0)]
    >>> local_model(pts, near=90).per_sample_bytes  # the line through 64 and 128
    10.0
    """
    anchor, partner = local_pair(points, near, min_span=min_span)
    return fit_memory_model([anchor, partner])


def local_pair(points: Sequence[tuple[int, float]], near: float, *,
               min_span: int = 1) -> tuple[tuple[int, float], tuple[int, float]]:
    """The two ``(batch_size, peak_bytes)`` points :func:`local_model` draws its line through.

    Args:
        points: ``(batch_size, peak_bytes)`` pairs.
        near: the batch size the line should be good at.
        min_span: smallest preferred distance between the two sizes. Default 1.

    Returns:
        ``(anchor, partner)``: the point closest to ``near`` (ties: the larger size), then its
        partner as described in :func:`local_model`.

    Example:

    >>> local_pair([(8, 1.0), (64, 2.0), (128, 3.0)], near=100)
    ((128, 3.0), (64, 2.0))
    """
    pts = _clean(points)
    _need_two_sizes(pts)
    sums: dict[int, list[float]] = {}
    for b, m in pts:
        sums.setdefault(b, []).append(m)
    averaged = [(b, float(sum(ms) / len(ms))) for b, ms in sums.items()]
    by_distance = sorted(averaged, key=lambda p: (abs(p[0] - near), -p[0]))
    anchor = by_distance[0]
    rest = by_distance[1:]
    wide = [p for p in rest if abs(p[0] - anchor[0]) >= max(1, min_span)]
    if wide:
        partner = wide[0]
    else:
        partner = max(rest, key=lambda p: (abs(p[0] - anchor[0]), p[0]))
    return anchor, partner
