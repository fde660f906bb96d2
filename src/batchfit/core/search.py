"""Search policies: which batch size to probe next, and what the answer is.

A policy is a pure object: :meth:`SearchPolicy.next_size` looks only at the history of
:class:`Trial` objects so far and returns the next batch size to try, or ``None`` to stop.
It keeps no hidden state between calls, so it can be unit-tested against a fake trial function
in a few lines, replayed from a saved run, or driven by any loop. :func:`run_search` is the
loop batchfit uses.

Three policies:

* ``"power"`` and ``"binsearch"`` reproduce PyTorch Lightning's batch-size finder
  (``lightning/pytorch/tuner/batch_size_scaling.py``: ``_run_power_scaling``,
  ``_run_binsearch_scaling`` and ``_adjust_batch_size``), so results can be compared with it;
  the few deviations are listed in each class's docstring.
* ``"guided"`` (the default elsewhere in batchfit) uses the measured peak memory of the probes
  that fit: a linear model predicts the limit, a local refit near the limit corrects it, and
  one probe just above the answer confirms it. On near-linear memory it lands on the exact
  largest size in about five probes with one out-of-memory.

Answer semantics, common to all policies (also for non-monotonic devices): the answer is the
largest size that fit *below the smallest size that failed*; never a size above one that
failed, never a size that was not probed; ``0`` when nothing fit.

Example:

>>> policy = make_policy("binsearch")
>>> history = run_search(policy, lambda b: Trial(b, fits=b <= 95))
>>> [t.batch_size for t in history]
[2, 4, 8, 16, 32, 64, 128, 96, 80, 88, 92, 94, 95]
>>> policy.best(history), policy.bracketed(history)
(95, True)
"""

from __future__ import annotations

import abc
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidInputError
from .validate import check_fraction, check_int, is_int, is_number

__all__ = [
    "DEFAULT_SEARCH",
    "POLICY_NAMES",
    "BinsearchPolicy",
    "GuidedPolicy",
    "PowerPolicy",
    "SearchPolicy",
    "Trial",
    "check_search",
    "make_policy",
    "run_search",
    "search_argument",
]

#: Names :func:`make_policy` accepts: the values of ``search=`` / ``--search``, defined here
#: only (the verbs, the CLI and the benchmarks read them from here).
POLICY_NAMES = ("guided", "binsearch", "power")
#: The policy batchfit searches with unless told otherwise.
DEFAULT_SEARCH = "guided"


@dataclass(frozen=True)
class Trial:
    """The outcome of probing one batch size, as a search policy sees it.

    Args:
        batch_size: the batch size probed.
        fits: whether training at that size worked within the memory budget.
        peak_bytes: the measured peak memory of a probe that fit (``None`` if unknown or
            the probe failed). A failed probe may carry a peak when one was measured (e.g.
            it ran but exceeded a budget that could not be enforced); guided search uses it.

    Example:

    >>> Trial(64, fits=True, peak_bytes=2.5e9)
    Trial(batch_size=64, fits=True, peak_bytes=2500000000.0)
    """

    batch_size: int
    fits: bool
    peak_bytes: float | None = None


# --------------------------------------------------------------------------- argument checks


def _check_int(name: str, value: object, minimum: int, *, optional: bool = False) -> int | None:
    return check_int(name, value, minimum=minimum, optional=optional)


def _check_fraction(name: str, value: object, low: float, high: float) -> float:
    return check_fraction(name, value, low=low, high=high)


def _check_prior(prior: object) -> tuple[float, float] | None:
    """Validate a prior line ``(fixed_bytes, per_sample_bytes)``: finite, a positive slope."""
    if prior is None:
        return None
    try:
        fixed, slope = (float(v) for v in prior)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        raise InvalidInputError(f"prior must be (fixed_bytes, per_sample_bytes), got "
                                f"{prior!r}") from None
    if not (math.isfinite(fixed) and math.isfinite(slope) and slope > 0):
        raise InvalidInputError(f"prior must be finite with per_sample_bytes > 0, got {prior!r}")
    return fixed, slope


def _check_upper(upper: int | None, granularity: int) -> int | None:
    """Validate ``upper``; return it rounded down to a multiple of ``granularity``."""
    up = _check_int("upper", upper, 1, optional=True)
    if up is None:
        return None
    if up < granularity:
        raise InvalidInputError(
            f"upper ({up}) is below granularity ({granularity}): no batch size that is a "
            f"multiple of {granularity} can be tried; raise upper or lower granularity")
    return (up // granularity) * granularity


def _bracket(history: Sequence[Trial]) -> tuple[int, int | None]:
    """``(lo, hi)``: the smallest failing size (``None`` if none) and the largest fit below it.

    A size seen both fitting and failing (a flaky probe) counts as failing.
    """
    failing = [t.batch_size for t in history if not t.fits]
    hi = min(failing) if failing else None
    lo = max((t.batch_size for t in history
              if t.fits and (hi is None or t.batch_size < hi)), default=0)
    return lo, hi


# --------------------------------------------------------------------------------- base class


class SearchPolicy(abc.ABC):
    """A rule for choosing the next batch size to probe from the trials made so far.

    Subclasses implement :meth:`next_size`; :meth:`best` and :meth:`bracketed` are common to
    all of them. A policy holds only its configuration: everything else is derived from the
    history passed in, so one policy object can serve any number of searches.

    Attributes:
        name: the policy's name in :data:`POLICY_NAMES`.
        granularity: every size probed is a multiple of it.
        upper: the largest size the policy may probe (a multiple of ``granularity``), or
            ``None`` for no bound.
    """

    name: str = ""
    granularity: int = 1
    upper: int | None = None

    @abc.abstractmethod
    def next_size(self, history: Sequence[Trial]) -> int | None:
        """The next batch size to probe, or ``None`` to stop.

        Args:
            history: the trials made so far, in order.

        Returns:
            A size not in ``history`` (a multiple of :attr:`granularity`, at most
            :attr:`upper`), or ``None`` when the search is over.
        """

    def best(self, history: Sequence[Trial]) -> int:
        """The answer: the largest size that fit below the smallest size that failed.

        Never a size above one that failed (even when the device is non-monotonic and
        something larger fit), never a size that was not probed.

        Args:
            history: the trials made.

        Returns:
            The batch size, or ``0`` when no size below the smallest failure fit.

        Example:

        >>> PowerPolicy().best([Trial(2, True), Trial(4, False), Trial(8, True)])
        2
        """
        return _bracket(history)[0]

    def bracketed(self, history: Sequence[Trial]) -> bool:
        """Whether :meth:`best` is exact to the granularity.

        True when a size at most ``best + granularity`` failed (nothing in between is left
        untried), or when ``best`` is :attr:`upper`.

        Args:
            history: the trials made.

        Returns:
            ``True`` if the answer is exact, ``False`` if a larger size might still fit.

        Example:

        >>> p = BinsearchPolicy()
        >>> p.bracketed([Trial(64, True), Trial(65, False)]), p.bracketed([Trial(64, True)])
        (True, False)
        """
        lo, hi = _bracket(history)
        if self.upper is not None and lo >= self.upper:
            return True
        return hi is not None and hi <= lo + self.granularity

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class _LightningPolicy(SearchPolicy):
    """Shared set-up of the two Lightning policies: sizes in units of ``granularity``.

    Lightning's finder works on raw sizes; here it runs on *units* of ``granularity`` (size =
    unit * granularity), so with the default granularity 1 the sequence is Lightning's own.
    Each policy replays Lightning's loop over the history (looking each size's outcome up by
    size) until it reaches a size not yet probed: that is the next one. A size Lightning would
    try a second time is answered from the history instead of being probed again.
    """

    def __init__(self, init: int = 2, max_trials: int = 25, upper: int | None = None, *,
                 granularity: int = 1) -> None:
        self.granularity = int(_check_int("granularity", granularity, 1))  # type: ignore[arg-type]
        self.init = int(_check_int("init", init, 1))  # type: ignore[arg-type]
        self.max_trials = int(_check_int("max_trials", max_trials, 1))  # type: ignore[arg-type]
        self.upper = _check_upper(upper, self.granularity)

    def _units(self) -> tuple[int, int | None]:
        g = self.granularity
        init_u = -(-self.init // g)  # ceil: the first multiple of g at or above init
        upper_u = None if self.upper is None else self.upper // g
        if upper_u is not None:
            init_u = min(init_u, upper_u)
        return init_u, upper_u

    def _outcomes(self, history: Sequence[Trial]) -> dict[int, bool]:
        """Outcome of each probed size in units (a size that ever failed counts as failing)."""
        g = self.granularity
        known: dict[int, bool] = {}
        for t in history:
            if t.batch_size % g == 0:
                u = t.batch_size // g
                known[u] = known.get(u, True) and bool(t.fits)
        return known


class PowerPolicy(_LightningPolicy):
    """Doubling until the first out-of-memory, like Lightning's ``mode="power"``.

    Mirrors ``_run_power_scaling``: start at ``init`` and run at most ``max_trials`` loop
    iterations; after a success, double; after a failure, halve, and stop if anything has
    succeeded before (so a failure after successes ends the search with the last success).
    While nothing has succeeded yet, Lightning keeps halving after each failure (the very
    first size failing halves ``init`` and tries again); so does this policy. Lightning stops
    after a success in the last allowed iteration without doubling, and so does this.

    Deviations from Lightning, all in the direction of never claiming an untested size:

    * Lightning returns the halved size after a failure even when it was never run (e.g. all
      ``max_trials`` sizes fail, or the halved size is not the last success because the
      doubled size was capped); here the answer is always :meth:`best`, a size that fit, or 0.
    * After a first-size failure and a success at half, Lightning doubles back to the size
      that already failed and runs it again; here that outcome is taken from the history (no
      probe), which ends the search with the same answer.
    * Lightning would go on halving down to batch size 0; here the search stops when
      halving would go below one unit of ``granularity``.
    * ``upper`` (ours; Lightning's closest is ``max_val=8192``, which it stops *at* without
      running it) caps every doubling; when ``upper`` fits the search stops with ``upper``.
    * ``granularity`` (ours): sizes are ``granularity`` times Lightning's sequence over
      ``ceil(init / granularity)``.
    * Lightning's early stop when the batch size reaches the dataset length does not apply.

    Args:
        init: first size tried (Lightning's ``init_val``). Default 2.
        max_trials: most loop iterations (Lightning's ``max_trials``; every probe counts,
            successes and failures). Default 25.
        upper: never probe above this (ours). Default ``None`` (no bound).
        granularity: sizes are multiples of this (ours). Default 1.

    Example:

    >>> history = run_search(PowerPolicy(), lambda b: Trial(b, fits=b <= 95))
    >>> [t.batch_size for t in history], PowerPolicy().best(history)
    ([2, 4, 8, 16, 32, 64, 128], 64)
    """

    name = "power"

    def next_size(self, history: Sequence[Trial]) -> int | None:
        known = self._outcomes(history)
        size, upper_u = self._units()
        any_success = False
        for i in range(self.max_trials):            # Lightning: for i in range(max_trials)
            if size not in known:
                return size * self.granularity      # the first size not yet run
            if known[size]:                          # _try_loop_run succeeded
                if i + 1 >= self.max_trials:         # last trial: keep it, do not double
                    return None
                if upper_u is not None and size >= upper_u:
                    return None                      # ours: upper fits, nothing left to try
                size = size * 2                      # _adjust_batch_size(factor=2.0)
                if upper_u is not None:
                    size = min(size, upper_u)
                any_success = True
            else:                                    # OOM
                size = size // 2                     # _adjust_batch_size(factor=0.5)
                if any_success or size < 1:          # Lightning: `if any_success: break`
                    return None
        return None


class BinsearchPolicy(_LightningPolicy):
    """Doubling until the first out-of-memory, then bisection, like Lightning's ``"binsearch"``.

    Mirrors ``_run_binsearch_scaling``: ``low`` starts at 1 and ``high`` unset; after a
    success (which counts towards ``max_trials``; failures do not) ``low`` becomes the size,
    then the next size is ``(high + low) // 2`` once a failure has set ``high``, else double;
    the search stops after a success when ``high - low <= 1``, or when ``max_trials``
    successes are reached. After a failure ``high`` becomes the size, the next is
    ``(high + low) // 2``, and the search stops when ``high - low <= 1``.

    Deviations from Lightning, all in the direction of never claiming an untested size:

    * Lightning's ``low = 1`` is an assumption, not a measurement: if the first size fails
      and bisection comes down to ``high - low <= 1`` without any success, Lightning returns
      1 without running it. Here size 1 (one unit of ``granularity``) is then probed, and the
      answer is 0 if it fails too. Lightning's own sequence of sizes is otherwise unchanged.
    * ``upper`` (ours; Lightning's ``max_val=8192`` is returned untested when reached) caps
      the doubling and is probed; if it fits the search stops there. Lightning's ``margin``
      (shrinking the answer afterwards) is left to the caller (batchfit's ``headroom``).
    * ``granularity`` (ours): Lightning's arithmetic runs on units of ``granularity``.
    * Lightning's early stop when the batch size reaches the dataset length does not apply.

    Args:
        init: first size tried (Lightning's ``init_val``). Default 2.
        max_trials: most *successful* probes (Lightning counts only those). Default 25.
        upper: never probe above this (ours). Default ``None``.
        granularity: sizes are multiples of this (ours). Default 1.

    Example:

    >>> history = run_search(BinsearchPolicy(), lambda b: Trial(b, fits=b <= 95))
    >>> [t.batch_size for t in history][-6:], BinsearchPolicy().best(history)
    ([96, 80, 88, 92, 94, 95], 95)
    """

    name = "binsearch"

    def next_size(self, history: Sequence[Trial]) -> int | None:
        known = self._outcomes(history)
        size, upper_u = self._units()
        low, high, count = 1, None, 0
        # Each iteration consumes one probed size; sizes strictly move, so this terminates.
        while True:
            if size not in known:
                return size * self.granularity
            if known[size]:                          # success
                count += 1
                if count >= self.max_trials:
                    return None
                low = size
                if upper_u is not None and size >= upper_u:
                    return None                      # ours: upper fits
                if high:
                    if high - low <= 1:
                        return None
                    size = (high + low) // 2
                else:
                    size = size * 2
                    if upper_u is not None:
                        size = min(size, upper_u)
            else:                                    # OOM
                high = size
                size = (high + low) // 2
                if high - low <= 1:
                    # Lightning stops here and returns `low`; ours: verify an assumed low=1
                    if low == 1 and 1 not in known and high > 1:
                        return self.granularity
                    return None


# ----------------------------------------------------------------------------------- guided


class GuidedPolicy(SearchPolicy):
    """Model-guided search: measured peaks predict the limit; probes only confirm it.

    The sequence on near-linear memory (``peak = fixed + per_sample * b``) with a known
    budget is five or six probes with one failure:

    1. ``init`` (a small size, 8 by default).
    2. A size whose peak would use at most ``first_jump`` of the budget even if *all* of the
       first peak scaled with the batch (so it fits on any linear device, and still fits
       after a +34% jump); or ``2 * init`` if that is larger and still fits in that worst
       case (less ``slack``).
    3. Draw the line through the two measurements closest to the largest fit
       (:func:`batchfit.core.memory_model.local_pair`, the two at least ``lo / span``
       apart) and predict where it meets the budget. ``rho`` is how far that extrapolates
       relative to the base of the line. A short extrapolation (``rho <= trust``) is taken
       in full; a long one, from small fixed-cost dominated sizes, stops ``caution * rho``
       of the way short (at most half) and below ``(1 - slack)`` of the budget, so that it
       fits: a fit costs a few seconds, an out-of-memory error ten more.
    4. The same from the new near-limit measurement, now usually a full step: exact.
    5. ``best + granularity``, expected to fail, which brackets the answer.

    After a failure the limit lies between the largest fit ``lo`` and the smallest failure
    ``hi`` (and once two probes have failed with an out-of-memory error, no probe goes above
    the split point, whatever the line says: the line has proved a poor guide up there):

    * if the line says ``hi`` overshoots the budget, it was a plain misprediction: regula
      falsi probes where the line meets the budget (after two fits in a row that moved the
      bracket little, no nearer than the split point, so it cannot stall);
    * if the line says ``hi`` should have fit, the device is not what the line describes.
      If fragmentation (a cap up to ``slack`` under the budget) can explain it and it is the
      first such failure, the probe goes where the line reaches ``(1 - slack)`` of the budget
      (or to the split point if that is higher). Otherwise (a jump, a lower cap), the bracket
      is split at ``split`` of its width from ``lo``: below the midpoint, since failures cost
      about four times as much as fits (0.3 to 0.35 minimises the expected time per halving
      of the bracket).

    Without a budget, without peaks, with memory that does not grow, or when a fit's peak
    exceeds the budget (the budget is not what limits the device), the search doubles from
    ``init`` to the first failure, then splits brackets as above. Steps that keep fitting
    beyond the line's prediction grow geometrically, so a wrong line costs a few probes, not
    one per granule. Every size is a multiple of ``granularity`` and at most ``upper``; if
    ``upper`` fits it is the answer. Each probe lies strictly inside the current bracket, so
    the search terminates on any device, non-monotonic ones included; it also stops after
    ``max_trials`` probes and when the smallest size fails.

    Args:
        budget_bytes: the memory budget the peaks are compared with, or ``None`` if unknown.
        granularity: every size probed is a multiple of this. Default 1.
        upper: never probe above this (rounded down to a multiple of ``granularity``).
            Default ``None``.
        init: first size (rounded up to a multiple of ``granularity``). Default 8.
        max_trials: most probes. Default 40.
        first_jump: fraction of the budget the second probe may use in the worst case.
            Default 0.6.
        split: where a bracket is split when the line cannot tell, as a fraction of its
            width from the fitting end. Default 0.35.
        caution: how much a long extrapolation is shortened per unit of ``rho``. Default 0.1.
        trust: the ``rho`` up to which a predicted step is taken in full. Default 0.5.
        slack: fraction of the budget fragmentation may take: long steps stay that far
            below the budget, and a failure above that level is first searched at it.
            Default 0.03.
        span: the local line's two sizes are at least ``largest fit / span`` apart, which
            damps allocator rounding and step-to-step jitter in the slope (measured: an LSTM's
            peak varied 10% between batch 294 and 295). Default 4.
        saturation: the fraction of the budget a fitting peak must stay under (the device's
            rule for "fits"; batchfit's probes use 0.02, see ``ProbeRunner``'s
            ``limit_margin``). Predictions aim at ``(1 - saturation) * budget``, and peaks
            above it (measured where the allocator waited for memory) are not used to draw
            the line. Default 0.0.
        tolerance: stop once the largest fit is within this fraction below the smallest
            failure (``hi - lo <= tolerance * lo``), instead of bracketing to one granule.
            Near a capped allocator's limit which sizes fit is not sharp (the same size fits
            in one process and not in the next, within 1-3%, measured), so the last few
            probes of an exact bracket buy little. Default 0.0 (exact).
        prior: ``(fixed_bytes, per_sample_bytes)``: a line known before any probe (an XLA
            step's compile-time memory, :mod:`batchfit.core.estimate`), used with a budget.
            Until three fits have measured peaks, each size comes from it, its slope trusted and
            its intercept corrected by the measured peaks
            (:func:`batchfit.core.estimate.guided_next`); before a fit one failure steps 3%
            down, a second hands over to the search without it. Pass the predicted boundary
            as ``init`` (:func:`batchfit.core.estimate.guided_start`). A line 1.5% off is
            bracketed in three or four probes. Default ``None``.
        prior_peak: ``(fixed_bytes, per_sample_bytes)``: what a probe's measured peak is
            predicted to read, where that differs from what must fit (``prior``): an XLA
            step on TensorFlow's allocator needs room for its temporaries twice over, which
            no peak shows (:mod:`batchfit.verbs.maxbatch_xla`). A fit's peak corrects the
            prior by how far it read from this line. Default: ``prior``.

    Example:

    >>> budget, fixed, per_sample = 1000e6, 100e6, 3e6       # the limit is 300
    >>> device = lambda b: Trial(b, (p := fixed + per_sample * b) <= budget, p)
    >>> policy = GuidedPolicy(budget)
    >>> history = run_search(policy, device)
    >>> [t.batch_size for t in history], policy.best(history), policy.bracketed(history)
    ([8, 38, 169, 286, 300, 301], 300, True)
    """

    name = "guided"

    def __init__(self, budget_bytes: float | None, granularity: int = 1,
                 upper: int | None = None, *, init: int | None = None, max_trials: int = 40,
                 first_jump: float = 0.6, split: float = 0.35, caution: float = 0.1,
                 trust: float = 0.5, slack: float = 0.03, span: int = 4,
                 saturation: float = 0.0, tolerance: float = 0.0,
                 prior: tuple[float, float] | None = None,
                 prior_peak: tuple[float, float] | None = None) -> None:
        if budget_bytes is not None and (
                not is_number(budget_bytes)
                or not math.isfinite(budget_bytes) or budget_bytes <= 0):
            raise InvalidInputError(
                f"budget_bytes must be a positive finite number of bytes or None, got "
                f"{budget_bytes!r} (parse text such as '16GiB' with batchfit.core.sizes)")
        self.budget_bytes = None if budget_bytes is None else float(budget_bytes)
        self.granularity = int(_check_int("granularity", granularity, 1))  # type: ignore[arg-type]
        self.upper = _check_upper(upper, self.granularity)
        g = self.granularity
        first = 8 if init is None else int(_check_int("init", init, 1))  # type: ignore[arg-type]
        self.init = -(-first // g) * g
        if self.upper is not None:
            self.init = min(self.init, self.upper)
        self.max_trials = int(_check_int("max_trials", max_trials, 1))  # type: ignore[arg-type]
        self.first_jump = _check_fraction("first_jump", first_jump, 0.0, 1.0)
        self.split = _check_fraction("split", split, 0.0, 1.0)
        self.caution = _check_fraction("caution", caution, 0.0, 10.0)
        self.trust = _check_fraction("trust", trust, 0.0, 100.0)
        self.slack = _check_fraction("slack", slack, -1e-12, 1.0)
        self.span = int(_check_int("span", span, 1))  # type: ignore[arg-type]
        self.saturation = _check_fraction("saturation", saturation, -1e-12, 1.0)
        self.tolerance = _check_fraction("tolerance", tolerance, -1e-12, 0.5)
        self.prior = _check_prior(prior)
        self.prior_peak = _check_prior(prior_peak)

    # -- public -----------------------------------------------------------------------------

    def next_size(self, history: Sequence[Trial]) -> int | None:
        """The next size to probe (see the class docstring), or ``None`` when done.

        Args:
            history: the trials made so far.

        Returns:
            A multiple of ``granularity`` strictly between the largest fit and the smallest
            failure, at most ``upper``; or ``None``.

        Example:

        >>> GuidedPolicy(None).next_size([Trial(8, True), Trial(16, True)])
        32
        """
        hist = list(history)
        if len(hist) >= self.max_trials:
            return None
        lo, hi = _bracket(hist)
        g = self.granularity
        first = (lo // g + 1) * g                    # smallest candidate above lo
        last = self.upper
        if hi is not None:
            below_hi = ((hi - 1) // g) * g           # largest candidate below hi
            last = below_hi if last is None else min(last, below_hi)
        if last is not None and first > last:
            return None                              # bracketed, or upper reached
        if self._within_tolerance(lo, hi):
            return None
        closing = self._closing_size(lo, hi)
        if closing is not None and (last is None or closing <= last):
            return closing
        prior = self._prior_target(hist, lo, hi) if hist else None
        if not hist:
            target = float(self.init)
        elif prior is not None:
            target = float(prior)
        else:
            target = self._target(hist, lo, hi)
            if hi is not None and lo > 0 and any(
                    t.batch_size == hi and not t.fits and t.peak_bytes is not None for t in hist):
                # The failure above is a cheap one (it ran, and measured a peak over the usable
                # budget: no out-of-memory wait), so there is no reason to stay near the fitting
                # end: keep each probe in the middle half of the bracket, which at least halves
                # it every two probes however the line errs.
                width = hi - lo
                target = min(max(target, lo + 0.25 * width), lo + 0.75 * width)
        # (1e-6 of a granule forgives float error when the limit is an exact multiple)
        size = math.floor(target / g + 1e-6) * g if math.isfinite(target) else first
        size = max(size, first)
        if last is not None:
            size = min(size, last)
        return size

    def bracketed(self, history: Sequence[Trial]) -> bool:
        """Whether :meth:`best` is exact to the granularity, or within :attr:`tolerance`.

        Example:

        >>> p = GuidedPolicy(None, tolerance=0.02)
        >>> p.bracketed([Trial(100, True), Trial(102, False)])
        True
        """
        lo, hi = _bracket(history)
        return super().bracketed(history) or self._within_tolerance(lo, hi)

    # -- internals --------------------------------------------------------------------------

    def _prior_target(self, hist: list[Trial], lo: int, hi: int | None) -> int | None:
        """The size the prior line gives, or ``None`` (no prior, or it no longer leads).

        Used until three fits have measured peaks. From the largest fit with a peak,
        :func:`~batchfit.core.estimate.guided_next` keeps the prior's slope and corrects its
        intercept by what the peak read above :attr:`prior_peak`'s prediction for that size;
        once a second size fits (the prior over-counts), the peak line says how far is left.
        Before any fit, one failure steps down: by its peak where it ran without waiting (a
        peak under the budget itself), else 3%; a second failure (a peak that reads the
        budget says nothing: the capped allocator waited), or a size outside the open bracket, hands over to the search without a prior
        (measured: an XLA step on TensorFlow's capped CPU allocator failed at half of its
        compile-time peak's limit).
        """
        if self.prior is None or self.budget_bytes is None:
            return None
        fitted = len({t.batch_size for t in hist if t.fits and t.peak_bytes is not None})
        if fitted >= 3:
            return None
        from ..results.estimate import LinearFit
        from .estimate import guided_next

        g = self.granularity
        fixed, slope = self.prior
        peak_fixed, peak_slope = self.prior_peak or self.prior
        fit = next((t for t in hist if t.fits and t.peak_bytes is not None
                    and t.batch_size == lo), None)
        failures = sum(1 for t in hist if not t.fits)
        if failures >= 2:
            return None                              # two misses: the line is no guide
        if fit is not None:
            peak = float(fit.peak_bytes)  # type: ignore[arg-type]
            offset = peak - (peak_fixed + peak_slope * lo)
            need = fixed + offset + slope * lo
            usable = (1.0 - self.saturation) * self.budget_bytes
            if fitted < 2 and need - usable <= 0.02 * self.budget_bytes:  # room, or at it
                size = guided_next(LinearFit(fixed_bytes=fixed + offset, per_sample_bytes=slope),
                                   self.budget_bytes, lo, True, need, margin=self.saturation,
                                   granularity=g)
            else:
                # It fitted where the prior says it is well over, or a second time (the size
                # above the prior's boundary): the prior over-counts for this model, by a
                # little or by a lot. The peak line says how far is left, but an XLA step's
                # peak reads about half the budget at its limit (the example CNN at 128 MiB,
                # predicted 41: 41 and 42 fitted, the peak line said 77, and 77, 53, 46 and 44
                # ran out of memory, 10 s each). So a second fit steps up by at most 2%: a
                # failure there ends the search within tolerance, and a third fit hands over
                # to the peak line (the plain search), where the prior was far off.
                extra = max(0.0, usable - peak) / peak_slope
                step = int(extra // g) * g
                if fitted >= 2:
                    step = min(step, math.ceil(0.02 * lo / g) * g)
                size = lo + max(g, math.ceil(0.01 * lo / g) * g, step)
        elif lo == 0 and hi is not None:
            over = next((t for t in hist if not t.fits and t.batch_size == hi
                         and t.peak_bytes is not None
                         and t.peak_bytes < (1.0 - 0.005) * self.budget_bytes), None)
            if over is not None:
                # It ran, and its peak (not the budget's: no wait) came just over the usable
                # budget: correct the prior by it, as after a fit.
                measured = float(over.peak_bytes)  # type: ignore[arg-type]
                offset = measured - (peak_fixed + peak_slope * hi)
                usable = (1.0 - self.saturation) * self.budget_bytes
                size = (math.ceil((usable - fixed - offset) / slope / g) - 1) * g  # strictly under
                size = min(size, hi - g)
            else:
                size = math.floor(0.97 * hi / g) * g  # a small miss of the prediction: 3% down
        else:
            return None
        if size <= lo or (hi is not None and size >= hi) or size < g:
            return None
        return size

    def _within_tolerance(self, lo: int, hi: int | None) -> bool:
        return self.tolerance > 0 and hi is not None and lo > 0 and hi - lo <= self.tolerance * lo

    def _closing_size(self, lo: int, hi: int | None) -> int | None:
        """The one probe that ends a search within tolerance, fit or fail, if there is one.

        The smallest size ``c`` (a multiple of ``granularity``) that, if it fits, is within
        :attr:`tolerance` below ``hi``; used when, if it fails, ``lo`` is within tolerance
        below ``c``. Possible once ``lo >= hi / (1 + tolerance)**2`` (up to rounding). It is
        the lowest such size, so the likeliest to fit: one probe instead of the two or three a
        split can take in a bracket this narrow (measured: the transformer at 128 MiB, fit at
        294 and out of memory at 303, took 301 and 296, both out of memory).

        Example:

        >>> GuidedPolicy(None, tolerance=0.02)._closing_size(294, 303)
        298
        >>> GuidedPolicy(None, tolerance=0.02)._closing_size(250, 303) is None  # too wide
        True
        """
        if self.tolerance <= 0 or hi is None or lo <= 0:
            return None
        g = self.granularity
        c = math.ceil(hi / (1.0 + self.tolerance) / g - 1e-9) * g
        if not lo < c < hi:
            return None
        if hi - c <= self.tolerance * c and c - lo <= self.tolerance * lo:
            return c
        return None

    def _bisect(self, lo: int, hi: int | None, split: float | None = None) -> float:
        """Where to probe when the memory model cannot tell: double, or split the bracket.

        The split point (``split`` of the width from ``lo``, default :attr:`split`) is rounded
        to the nearest multiple of ``granularity`` (at least one above ``lo``), so a narrow
        bracket does not degenerate into one-granule steps.
        """
        g = self.granularity
        if hi is None:
            return 2.0 * max(lo, g)
        granules = (hi - lo) / g
        split = self.split if split is None else split
        step = min(max(1, round(split * granules)), max(1, math.ceil(granules) - 1))
        return lo + step * g

    @staticmethod
    def _cheap_failure(hist: Sequence[Trial], hi: int | None) -> bool:
        """Whether the smallest failure ran and measured a peak (no out-of-memory wait)."""
        return hi is not None and any(t.batch_size == hi and not t.fits
                                      and t.peak_bytes is not None for t in hist)

    def _target(self, hist: list[Trial], lo: int, hi: int | None) -> float:
        """The (unrounded) size to probe next, given a non-empty history."""
        if lo == 0:                                  # nothing fits below the smallest failure
            return self._bisect(0, hi)
        # A failure that cost no more than a fit (it ran, and measured a peak over the usable
        # budget) gives no reason to favour the fitting end: split such a bracket in half.
        split = 0.5 if self._cheap_failure(hist, hi) else self.split
        if self.budget_bytes is None:
            return self._bisect(lo, hi, split)
        # The usable budget: a peak within `saturation` of the budget does not count as
        # fitting (near a capped allocator's limit TensorFlow waits for memory to be freed, the
        # peak reads "the budget" for a whole band of sizes, and passing is a matter of
        # timing). Such a peak is censored: it says where the band is, not what the size needs.
        budget = censor = (1.0 - self.saturation) * self.budget_bytes
        fit_peaks = [float(t.peak_bytes) for t in hist if t.fits and t.peak_bytes is not None]
        if any(m > budget for m in fit_peaks):
            return self._bisect(lo, hi, split)       # the budget cannot guide this search
        measured = [t for t in hist if t.peak_bytes is not None
                    and math.isfinite(t.peak_bytes) and t.peak_bytes >= 0]
        peaks = [(t.batch_size, float(t.peak_bytes)) for t in measured
                 if t.peak_bytes < censor]
        if len({b for b, _ in peaks}) < 2:           # too few left to draw a line: use all
            peaks = [(t.batch_size, float(t.peak_bytes)) for t in measured]
        if not peaks:
            return self._bisect(lo, hi, split)
        sizes = {b for b, _ in peaks}
        if len(sizes) >= 2:
            # streak: fits since the last failure; crawl: how many of the latest of them
            # were, one after the other, tiny steps up from the fit before.
            streak = crawl = 0
            crawling = True
            tiny = 0.01 * lo
            for t, before in zip(reversed(hist), reversed([None, *hist[:-1]])):
                if not t.fits:
                    break
                streak += 1
                crawling = crawling and before is not None and before.fits and (
                    0 < t.batch_size - before.batch_size <= tiny)
                crawl += crawling
            fails = [t.batch_size for t in hist if not t.fits]
            prev_lo = max((t.batch_size for t in hist if t.fits and t.batch_size < lo),
                          default=0)
            target = self._model_target(peaks, lo, hi, budget, fails, streak, crawl, prev_lo,
                                        split)
            if target is None:
                return self._bisect(lo, hi, split)
            misses = sum(1 for t in hist if not t.fits and t.peak_bytes is None)
            if hi is not None and misses >= 2:
                # The line has already led to two costly failures (an out-of-memory error
                # each): memory is not linear up there (a kernel switching strategy made a
                # demo conv net's peak jump 25% from one batch to the next, measured). Stop
                # betting on it near the failing end: never above the split point.
                return min(target, self._bisect(lo, hi, split))
            return target
        if hi is None and lo in sizes:
            (m_lo,) = [m for b, m in peaks if b == lo]
            if m_lo > 0:
                # One point. In the worst case all of m_lo scales with the batch (fixed = 0),
                # and lo * budget / m_lo is the limit: aim at `first_jump` of it, or double
                # lo where doubling stays under that bound (minus the fragmentation slack).
                bound = lo * budget / m_lo
                return max(self.first_jump * bound, min(2.0 * lo, (1.0 - self.slack) * bound))
        return self._bisect(lo, hi, split)

    def _model_target(self, peaks: list[tuple[int, float]], lo: int, hi: int | None,
                      budget: float, fails: list[int], streak: int, crawl: int,
                      prev_lo: int, split: float) -> float | None:
        """Model-guided size, or ``None`` when the local line is no guide."""
        # Imported here: the policy names above are read by the CLI's parser, which stays
        # free of NumPy (the memory model's) until a command runs.
        from .memory_model import fit_memory_model, local_pair

        g = self.granularity
        (a, m_a), (p, m_p) = local_pair(peaks, near=lo, min_span=max(g, lo // self.span))
        slope = (m_a - m_p) / (a - p)
        if not slope > 0:
            # Noisy neighbours (peaks jitter by a few percent from step to step): the least
            # squares line over every measurement is the steadier guide.
            line = fit_memory_model(peaks)
            slope = line.per_sample_bytes
            if not slope > 0:
                return None                          # flat or falling memory: no prediction
            (a, m_a) = (lo, line.predict(lo))
        fixed = m_a - slope * a
        predicted = (budget - fixed) / slope         # where the local line meets the budget
        m_lo = next((m for b, m in peaks if b == lo), fixed + slope * lo)
        if hi is not None:
            m_hi = fixed + slope * hi
            if m_hi > budget:
                if streak >= 2 and lo - prev_lo < self.split * (hi - prev_lo):
                    # Two fits in a row since the last failure, the last one a small step:
                    # the line keeps under-predicting (regula falsi stalling on one side);
                    # make sure the bracket shrinks.
                    return max(predicted, self._bisect(lo, hi, split))
                return predicted                     # regula falsi inside (lo, hi)
            # The device refused a size the line says fits: fragmentation (the cap sits up
            # to `slack` under the budget), a jump, or a cap below the budget. If
            # fragmentation can explain it (hi's peak would be above (1 - slack) of the
            # budget), and it is the first such failure, bet on it: probe at (1 - slack) of
            # the budget, or at the split point if that is higher. Else split the bracket.
            surprised = sum(1 for f in fails if fixed + slope * f <= budget)
            floor = (1.0 - self.slack) * budget
            if surprised > 1 or m_hi <= floor or m_lo >= m_hi:
                return None
            target = max(m_lo + split * (m_hi - m_lo), floor)
            return lo + (target - m_lo) / slope
        # Extrapolating upwards. Fits the line says cannot fit, or a run of tiny steps that
        # all fit (noisy peaks close to the budget), mean it under-predicts: grow
        # geometrically instead of crawling one granule at a time.
        surprises = sum(1 for b, _ in peaks if lo >= b > predicted + 0.5 * g) + max(0, crawl - 1)
        if surprises:
            return max(predicted, lo + g * 2.0**surprises)
        rho = (predicted - lo) / abs(a - p)
        below_slack = ((1.0 - self.slack) * budget - fixed) / slope
        if rho <= self.trust or below_slack < lo + g:
            return predicted                         # short step: go all the way
        # A long extrapolation: stop short, by `caution * rho` of the way (at most half),
        # and below the fragmentation slack, so that this probe fits.
        shortened = lo + (1.0 - min(0.5, self.caution * rho)) * (predicted - lo)
        return min(shortened, below_slack)


# ------------------------------------------------------------------------------ entry points


def _is_distribution(obj: Any) -> bool:
    """Whether ``obj`` looks like a distribution strategy (``tf.distribute.Strategy``)."""
    return hasattr(obj, "scope") and hasattr(obj, "num_replicas_in_sync")


def check_search(search: Any, *, name: str = "search") -> str:
    """``search`` when it names a search policy of :data:`POLICY_NAMES`.

    Args:
        search: what the caller passed.
        name: the argument as the caller wrote it (``"search"``, ``"strategy"`` for the
            deprecated alias, or a CLI option, ``"--strategy"``).

    Returns:
        The policy's name.

    Raises:
        InvalidInputError: anything else; a ``tf.distribute`` strategy gets a message that
            says to pass it as ``distribute=``.

    Example:

    >>> check_search("binsearch")
    'binsearch'
    >>> check_search("fastest")
    Traceback (most recent call last):
    ...
    batchfit.errors.InvalidInputError: unknown search policy 'fastest' (search=): choose one of guided, binsearch, power
    """
    if isinstance(search, str) and search in POLICY_NAMES:
        return search
    arg = name if name.startswith("-") else f"{name}="  # a CLI option, or a keyword
    if _is_distribution(search):
        raise InvalidInputError(
            f"{arg} is the memory search policy ({', '.join(POLICY_NAMES)}), not a "
            f"tf.distribute strategy: pass the {type(search).__name__} as distribute= "
            f"(e.g. find_max_batch_size(model, distribute=strategy))")
    shown = repr(search) if isinstance(search, (str, int, float)) or search is None else (
        f"<{type(search).__name__}>")
    raise InvalidInputError(f"unknown search policy {shown} ({arg}): choose one of "
                            f"{', '.join(POLICY_NAMES)}")


def search_argument(search: Any = None, strategy: Any = None, *, stacklevel: int = 3) -> str:
    """The search policy from ``search=`` and its deprecated alias ``strategy=``.

    ``strategy=`` was the search policy's name until ``search=`` replaced it (``strategy``
    means ``tf.distribute`` everywhere else, which is ``distribute=``); it still works for
    one release, with a :class:`FutureWarning` (shown to users by default, unlike a
    ``DeprecationWarning``).

    Args:
        search: ``"guided"``, ``"binsearch"``, ``"power"``, or ``None`` for
            :data:`DEFAULT_SEARCH`.
        strategy: the deprecated alias of ``search`` (``None`` when not given).
        stacklevel: where the warning points, as for :func:`warnings.warn` (default: the
            caller of the function that calls this one).

    Returns:
        The policy's name.

    Raises:
        InvalidInputError: an unknown policy, both arguments given, or a ``tf.distribute``
            strategy (the message says to pass it as ``distribute=``).

    Example:

    >>> search_argument(), search_argument("power")
    ('guided', 'power')
    """
    if strategy is None:
        return check_search(DEFAULT_SEARCH if search is None else search)
    if _is_distribution(strategy):
        check_search(strategy, name="strategy")  # raises: pass it as distribute=
    if search is not None:
        raise InvalidInputError("give search= only: strategy= is its deprecated old name")
    warnings.warn("strategy= is deprecated and will be removed in the next release: the search "
                  "policy is search= (a tf.distribute strategy goes in distribute=)",
                  FutureWarning, stacklevel=stacklevel)
    return check_search(strategy, name="strategy")


def make_policy(name: str, *, budget_bytes: float | None = None, granularity: int = 1,
                upper: int | None = None, init: int | None = None,
                saturation: float = 0.0, tolerance: float = 0.0,
                prior: tuple[float, float] | None = None,
                prior_peak: tuple[float, float] | None = None) -> SearchPolicy:
    """Build a search policy by name.

    Args:
        name: ``"guided"``, ``"binsearch"`` or ``"power"`` (case-insensitive).
        budget_bytes: the memory budget, used by ``"guided"`` only; ``None`` if unknown.
        granularity: every size probed is a multiple of this. Default 1.
        upper: never probe above this. Default ``None``.
        init: first size; default 8 for ``"guided"`` and 2 (Lightning's) for the others.
        saturation: ``"guided"`` only: the fraction of the budget a fitting peak stays under
            (see :class:`GuidedPolicy`). Default 0.0.
        tolerance: ``"guided"`` only: stop once the answer is within this fraction below the
            smallest failure (see :class:`GuidedPolicy`). Default 0.0 (exact).
        prior, prior_peak: ``"guided"`` only: ``(fixed_bytes, per_sample_bytes)`` known before
            any probe, and what a peak reads (see :class:`GuidedPolicy`). Default ``None``.

    Returns:
        The policy.

    Raises:
        InvalidInputError: for an unknown name, ``granularity < 1``, ``upper < 1`` or below
            ``granularity``, ``init < 1``, or a budget that is not a positive number.

    Example:

    >>> make_policy("guided", budget_bytes=2**30, granularity=8).name
    'guided'
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in POLICY_NAMES:
        raise InvalidInputError(
            f"unknown search strategy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
    if key == "guided":
        return GuidedPolicy(budget_bytes, granularity, upper, init=init, saturation=saturation,
                            tolerance=tolerance, prior=prior, prior_peak=prior_peak)
    cls = PowerPolicy if key == "power" else BinsearchPolicy
    return cls(2 if init is None else init, upper=upper, granularity=granularity)


def run_search(policy: SearchPolicy, trial: Callable[[int], Trial], *,
               max_probes: int = 60) -> list[Trial]:
    """Drive ``policy`` with ``trial`` until it stops or ``max_probes`` probes were made.

    A size the policy asks for a second time is not probed again: the earlier
    :class:`Trial` is passed back to the policy instead (the built-in policies never ask
    twice). The search also stops if a policy keeps asking only for sizes already probed.

    Args:
        policy: the search policy.
        trial: probes one batch size and returns its :class:`Trial` (with that
            ``batch_size``). Exceptions it raises propagate.
        max_probes: most calls of ``trial``. Default 60.

    Returns:
        The trials made, in order, each size once. ``policy.best(result)`` is the answer.

    Raises:
        InvalidInputError: if ``max_probes < 1``, the policy returns something other than a
            positive ``int``, or ``trial`` returns something other than a :class:`Trial` for
            the size asked.

    Example:

    >>> made = run_search(PowerPolicy(init=8), lambda b: Trial(b, fits=b <= 40))
    >>> [t.batch_size for t in made]
    [8, 16, 32, 64]
    """
    max_probes = int(_check_int("max_probes", max_probes, 1))  # type: ignore[arg-type]
    made: list[Trial] = []
    view: list[Trial] = []                          # what the policy sees (repeats included)
    seen: dict[int, Trial] = {}
    repeats = 0
    while len(made) < max_probes:
        size = policy.next_size(view)
        if size is None:
            break
        if not is_int(size) or size < 1:
            raise InvalidInputError(
                f"policy {policy.name!r} asked for batch size {size!r}; expected an int >= 1")
        if size in seen:
            repeats += 1
            if repeats > max_probes:
                break                                # the policy is going round in circles
            view.append(seen[size])
            continue
        outcome = trial(size)
        if not isinstance(outcome, Trial) or outcome.batch_size != size:
            raise InvalidInputError(
                f"the trial function must return a Trial for batch size {size}, got {outcome!r}")
        seen[size] = outcome
        made.append(outcome)
        view.append(outcome)
    return made
