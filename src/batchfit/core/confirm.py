"""Confirming a search's answer in fresh processes, the band it leaves, and the safe size.

Near a capped allocator's limit "fits" is not sharp: the same batch size fits in one fresh
process and not in the next (measured: a CNN under 512 MiB answered 146 once and 165 the next
time; a Transformer-like model's 222 trained in 1 of 2 fresh processes). One probe per size
draws once from that band. So a search ends by trying its answer ``k`` more times, each in a
fresh process, and steps down on any failure; what it saw becomes a :class:`Band`:

* ``reliable``: the largest size that fitted every time it was tried, below every size that
  ever failed (the answer, ``max_batch_size``);
* ``sometimes``: sizes seen both fitting and failing;
* ``never``: the smallest size tried that never fitted.

Everything here is pure: :class:`ConfirmPolicy` picks the next confirmation from the trials so
far (like the search policies of :mod:`batchfit.core.search`), :func:`band_of` reads the band
from them, and :func:`safe_size` sizes ``safe_batch_size`` from the band and the memory model.

Example:

>>> from batchfit.core.search import Trial
>>> searched = [Trial(64, True, 400.0), Trial(100, True, 600.0), Trial(104, False)]
>>> policy = ConfirmPolicy(k=3, budget_bytes=700.0, per_sample_bytes=5.0)
>>> device = lambda b: Trial(b, fits=b <= 96, peak_bytes=80.0 + 5.0 * b)
>>> confirmed = run_confirmation(policy, searched, device)
>>> [t.batch_size for t in confirmed]
[100, 95, 95, 95]
>>> band = band_of(searched + confirmed); band.reliable, band.sometimes, band.never
(95, [100], 104)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import InvalidInputError
from ..results import Band
from .memory_model import local_model
from .search import Trial
from .sizes import format_bytes
from .validate import check_fraction, check_int

__all__ = [
    "DEFAULT_CONFIRMATIONS",
    "FRESH_NEAR",
    "MAX_DOUBLINGS",
    "MIN_MARGIN",
    "ConfirmPolicy",
    "SafeSize",
    "band_of",
    "check_confirm",
    "near_the_edge",
    "run_confirmation",
    "safe_size",
]

#: Fresh-process confirmations at the answer unless told otherwise (``confirm=``).
DEFAULT_CONFIRMATIONS = 3
#: The smallest margin ``safe_batch_size`` keeps, as a fraction of the budget: the guided
#: search's fragmentation slack (a capped allocator refused sizes whose peak was up to 3% under
#: its cap, measured).
MIN_MARGIN = 0.03
#: A confirmation's step down doubles at most this many times (4x the first step). Measured
#: (bench_trust, the Transformer under 128 MiB, session 17): a process reused for ascending
#: fits fitted 224, 230, 236 and 260 where fresh ones ran out of memory from 224 on; each
#: failure took the search's next fit below as the candidate while the step doubled, and after
#: the fifth (16x, 128 samples) the step passed every size down to the search's fit at 111,
#: the answer (the user's ``fit`` trains 219), with ``safe_batch_size`` 1.
MAX_DOUBLINGS = 2


#: A search probe whose predicted peak reaches this share of the budget runs in a process that
#: has run nothing before, never in one reused after smaller fits. Measured (session 20,
#: bench_real): in 3 of 5 real models the ascending run in a reused process fitted sizes that
#: then failed in fresh ones (MobileNetV2 under 256 MiB fitted 31, 32 and 33 reused; the
#: user's own ``fit`` ran out of memory at 31 and 33 in 3 of 3 fresh processes each;
#: EfficientNetB0 21, GPT-2 9), and each such size cost a failed confirmation.
FRESH_NEAR = 0.8


def near_the_edge(points: Sequence[tuple[int, float]], batch_size: int,
                  budget_bytes: float | None, *, near: float = FRESH_NEAR) -> bool:
    """Whether ``batch_size``'s predicted peak reaches ``near`` of the budget.

    The prediction is the line through the two measured sizes closest to ``batch_size``
    (:func:`batchfit.core.memory_model.local_model`); from one measured size, the peak scaled
    in proportion to the batch (an over-estimate: the fixed part scales too). Without a
    budget or a measurement nothing is near.

    Args:
        points: ``(batch_size, peak_bytes)`` of probes that fitted.
        batch_size: the size about to be probed.
        budget_bytes: the memory budget (``None``: unknown).
        near: the share of the budget that counts as near. Default :data:`FRESH_NEAR`.

    Example:

    >>> pts = [(8, 30.0), (16, 40.0)]  # 20 fixed + 1.25 per sample
    >>> near_the_edge(pts, 32, 100.0), near_the_edge(pts, 48, 100.0)
    (False, True)
    >>> near_the_edge([(8, 30.0)], 24, 100.0)  # 30 * 24 / 8 = 90
    True
    """
    if not budget_bytes or budget_bytes <= 0 or not points:
        return False
    sizes = {b for b, _ in points}
    if len(sizes) < 2:
        b0 = max(sizes)
        peak = max(m for b, m in points if b == b0) * batch_size / b0
    else:
        peak = local_model(points, near=batch_size).predict(batch_size)
    return peak >= near * budget_bytes


def check_confirm(value: object) -> int:
    """``confirm=`` as an int >= 0 (0: no confirmation), or a clear error.

    Example:

    >>> check_confirm(3)
    3
    """
    return int(check_int("confirm", value, minimum=0,  # type: ignore[arg-type]
                         hint="e.g. 3 fresh processes, or 0 to skip confirmation"))


def _tally(trials: Sequence[Trial]) -> dict[int, tuple[int, int]]:
    """``{size: (fits, fails)}`` over every trial."""
    counts: dict[int, tuple[int, int]] = {}
    for t in trials:
        ok, bad = counts.get(t.batch_size, (0, 0))
        counts[t.batch_size] = (ok + 1, bad) if t.fits else (ok, bad + 1)
    return counts


def band_of(trials: Sequence[Trial], *, confirmations: int = 0,
            confirmed: bool = False, step_downs: int = 0) -> Band:
    """The band the trials show (search and confirmations together; a size may repeat).

    Args:
        trials: every trial made, in any order.
        confirmations: the ``k`` asked for (recorded in the band).
        confirmed: whether the reliable edge passed its ``k`` confirmations.
        step_downs: how many failed confirmations moved the answer down.

    Returns:
        A :class:`~batchfit.results.Band` (no margin yet: see :func:`safe_size`).

    Example:

    >>> t = [Trial(10, True), Trial(12, True), Trial(12, False), Trial(14, False)]
    >>> b = band_of(t); b.reliable, b.sometimes, b.never
    (10, [12], 14)
    """
    counts = _tally(trials)
    failing = [b for b, (_, bad) in counts.items() if bad]
    lowest_failure = min(failing, default=None)
    reliable = max((b for b, (ok, bad) in counts.items() if ok and not bad
                    and (lowest_failure is None or b < lowest_failure)), default=0)
    sometimes = sorted(b for b, (ok, bad) in counts.items() if ok and bad)
    never = min((b for b, (ok, bad) in counts.items() if bad and not ok), default=None)
    return Band(reliable=reliable, sometimes=sometimes, never=never,
                confirmations=confirmations, confirmed=confirmed, step_downs=step_downs)


@dataclass(frozen=True)
class ConfirmPolicy:
    """Which size to confirm next, from the search's trials and the confirmations so far.

    The candidate is the reliable edge of everything seen (:func:`band_of`): at first the
    search's answer. It is tried until it has fitted ``k`` times in confirmation; any failure
    makes a size below it the candidate: the largest size known to fit below the failure, or,
    if that is further down than one step, a step below the failed size. A step is
    ``step_fraction`` of the budget in memory, converted to samples with the memory model
    (``per_sample_bytes``; without one, ``step_fraction`` of the size), and doubles with each
    size that failed in confirmation (at most :data:`MAX_DOUBLINGS` times), so a wide band
    costs a few probes, not one per granule;
    below a size that fitted some times and failed others (the edge is there) it doubles only
    with each such size.

    Stateless like the search policies: :meth:`next_size` looks only at the trials passed.

    Args:
        k: confirmations each candidate must pass (>= 1).
        granularity: sizes are multiples of this. Default 1.
        budget_bytes: the memory budget (``None``: unknown).
        per_sample_bytes: the memory model's slope (``None`` or <= 0: unknown).
        step_fraction: the first step down, as a fraction of the budget. Default 0.03.
        max_failures: stop after this many failed confirmations (the reliable edge so far
            stands, unconfirmed). Default 6.

    Example:

    >>> p = ConfirmPolicy(k=2)
    >>> p.next_size([Trial(50, True), Trial(52, False)], [])
    50
    >>> p.next_size([Trial(50, True), Trial(52, False)], [Trial(50, True), Trial(50, True)])
    """

    k: int
    granularity: int = 1
    budget_bytes: float | None = None
    per_sample_bytes: float | None = None
    step_fraction: float = MIN_MARGIN
    max_failures: int = 6

    def __post_init__(self) -> None:
        check_int("k", self.k, minimum=1)
        check_int("granularity", self.granularity, minimum=1)
        check_int("max_failures", self.max_failures, minimum=1)
        check_fraction("step_fraction", self.step_fraction, low=0.0, high=1.0)

    def step(self, size: int, failures: int) -> int:
        """Samples to step down from a failed ``size`` after ``failures`` failed confirmations.

        Example:

        >>> ConfirmPolicy(k=3, budget_bytes=1000.0, per_sample_bytes=5.0).step(100, 1)
        6
        >>> ConfirmPolicy(k=3).step(100, 2)  # no memory model: 3% of the size, doubled
        6
        """
        g = self.granularity
        scale = 2.0 ** min(max(0, failures - 1), MAX_DOUBLINGS)
        if self.budget_bytes and self.per_sample_bytes and self.per_sample_bytes > 0:
            samples = self.step_fraction * self.budget_bytes / self.per_sample_bytes
        else:
            samples = self.step_fraction * size
        return max(g, math.ceil(samples * scale / g) * g)

    def candidate(self, searched: Sequence[Trial], confirmed: Sequence[Trial]) -> int:
        """The size to confirm now (0: none left)."""
        everything = [*searched, *confirmed]
        reliable = band_of(everything).reliable
        failed = [t.batch_size for t in confirmed if not t.fits]
        if not failed:
            return reliable
        lowest = min(t.batch_size for t in everything if not t.fits)
        g = self.granularity
        stepped = ((lowest - self.step(lowest, self._misses(confirmed, lowest))) // g) * g
        return max(reliable, stepped) if stepped >= g else reliable

    @staticmethod
    def _misses(confirmed: Sequence[Trial], lowest: int) -> int:
        """How far to scale the next step (see :meth:`step`): the number of sizes that failed
        in confirmation; when the lowest failure also fitted there (the edge is at it), only
        those that did both: the first step below such a size is not doubled. Measured: a CNN
        under 128 MiB failed at 219 and 206, then fitted 181 2 of 3; a doubled step from 181
        went to 131 (3 of 3), where 172 trains (session 14)."""
        fitted = {t.batch_size for t in confirmed if t.fits}
        failed = {t.batch_size for t in confirmed if not t.fits}
        if lowest in fitted:
            return max(1, len(failed & fitted))
        return max(1, len(failed))

    def next_size(self, searched: Sequence[Trial], confirmed: Sequence[Trial],
                  shared: Sequence[Trial] = ()) -> int | None:
        """The next size to try in a fresh process, or ``None`` when done.

        Args:
            searched: the search's trials.
            confirmed: the confirmations made so far, in order.
            shared: search trials that ran in a process that had run nothing before: their
                fits count as confirmations (their failures are the search's, in ``searched``).

        Returns:
            The candidate while it has fitted fewer than ``k`` times in confirmation; ``None``
            once it has, when nothing is left to confirm, or after ``max_failures`` failures.

        Example:

        >>> p = ConfirmPolicy(k=2)
        >>> searched = [Trial(50, True), Trial(52, False)]
        >>> p.next_size(searched, [Trial(50, True)]), p.next_size(searched, [Trial(50, True)],
        ...                                                        shared=[Trial(50, True)])
        (50, None)
        """
        if sum(not t.fits for t in confirmed) >= self.max_failures:
            return None
        size = self.candidate(searched, confirmed)
        if size <= 0:
            return None
        passed = self._passes(size, confirmed, shared)
        return size if passed < self.k else None

    @staticmethod
    def _passes(size: int, confirmed: Sequence[Trial], shared: Sequence[Trial]) -> int:
        """Fits at ``size`` in processes that had run nothing before (confirmations, shared)."""
        return (sum(t.fits for t in confirmed if t.batch_size == size)
                + sum(t.fits for t in shared if t.batch_size == size))

    def is_confirmed(self, searched: Sequence[Trial], confirmed: Sequence[Trial],
                     shared: Sequence[Trial] = ()) -> bool:
        """Whether the reliable edge fitted ``k`` times in confirmation (``shared`` as in
        :meth:`next_size`)."""
        reliable = band_of([*searched, *confirmed]).reliable
        return reliable > 0 and self._passes(reliable, confirmed, shared) >= self.k


def run_confirmation(policy: ConfirmPolicy, searched: Sequence[Trial],
                     trial: Callable[[int], Trial], *,
                     shared: Sequence[Trial] = ()) -> list[Trial]:
    """Drive ``policy`` with ``trial`` (one fresh process each) until it stops.

    Args:
        policy: the confirmation policy.
        searched: the search's trials.
        trial: probes one size in a fresh process and returns its :class:`Trial`.
        shared: the search's trials that ran in a process that had run nothing before; their
            fits count as confirmations (see :meth:`ConfirmPolicy.next_size`).

    Returns:
        The confirmations made, in order.

    Raises:
        InvalidInputError: ``trial`` returned something other than a Trial for the size.
    """
    made: list[Trial] = []
    # Each call either fits (at most k per candidate) or fails (at most max_failures): bounded.
    limit = policy.k * (policy.max_failures + 1) + policy.max_failures
    while len(made) < limit:
        size = policy.next_size(searched, made, shared)
        if size is None:
            break
        outcome = trial(size)
        if not isinstance(outcome, Trial) or outcome.batch_size != size:
            raise InvalidInputError(
                f"the trial function must return a Trial for batch size {size}, got {outcome!r}")
        made.append(outcome)
    return made


@dataclass(frozen=True)
class SafeSize:
    """``safe_batch_size`` and the margin it leaves under the reliable edge."""

    batch_size: int
    margin_bytes: float | None
    free_fraction: float | None
    reason: str


def _peak_spread(trials: Sequence[Trial]) -> tuple[float, int | None]:
    """The largest difference between two peaks measured at one size (and that size)."""
    peaks: dict[int, list[float]] = {}
    for t in trials:
        if t.fits and t.peak_bytes is not None:
            peaks.setdefault(t.batch_size, []).append(float(t.peak_bytes))
    spread, where = 0.0, None
    for b, ps in peaks.items():
        if len(ps) >= 2 and max(ps) - min(ps) > spread:
            spread, where = max(ps) - min(ps), b
    return spread, where


def safe_size(band: Band, trials: Sequence[Trial], *, budget_bytes: float | None,
              per_sample_bytes: float | None, fixed_bytes: float | None = None,
              granularity: int = 1, headroom: float = 0.0,
              min_margin: float = MIN_MARGIN) -> SafeSize:
    """``safe_batch_size``: the reliable edge less a margin sized from what the run measured.

    The margin, in bytes, is the larger of the band's width (from the reliable edge to the
    smallest size that never fitted, times the memory model's bytes per sample) and the largest
    spread between peaks measured at one size across processes: two measures of one thing, how
    much a size's need for memory varies between fresh processes (the band as outcomes, the
    spread as peaks; the spread still shows it when the band looks narrow). It is at least
    ``min_margin`` of the budget (fragmentation) and ``headroom`` of it (a floor the caller
    asked for). The safe size is the reliable edge less that many bytes' worth of samples.

    When nothing failed above the edge (it is the search's upper bound, not the memory's
    limit), the safe size is the largest up to the edge whose predicted peak leaves the margin
    free under the budget. Without a memory model or a budget the margin cannot be sized in
    memory: the safe size is then the reliable edge less ``max(headroom, 0.1)`` of it.

    Args:
        band: the band (:func:`band_of`).
        trials: every trial (search and confirmations), for the peak spread.
        budget_bytes: the budget (``None``: unknown).
        per_sample_bytes: the memory model's slope (``None``: no model).
        fixed_bytes: the memory model's intercept (for the fraction left free).
        granularity: the safe size is a multiple of this (at least one granule).
        headroom: the smallest fraction of the budget to keep free. Default 0.
        min_margin: the smallest margin, as a fraction of the budget. Default 0.03.

    Returns:
        A :class:`SafeSize`.

    Example:

    >>> band = band_of([Trial(90, True, 540.0), Trial(100, True, 600.0), Trial(104, False)])
    >>> s = safe_size(band, [], budget_bytes=700.0, per_sample_bytes=5.0, fixed_bytes=100.0)
    >>> s.batch_size, s.margin_bytes
    (95, 21.0)
    """
    g = granularity
    edge = band.reliable
    if edge <= 0:
        return SafeSize(0, None, None, "nothing fitted reliably")
    if not budget_bytes or not per_sample_bytes or per_sample_bytes <= 0:
        frac = max(headroom, 0.1)
        size = max(g, (int(edge * (1 - frac)) // g) * g)
        return SafeSize(size, None, None,
                        f"no memory model to size a margin in bytes: {frac:.0%} below the "
                        f"reliable edge")
    width = (band.never - edge) * per_sample_bytes if band.never is not None else 0.0
    spread, spread_at = _peak_spread(trials)
    floor = max(min_margin, headroom) * budget_bytes
    margin = max(width, spread, floor)
    if band.never is None and fixed_bytes is not None:
        # Nothing failed above the edge (it is the upper bound): memory did not set it, so the
        # margin is kept under the budget, not under the edge's need.
        size = (math.floor((budget_bytes - margin - fixed_bytes) / per_sample_bytes) // g) * g
    else:
        size = (math.floor(edge - margin / per_sample_bytes) // g) * g
    size = max(g, min(size, edge))
    parts = []
    if band.never is not None:
        parts.append(f"band width {format_bytes(width)} ({edge} fitted every time, "
                     f"{band.never} never)")
    if spread_at is not None:
        parts.append(f"peak spread {format_bytes(spread)} (at {spread_at}, between probes)")
    which = "headroom asked for" if headroom > min_margin else "fragmentation floor"
    floor_text = f"the {which}, {max(min_margin, headroom):.0%} of the budget"
    if not parts:
        reason = (f"no size ran out of memory above {edge}: {floor_text}, kept free under "
                  f"the budget")
    else:
        measured = ", ".join(parts)
        reason = f"the larger of {measured}" if len(parts) > 1 else measured
        if margin == floor and floor > max(width, spread):
            reason = f"{measured} < {floor_text}"
    free = None
    if fixed_bytes is not None:
        free = max(0.0, 1.0 - (fixed_bytes + per_sample_bytes * size) / budget_bytes)
    return SafeSize(size, margin, free, reason)
