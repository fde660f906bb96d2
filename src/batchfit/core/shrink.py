"""How far to shrink a batch after an out-of-memory error, and how to split a batch into parts.

Pure logic, NumPy-free even: :func:`batchfit.fit` and :func:`batchfit.adaptive_batch_size`
ask a *shrink policy* for the next size to try after a size failed, and split each batch of
the user's size into micro-batches with :func:`plan_micro_batches`.

A policy is any object with ``next_size(failed, observations) -> int | None``:

* ``failed`` is the size that just ran out of memory;
* ``observations`` are ``(size, fits, peak_bytes)`` triples seen so far (``peak_bytes`` may be
  ``None`` when the allocator keeps no statistics);
* the answer is a size in ``[1, failed - 1]``, or ``None`` to give up.

Example:

>>> HalvingShrink().next_size(64, [])
32
>>> plan_micro_batches(128, max_micro=50)
MicroPlan(batch_size=128, steps=4, sizes=(32, 32, 32, 32))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ..errors import InvalidInputError
from .validate import check_int

__all__ = [
    "HalvingShrink",
    "MemoryModelShrink",
    "MicroPlan",
    "Observation",
    "ShrinkPolicy",
    "next_smaller",
    "plan_micro_batches",
    "split_sizes",
]

# (batch size, whether it fit, allocator peak in bytes or None)
Observation = tuple[int, bool, "float | None"]


def _check_size(name: str, value: object) -> int:
    return int(check_int(name, value, minimum=1))  # type: ignore[arg-type]


@runtime_checkable
class ShrinkPolicy(Protocol):
    """What :func:`batchfit.fit` asks after an out-of-memory error: the next size to try."""

    def next_size(self, failed: int, observations: Sequence[Observation]) -> int | None:
        """A size in ``[1, failed - 1]`` to try next, or ``None`` to give up."""
        ...


def next_smaller(policy: ShrinkPolicy, failed: int,
                 observations: Sequence[Observation]) -> int | None:
    """The policy's next size after ``failed``, held to at most ``failed - 1``; ``None`` when
    it gives up or no size of at least 1 is left (a policy answering 1 after 1 failed).

    Example:

    >>> next_smaller(HalvingShrink(), 9, []), next_smaller(HalvingShrink(), 1, [])
    (4, None)
    """
    new = policy.next_size(failed, observations)
    if new is None:
        return None
    new = int(min(new, failed - 1))
    return new if new >= 1 else None


@dataclass(frozen=True)
class HalvingShrink:
    """Halve the failed size (rounding down, never below 1); give up after size 1 failed.

    Example:

    >>> p = HalvingShrink()
    >>> p.next_size(7, []), p.next_size(1, [])
    (3, None)
    """

    def next_size(self, failed: int, observations: Sequence[Observation] = ()) -> int | None:
        failed = _check_size("failed", failed)
        return None if failed <= 1 else max(1, failed // 2)


@dataclass(frozen=True)
class MemoryModelShrink:
    """The largest size a linear memory model says fits, falling back to halving.

    ``peak(b) = fixed_bytes + per_sample_bytes * b`` comes from ``memory_model`` (e.g. the
    ``memory_model`` of a :class:`batchfit.MaxBatchResult`) or, when not given, from the peaks
    of at least two different sizes that fit in ``observations``. With a model and a
    ``budget_bytes``, the answer is the largest ``b < failed`` with
    ``peak(b) <= (1 - headroom) * budget_bytes``. Without a budget, the budget is bounded by
    what is known: the failed size's predicted peak (it did not fit), so the answer is the
    model's size for ``(1 - headroom)`` of that. The answer is never larger than halving
    would give only when the model is unusable (fewer than two sizes, a non-positive slope,
    or a prediction outside ``[1, failed - 1]``): then this policy halves. Memory is not
    always linear near the limit (see :mod:`batchfit.core.memory_model`); a size this policy
    proposes that fails again is simply shrunk again.

    Args:
        memory_model: an object with ``fixed_bytes`` and ``per_sample_bytes`` (default:
            fit one from ``observations``).
        budget_bytes: the memory budget, when known (default ``None``).
        headroom: fraction of the budget kept free (default 0.1).

    Example:

    >>> p = MemoryModelShrink(budget_bytes=1000, headroom=0.0)
    >>> p.next_size(100, [(10, True, 200.0), (20, True, 300.0)])  # 100 + 10*b <= 1000
    90
    >>> p.next_size(100, [(10, True, 200.0)])  # one point is no model: halve
    50
    """

    memory_model: object | None = None
    budget_bytes: float | None = None
    headroom: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 <= self.headroom < 1.0:
            raise InvalidInputError(f"headroom must be in [0, 1), got {self.headroom!r}")
        if self.budget_bytes is not None and not self.budget_bytes > 0:
            raise InvalidInputError(f"budget_bytes must be > 0, got {self.budget_bytes!r}")

    def _line(self, observations: Sequence[Observation]) -> tuple[float, float] | None:
        if self.memory_model is not None:
            return (float(self.memory_model.fixed_bytes),  # type: ignore[attr-defined]
                    float(self.memory_model.per_sample_bytes))  # type: ignore[attr-defined]
        peaks: dict[int, list[float]] = {}
        for size, fits, peak in observations:
            if fits and peak is not None and math.isfinite(peak):
                peaks.setdefault(int(size), []).append(float(peak))
        if len(peaks) < 2:
            return None
        # Line through the two largest sizes that fit: the nearest evidence to the limit.
        (b1, m1), (b2, m2) = sorted((b, sum(v) / len(v)) for b, v in peaks.items())[-2:]
        slope = (m2 - m1) / (b2 - b1)
        return m1 - slope * b1, slope

    def next_size(self, failed: int, observations: Sequence[Observation] = ()) -> int | None:
        failed = _check_size("failed", failed)
        if failed <= 1:
            return None
        halved = max(1, failed // 2)
        line = self._line(observations)
        if line is None:
            return halved
        fixed, per_sample = line
        if not per_sample > 0:
            return halved
        budget = self.budget_bytes
        if budget is None:
            budget = fixed + per_sample * failed  # the failed size's peak did not fit
        usable = (1.0 - self.headroom) * budget
        best = math.floor((usable - fixed) / per_sample)
        if not 1 <= best <= failed - 1:
            return halved
        return int(best)


@dataclass(frozen=True)
class MicroPlan:
    """A batch of ``batch_size`` examples run as ``steps`` micro-batches of ``sizes``."""

    batch_size: int
    steps: int
    sizes: tuple[int, ...]

    @property
    def micro_batch_size(self) -> int:
        """The largest micro-batch: the size that must fit in memory."""
        return max(self.sizes)

    @property
    def even(self) -> bool:
        """Whether every micro-batch has the same size (accumulation is then exact)."""
        return len(set(self.sizes)) == 1


def split_sizes(n: int, parts: int) -> tuple[int, ...]:
    """``n`` examples in ``parts`` contiguous parts whose sizes differ by at most one.

    Example:

    >>> split_sizes(10, 3)
    (4, 3, 3)
    """
    n = _check_size("n", n)
    parts = _check_size("parts", parts)
    if parts > n:
        raise InvalidInputError(f"cannot split {n} examples into {parts} non-empty parts")
    q, r = divmod(n, parts)
    return tuple(q + 1 if i < r else q for i in range(parts))


def plan_micro_batches(batch_size: int, max_micro: int, *, max_extra_steps: float = 2.0
                       ) -> MicroPlan:
    """Split a batch into the fewest micro-batches of at most ``max_micro`` examples.

    Gradient accumulation averages the micro-batches' mean-loss gradients with equal weight,
    which equals the whole batch's gradient exactly only when the micro-batches are of equal
    size. So an even split (a divisor of ``batch_size``) is preferred when it needs at most
    ``max_extra_steps`` times the minimal number of steps; otherwise the minimal number of
    steps is used with sizes differing by one (an error of order ``1/batch_size`` in the
    weight of one example per micro-batch).

    Args:
        batch_size: the examples in the batch (>= 1).
        max_micro: the largest micro-batch that fits (>= 1).
        max_extra_steps: how many times more steps an even split may take (default 2.0).

    Returns:
        A :class:`MicroPlan`; ``steps == 1`` when the batch fits whole.

    Example:

    >>> plan_micro_batches(96, 40).sizes
    (32, 32, 32)
    >>> plan_micro_batches(127, 64).sizes  # 127 is prime: one uneven split
    (64, 63)
    """
    batch_size = _check_size("batch_size", batch_size)
    max_micro = _check_size("max_micro", max_micro)
    if not max_extra_steps >= 1.0:
        raise InvalidInputError(f"max_extra_steps must be >= 1, got {max_extra_steps!r}")
    minimal = -(-batch_size // min(max_micro, batch_size))
    steps = minimal
    for k in range(minimal, min(batch_size, int(minimal * max_extra_steps)) + 1):
        if batch_size % k == 0:
            steps = k
            break
    return MicroPlan(batch_size=batch_size, steps=steps, sizes=split_sizes(batch_size, steps))
