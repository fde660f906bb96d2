"""A simulated device for testing and benchmarking search policies without TensorFlow.

:class:`SimulatedDevice` reproduces what the measurements in ``NOTES-tf-memory.md`` show of a
real allocator: peak memory linear in the batch size, jumps where a kernel switches
algorithm (+13% to +34% from one size to the next), fragmentation (the allocator refuses a
size whose measured peak is a few percent under the cap), allocation rounding and small
irregularities. :func:`search_cost` turns a search history into the wall time it would take
at the measured costs (a few seconds a probe, about ten more for an out-of-memory error).

Example:

>>> from batchfit.core.search import make_policy, run_search
>>> device = SimulatedDevice(fixed=20e6, per_sample=3e6, budget=1000e6)
>>> device.max_batch()
326
>>> policy = make_policy("guided", budget_bytes=device.budget)
>>> history = run_search(policy, device.trial)
>>> policy.best(history), len(history), sum(not t.fits for t in history)
(326, 5, 1)
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import InvalidInputError
from .search import Trial

__all__ = ["SimulatedDevice", "search_cost"]


@dataclass(frozen=True)
class SimulatedDevice:
    """A fake accelerator whose peak memory is ``fixed + per_sample * b``, with imperfections.

    The peak at batch size ``b`` is ``fixed + per_sample * b``, multiplied by ``factor``
    for every ``(size, factor)`` in ``jumps`` with ``b >= size``, then perturbed by
    ``noise`` (a deterministic relative wobble per size, seeded by ``seed``) and rounded up
    to a multiple of ``rounding`` bytes. ``b`` fits when that peak is at most
    ``budget * (1 - fragmentation)``: with fragmentation the allocator refuses sizes whose
    peak is still under the budget, as a real capped BFC allocator does.

    Args:
        fixed: batch-independent bytes (weights, optimizer state, workspace).
        per_sample: bytes per sample.
        budget: the memory budget (what the search is told), in bytes.
        jumps: ``(size, factor)`` pairs: from ``size`` on, the peak is ``factor`` times
            larger (e.g. ``((129, 1.34),)``). Default none.
        fragmentation: fraction of the budget lost to fragmentation. Default 0.
        rounding: peaks are rounded up to a multiple of this many bytes. Default 0 (exact).
        noise: relative amplitude of a deterministic per-size wobble of the peak. Default 0.
        report_peaks: whether fitting trials carry ``peak_bytes`` (a device without
            allocator statistics has none). Default ``True``.
        seed: seed of the noise. Default 0.

    Example:

    >>> d = SimulatedDevice(fixed=0, per_sample=10, budget=1000, jumps=((60, 1.3),))
    >>> d.peak(59), d.peak(60), d.max_batch()
    (590.0, 780.0, 76)
    """

    fixed: float
    per_sample: float
    budget: float
    jumps: Sequence[tuple[int, float]] = field(default=())
    fragmentation: float = 0.0
    rounding: float = 0.0
    noise: float = 0.0
    report_peaks: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.per_sample > 0 and self.budget > 0 and self.fixed >= 0):
            raise InvalidInputError(
                f"need per_sample > 0, budget > 0 and fixed >= 0, got fixed={self.fixed!r}, "
                f"per_sample={self.per_sample!r}, budget={self.budget!r}")
        if not 0 <= self.fragmentation < 1:
            raise InvalidInputError(
                f"fragmentation must be in [0, 1), got {self.fragmentation!r}")

    def peak(self, batch_size: int) -> float:
        """The peak bytes a training step at ``batch_size`` would reach."""
        value = self.fixed + self.per_sample * batch_size
        for size, factor in self.jumps:
            if batch_size >= size:
                value *= factor
        if self.noise:
            wobble = random.Random(self.seed * 1_000_003 + batch_size).uniform(-1.0, 1.0)
            value *= 1.0 + self.noise * wobble
        if self.rounding:
            value = math.ceil(value / self.rounding) * self.rounding
        return float(value)

    def fits(self, batch_size: int) -> bool:
        """Whether ``batch_size`` trains without running out of memory."""
        return self.peak(batch_size) <= self.budget * (1.0 - self.fragmentation)

    def trial(self, batch_size: int) -> Trial:
        """Probe ``batch_size``: a :class:`batchfit.core.search.Trial` (peak only if it fits)."""
        ok = self.fits(batch_size)
        peak = self.peak(batch_size) if ok and self.report_peaks else None
        return Trial(batch_size, ok, peak)

    def max_batch(self, granularity: int = 1, upper: int | None = None) -> int:
        """The true answer: the largest multiple of ``granularity`` that fits with every
        smaller multiple fitting too (0 if ``granularity`` itself fails), at most ``upper``.

        Assumes memory grows with the batch up to the limit (jump factors >= 1, small noise).
        """
        g = granularity
        cap = self.budget * (1.0 - self.fragmentation)
        guess = max(0, int((cap - self.fixed) / self.per_sample) // g * g)
        if upper is not None:
            guess = min(guess, upper // g * g)
        b = min(guess + 2 * g, upper // g * g) if upper is not None else guess + 2 * g
        while b > 0 and not self.fits(b):         # walk down to a fitting size
            b -= g
        monotonic = not self.noise and all(factor >= 1 for _, factor in self.jumps)
        while not monotonic and b > 0 and not all(self.fits(k) for k in range(g, b + 1, g)):
            b -= g                                 # noise: the first failure wins
        return b


def search_cost(history: Sequence[Trial], *, probe_seconds: float = 3.0,
                oom_seconds: float = 10.0) -> float:
    """Wall time a search would take: ``probe_seconds`` a probe, ``oom_seconds`` more per OOM.

    Args:
        history: the trials made.
        probe_seconds: time of one probe (a few training steps). Default 3.
        oom_seconds: extra time of a probe that runs out of memory. Default 10 (measured).

    Returns:
        Seconds.

    Example:

    >>> search_cost([Trial(8, True), Trial(16, False)])
    16.0
    """
    fails = sum(1 for t in history if not t.fits)
    return len(history) * probe_seconds + fails * oom_seconds
