"""Shrink policies and micro-batch arithmetic: pure logic, no TensorFlow."""

from __future__ import annotations

import numpy as np
import pytest

from batchfit.core.shrink import (
    HalvingShrink,
    MemoryModelShrink,
    ShrinkPolicy,
    plan_micro_batches,
    split_sizes,
)
from batchfit.errors import InvalidInputError
from batchfit.results import MemoryModel


def test_halving_halves_and_gives_up_at_one() -> None:
    p = HalvingShrink()
    assert [p.next_size(b, []) for b in (64, 7, 2, 1)] == [32, 3, 1, None]
    assert isinstance(p, ShrinkPolicy)


def test_memory_model_shrink_uses_the_given_model_and_budget() -> None:
    model = MemoryModel(fixed_bytes=100.0, per_sample_bytes=10.0, r_squared=1.0, points=3)
    p = MemoryModelShrink(memory_model=model, budget_bytes=1000, headroom=0.0)
    assert p.next_size(128, []) == 90          # 100 + 10 * 90 = 1000
    assert MemoryModelShrink(memory_model=model, budget_bytes=1000).next_size(128, []) == 80


def test_memory_model_shrink_fits_the_two_largest_sizes_seen() -> None:
    p = MemoryModelShrink(budget_bytes=1000, headroom=0.0)
    obs = [(4, True, 900.0), (10, True, 200.0), (20, True, 300.0), (64, False, None)]
    # the line says 90 fit, yet 64 failed: the model is wrong near the limit, so halve
    assert p.next_size(64, obs) == 32
    assert p.next_size(100, obs) == 90


def test_memory_model_shrink_without_budget_stays_under_the_failed_size() -> None:
    p = MemoryModelShrink(headroom=0.1)
    # line 100 + 10 b; the failed size 100 (1100 bytes) did not fit: 0.9 * 1100 = 990 -> 89
    assert p.next_size(100, [(10, True, 200.0), (20, True, 300.0)]) == 89


@pytest.mark.parametrize("obs", [
    [],                                          # nothing measured
    [(10, True, 200.0)],                         # one size is no line
    [(10, True, 300.0), (20, True, 200.0)],      # falling memory: no usable slope
    [(10, True, None), (20, True, None)],        # no allocator statistics
    [(10, False, 200.0), (20, False, 300.0)],    # failures carry no peak evidence
])
def test_memory_model_shrink_falls_back_to_halving(obs) -> None:
    assert MemoryModelShrink(budget_bytes=10_000).next_size(64, obs) == 32


def test_policies_refuse_bad_arguments() -> None:
    with pytest.raises(InvalidInputError):
        HalvingShrink().next_size(0, [])
    with pytest.raises(InvalidInputError):
        MemoryModelShrink(headroom=1.0)
    with pytest.raises(InvalidInputError):
        MemoryModelShrink(budget_bytes=0)


def test_split_sizes_differ_by_at_most_one() -> None:
    assert split_sizes(10, 3) == (4, 3, 3)
    assert split_sizes(5, 5) == (1, 1, 1, 1, 1)
    with pytest.raises(InvalidInputError):
        split_sizes(3, 4)


def test_plan_prefers_an_even_split() -> None:
    assert plan_micro_batches(64, 64).sizes == (64,)
    assert plan_micro_batches(64, 32).sizes == (32, 32)
    assert plan_micro_batches(128, 50).sizes == (32, 32, 32, 32)
    assert plan_micro_batches(96, 40).steps == 3
    assert plan_micro_batches(10, 100).steps == 1
    uneven = plan_micro_batches(127, 64)
    assert uneven.sizes == (64, 63) and not uneven.even and uneven.micro_batch_size == 64


def test_plan_invariants_over_a_grid() -> None:
    rng = np.random.default_rng(0)
    for _ in range(500):
        b = int(rng.integers(1, 600))
        m = int(rng.integers(1, 700))
        plan = plan_micro_batches(b, m)
        assert sum(plan.sizes) == b
        assert max(plan.sizes) <= m
        assert max(plan.sizes) - min(plan.sizes) <= 1
        minimal = -(-b // min(m, b))
        assert minimal <= plan.steps <= max(minimal, 2 * minimal)
        assert plan.even or plan.steps == minimal


def test_plan_refuses_bad_sizes() -> None:
    with pytest.raises(InvalidInputError):
        plan_micro_batches(0, 4)
    with pytest.raises(InvalidInputError):
        plan_micro_batches(8, 4, max_extra_steps=0.5)
