"""When has a probe's peak settled? Pure logic; the probe reads the allocator.

A training step's peak under TensorFlow's BFC allocator is not the same at every step: the
allocator hands out a free chunk whole when it is less than twice the request, and which chunks
are free depends on the steps before, so the bytes in use at a step's worst moment creep up for
a while before they level off. Measured (capped allocator, the worker's settings, peak after
each step): ResNet50 (64x64, Adam) at batch 16 read 385, 429, 446 MiB after steps 1-3, 456 at
step 4, 464 at 7, 470 from step 15 on (24 steps); the CNN of the examples at 150 read 80, 85,
88 after steps 1-3 and 94 from step 9; the Transformer 42.5 MiB at every step. Three steps
(Lightning's and Accelerate's choice, and batchfit's until session 13) saw 5-7% less than the
user's training meets: ResNet50's answer of 22 under 512 MiB trained in 2 of 3 fresh processes
with 4 batches and ran out of memory 2 of 2 with 8.

So a probe runs its steps as epochs over the same batches (as ``fit`` runs epochs) until the peak
has risen by no more than a tolerance in ``quiet`` epochs in a row, or ``max_epochs`` have run.

Settling decides a verdict only near the budget. A probe far under it ends after two epochs (one
validation pass and the training epoch after it) when its peak, rising by its largest rise so far
in every epoch left, would still stay under the line a fit must stay under (``clear_below``):
more epochs could not change the verdict unless the creep sped up, which no measurement showed
(every one above slows). Measured before this rule (session 18): ResNet50's ``max`` under 768
MiB spent about 21 minutes in 15 probes of up to 8 epochs at 1-2 s a step, most of them far
under the budget.

Example:

>>> rule = SettleRule(tolerance_bytes=1.0, quiet=2, max_epochs=8)
>>> rule.settled([446.0])                 # one epoch: keep going
False
>>> rule.settled([446.0, 456.0, 465.0, 466.0, 470.0, 470.5])
False
>>> rule.settled([446.0, 456.0, 465.0, 466.0, 470.0, 470.5, 470.5])
True
>>> SettleRule(tolerance_bytes=1.0, quiet=2, max_epochs=3).settled([1.0, 5.0, 9.0])
True
>>> far = SettleRule(tolerance_bytes=1.0, max_epochs=8, clear_below=745.0)
>>> far.settled([456.0, 464.0])           # 464 + 6 epochs x 8 = 512: cannot reach 745
True
>>> far.settled([690.0, 700.0])           # 700 + 6 x 10 = 760: it could
False
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

from ..errors import InvalidInputError

#: tolerance: a share of the budget (0.25%: 1.3 MiB of 512 MiB), at least 64 KiB
SETTLE_SHARE = 0.0025
SETTLE_MIN_BYTES = 64 << 10

#: training steps per epoch of a probe. Keras's pipeline for arrays (a gather per batch, run
#: ahead of the step by ``prefetch(AUTOTUNE)``) is still producing batches while the step runs
#: only in an epoch with batches left to fetch; the step's peak differs then. Measured (the
#: worker's settings, fresh processes): the CNN of the examples at 166 under 128 MiB read 91-114
#: MiB in probes of 3 steps, 102-124 with 4, 126.1 (the cap's band) with 5 and 6 (of which 4
#: MiB are the 2 more batches of data); the Transformer at 114 under 64 MiB (its data: 29 KiB a
#: batch) fitted in probes of 3 steps and ran out of memory in 9 of 9 of 4, 6 and 8 steps, as
#: ``fit`` on arrays did with 8 batches an epoch (2 of 2, also with ``steps_per_epoch=3`` over 8
#: batches: what matters is data left to fetch, not the epoch's length). Three steps
#: (Lightning's choice, and batchfit's until session 15) probe the end of a short epoch, not the
#: steps a user's epoch of many batches is made of.
PROBE_STEPS = 5

#: A probe whose peak comes within this share of the budget is ``at_limit``, not a fit. 2% until
#: session 16. Measured (bench_trust, the LSTM of the examples under 16 MiB, 5 searches): one
#: search's answer, 293, peaked at 96.3-97.5% of the budget in 4 of 4 fresh processes, and the
#: user's own ``fit`` at 293 trained 1 of 3 (the largest size that trained 3 of 3 was 284); the
#: other four answers (279-287) peaked at 93-96% and trained 3 of 3. Also the smallest margin
#: ``safe_batch_size`` keeps (``core.confirm.MIN_MARGIN``): a capped allocator refused sizes
#: whose peak was up to 3% under its cap.
LIMIT_MARGIN = 0.03

#: A training step's peak near the budget counts against a size only where the typical step
#: (the median of the probe's steps) also comes within this share of it. Under TensorFlow's BFC
#: allocator a step's bytes in use include chunks handed out whole (a free chunk less than twice
#: the request), so which chunks the next batch's gather (run ahead of the step) happened to take
#: decides how much of the cap a step appears to use. Measured (the worker's settings, the
#: user's ``fit`` of 40 epochs of 4 batches, the peak read around every step, fresh processes,
#: ``bench/bench_step_peaks.py``): the CNN of the examples under 256 MiB at 340, 360 and 375
#: read 73-76% of the budget in the median step and 99% in some, and trained all 160 steps; from
#: 380 the median step read 96%, and at 385 and 395 ``fit`` ran out of memory in some processes
#: (steps 24-95). The LSTM's steps are uniform: its 293 (which the user's ``fit`` trained 1 of
#: 3) reads 95.9% in the median step, so 5% keeps it ``at_limit``. The probes' largest peak
#: alone had put the CNN's answer at 318-332 where the user's ``fit`` trains 382 (3 of 3).
TYPICAL_MARGIN = 0.05


def limit_outcome(peak: float, budget: float, *, typical: float | None = None,
                  margin: float = LIMIT_MARGIN,
                  typical_margin: float = TYPICAL_MARGIN) -> str:
    """A probe's verdict from its peak: ``"fits"``, ``"at_limit"`` or ``"over_budget"``.

    Args:
        peak: the largest peak the probe read (bytes).
        budget: the memory budget (bytes).
        typical: the median training step's peak, where the largest peak came from training
            steps (``None`` where it came from elsewhere, e.g. the validation step, or is
            unknown: then the largest peak decides alone).
        margin: a peak within this share of the budget is ``at_limit``...
        typical_margin: ...unless the typical step stays below this share of it.

    Example:

    >>> limit_outcome(90.0, 100.0)
    'fits'
    >>> limit_outcome(98.0, 100.0)                  # near the cap: too close to count
    'at_limit'
    >>> limit_outcome(99.0, 100.0, typical=75.0)    # near it in a few steps only
    'fits'
    >>> limit_outcome(99.0, 100.0, typical=96.0)    # near it in the typical step
    'at_limit'
    >>> limit_outcome(101.0, 100.0, typical=75.0)
    'over_budget'
    """
    if peak > budget:
        return "over_budget"
    if peak < (1.0 - margin) * budget:
        return "fits"
    if typical is not None and typical < (1.0 - typical_margin) * budget:
        return "fits"
    return "at_limit"


def limit_note(outcome: str, peak: float, budget: float, *, typical: float | None = None,
               margin: float = LIMIT_MARGIN, what: str = "peak") -> str:
    """What a verdict of :func:`limit_outcome` says, in words (empty: nothing to say).

    Args:
        outcome: the verdict, as :func:`limit_outcome` gave it for the same arguments.
        peak: the largest peak (bytes).
        budget: the memory budget (bytes).
        typical: the median training step's peak, as given to :func:`limit_outcome`.
        margin: the margin the verdict used.
        what: how the peak was known (``"predicted peak"`` for a compile-time figure).

    Example:

    >>> limit_note("over_budget", 101.0, 100.0, what="predicted peak")
    'predicted peak exceeds the budget'
    >>> limit_note("fits", 99.0, 100.0, typical=75.0)
    'peak within 3% of the budget in some training steps only (the typical step 75% of it): counted as fitting'
    >>> limit_note("fits", 50.0, 100.0)
    ''
    """
    if outcome == "over_budget":
        return f"{what} exceeds the budget"
    if outcome == "at_limit":
        return (f"{what} within {margin:.0%} of the budget: too close to count as fitting (near "
                f"the cap the same size fits in one process and not in the next)")
    if outcome == "fits" and typical is not None and peak >= (1.0 - margin) * budget:
        return (f"{what} within {margin:.0%} of the budget in some training steps only (the "
                f"typical step {typical / budget:.0%} of it): counted as fitting")
    return ""


@dataclass(frozen=True)
class SettleRule:
    """Stop a probe's epochs once its peak has stopped rising.

    Args:
        tolerance_bytes: a rise of at most this much over one epoch counts as quiet.
        quiet: quiet epochs in a row that end the probe (default 2).
        max_epochs: epochs after which the probe ends anyway (default 8; ``1``: one epoch,
            the probe's steps only).
        clear_below: the line a fitting peak stays under (bytes; ``None``: no such line). After
            two epochs, a peak that would stay under it even rising by its largest rise so far
            in every epoch left ends the probe: more epochs cannot change its verdict.
    """

    tolerance_bytes: float
    quiet: int = 2
    max_epochs: int = 8
    clear_below: float | None = None

    def __post_init__(self) -> None:
        if self.quiet < 1 or self.max_epochs < 1 or self.tolerance_bytes < 0:
            raise InvalidInputError(
                f"SettleRule needs quiet >= 1, max_epochs >= 1 and tolerance_bytes >= 0; got "
                f"quiet={self.quiet}, max_epochs={self.max_epochs}, "
                f"tolerance_bytes={self.tolerance_bytes}")

    @classmethod
    def for_budget(cls, budget_bytes: int | None, *, max_epochs: int = 8,
                   limit_margin: float = LIMIT_MARGIN) -> SettleRule:
        """The rule for a budget: tolerance :data:`SETTLE_SHARE` of it, at least 64 KiB; a
        probe clear of ``(1 - limit_margin)`` of it ends early (no budget: no such line)."""
        return cls(tolerance_bytes=max(SETTLE_MIN_BYTES, SETTLE_SHARE * (budget_bytes or 0)),
                   max_epochs=max_epochs,
                   clear_below=None if not budget_bytes else (1.0 - limit_margin) * budget_bytes)

    def settled(self, peaks: list[float]) -> bool:
        """Whether to stop after the epochs whose peaks (cumulative, one per epoch) are given."""
        if len(peaks) >= self.max_epochs:
            return True
        if self._clear(peaks):
            return True
        if len(peaks) <= self.quiet:
            return False
        rises = [b - a for a, b in zip(peaks[-self.quiet - 1:-1], peaks[-self.quiet:])]
        return all(r <= self.tolerance_bytes for r in rises)

    def _clear(self, peaks: list[float]) -> bool:
        """Whether, after two epochs or more, the peak cannot reach :attr:`clear_below` in the
        epochs left at its largest rise so far (at least the tolerance) per epoch."""
        if self.clear_below is None or len(peaks) < 2:
            return False
        rise = max([self.tolerance_bytes] + [b - a for a, b in pairwise(peaks)])
        return peaks[-1] + rise * (self.max_epochs - len(peaks)) < self.clear_below
