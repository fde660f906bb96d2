"""Unit tests of batchfit.core.memory_model: the linear memory model and its local variant."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchfit.core.memory_model import fit_memory_model, local_model, local_pair
from batchfit.errors import InvalidInputError
from batchfit.results import MemoryModel


def test_two_points_give_the_line_through_them() -> None:
    m = fit_memory_model([(4, 140.0), (12, 300.0)])
    assert isinstance(m, MemoryModel)
    assert (m.fixed_bytes, m.per_sample_bytes, m.r_squared, m.points) == (60.0, 20.0, None, 2)


def test_least_squares_with_r_squared() -> None:
    pts = [(8, 180.0), (16, 260.0), (32, 420.0), (64, 740.0)]
    m = fit_memory_model(pts)
    assert m.fixed_bytes == pytest.approx(100.0)
    assert m.per_sample_bytes == pytest.approx(10.0)
    assert m.r_squared == pytest.approx(1.0)
    assert m.points == 4
    noisy = fit_memory_model([(8, 180.0), (16, 300.0), (32, 400.0), (64, 760.0)])
    assert 0.9 < noisy.r_squared < 1.0


def test_repeated_sizes_and_flat_memory() -> None:
    m = fit_memory_model([(8, 100.0), (8, 100.0), (16, 100.0)])
    assert m.per_sample_bytes == pytest.approx(0.0) and m.r_squared == 1.0


@pytest.mark.parametrize("points", [
    [], [(8, 1.0)], [(8, 1.0), (8, 2.0)], [(8, 1.0), (8, 1.0), (8, 3.0)],
])
def test_needs_two_distinct_sizes(points: list[tuple[int, float]]) -> None:
    with pytest.raises(InvalidInputError, match="2 different batch sizes"):
        fit_memory_model(points)


@pytest.mark.parametrize("points", [
    [(0, 1.0), (2, 2.0)], [(1.5, 1.0), (2, 2.0)], [(1, -1.0), (2, 2.0)],
    [(1, math.nan), (2, 2.0)], [(1, math.inf), (2, 2.0)], [(1,), (2, 2.0)], [(True, 1.0), (2, 2.0)],
    [(1, "a"), (2, 2.0)], 5,
])
def test_rejects_malformed_points(points: object) -> None:
    with pytest.raises(InvalidInputError):
        fit_memory_model(points)  # type: ignore[arg-type]


@given(fixed=st.floats(0, 1e10), per_sample=st.floats(1.0, 1e8),
       sizes=st.lists(st.integers(1, 10_000), min_size=2, max_size=8, unique=True))
def test_recovers_any_exact_line(fixed: float, per_sample: float, sizes: list[int]) -> None:
    m = fit_memory_model([(b, fixed + per_sample * b) for b in sizes])
    assert m.per_sample_bytes == pytest.approx(per_sample, rel=1e-6)
    assert m.predict(20_000) == pytest.approx(fixed + per_sample * 20_000, rel=1e-6)


def test_local_model_uses_the_two_points_nearest_the_limit() -> None:
    # 64..128 linear at 10 B/sample; a +34% jump at 129; small sizes dominated by fixed cost.
    pts = [(1, 95.0), (8, 100.0), (64, 660.0), (128, 1300.0), (129, 1742.0)]
    assert local_model(pts, near=90).per_sample_bytes == pytest.approx(10.0)
    assert fit_memory_model(pts).per_sample_bytes > 11        # the global line is pulled off
    near_jump = local_model(pts, near=129)
    assert near_jump.per_sample_bytes == pytest.approx(442.0)  # 128 and 129
    assert near_jump.points == 2 and near_jump.r_squared is None


def test_local_pair_min_span_and_averaging() -> None:
    pts = [(8, 100.0), (96, 980.0), (100, 1000.0), (100, 1040.0)]
    assert local_pair(pts, near=100) == ((100, 1020.0), (96, 980.0))
    assert local_pair(pts, near=100, min_span=10) == ((100, 1020.0), (8, 100.0))
    # no point far enough: the farthest one is used
    assert local_pair(pts[1:], near=100, min_span=50) == ((100, 1020.0), (96, 980.0))
