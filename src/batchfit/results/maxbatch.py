"""Results of :func:`batchfit.find_max_batch_size`: probes, the memory model, the answer."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ._base import (
    SCHEMA_VERSION,
    _Serializable,
    register_result,
)

#: Outcomes a probe can have. Only ``"fits"`` counts as fitting.
PROBE_OUTCOMES = (
    "fits",          # the training steps ran within the budget
    "oom",           # ResourceExhaustedError (the allocator refused)
    "over_budget",   # ran, but the measured peak exceeded a budget that could not be enforced
    "at_limit",      # ran, but only by waiting for memory: peak within 2% of the budget
    "refused",       # the model itself raised at this size (e.g. a layer with a batch limit)
    "crashed",       # the isolated worker process died (segfault, killed by the kernel)
    "timeout",       # the probe exceeded its time limit and the worker was killed
)


@dataclass(frozen=True)
class Probe(_Serializable):
    """One measurement: a few real training steps at one batch size.

    Args:
        batch_size: the (per-replica) batch size tried.
        fits: whether it fits (``outcome == "fits"``).
        outcome: one of :data:`PROBE_OUTCOMES`.
        peak_bytes: the allocator's peak during the steps (``None`` when it failed or the
            device exposes no allocator statistics).
        seconds: wall time of the whole probe, tracing included.
        step_seconds: median time of one training step after the first (``None`` if unknown).
        detail: why it did not fit (the error's first line), or notes.
        phase: ``"search"`` (a probe the search policy asked for), ``"confirm"`` (one of the
            confirmations in a fresh process that end the search) or ``"safe"`` (the safe
            size probed in a fresh process under the framework's default settings). Files
            written before confirmation existed load with ``"search"``.
        reused: whether it ran in a worker process that had run smaller, fitting probes
            before (the model built and traced once for them); ``False``: a fresh process.
        typical_peak_bytes: the median training step's peak, where the largest peak came
            from a training step (``None`` otherwise, or where not measured): a peak near the
            budget in a few steps only still fits (:func:`batchfit.core.settle.limit_outcome`).
        epochs: the probe's training epochs that ended, each followed by a validation pass
            (``None`` where not counted): until its peak settled, or fewer where the peak
            stayed clear of the budget (:class:`batchfit.core.settle.SettleRule`).
    """

    batch_size: int
    fits: bool
    outcome: str
    peak_bytes: int | None = None
    seconds: float = 0.0
    step_seconds: float | None = None
    detail: str = ""
    phase: str = "search"
    reused: bool = False
    typical_peak_bytes: int | None = None
    epochs: int | None = None


@dataclass(frozen=True)
class MemoryModel(_Serializable):
    """A fitted linear memory model: ``bytes(batch) = fixed_bytes + per_sample_bytes * batch``.

    Args:
        fixed_bytes: intercept: weights, optimizer state and batch-independent workspace.
        per_sample_bytes: slope: activations, gradients and inputs per sample.
        r_squared: coefficient of determination of the fit (``None`` with two points).
        points: how many probes the fit used.
    """

    fixed_bytes: float
    per_sample_bytes: float
    r_squared: float | None = None
    points: int = 0

    def predict(self, batch_size: float) -> float:
        """Predicted peak bytes at ``batch_size``."""
        return self.fixed_bytes + self.per_sample_bytes * batch_size

    def max_batch(self, budget_bytes: float, granularity: int = 1) -> int:
        """Largest multiple of ``granularity`` predicted to fit in ``budget_bytes`` (0 if none)."""
        if self.per_sample_bytes <= 0:
            return 0
        b = int((budget_bytes - self.fixed_bytes) // self.per_sample_bytes)
        return max(0, (b // granularity) * granularity)


@dataclass(frozen=True)
class Band(_Serializable):
    """Where a size stops fitting reliably: what the search and its confirmations saw.

    Near a capped allocator's limit the same size fits in one fresh process and not in the
    next; the band says how wide that zone was in this run.

    Args:
        reliable: the largest size that fitted every time it was tried (confirmations
            included) and lies below every size that ever failed; ``0`` when none.
        sometimes: sizes seen both fitting and failing, in increasing order.
        never: the smallest size that was tried and never fitted (``None``: none failed).
        confirmations: fresh-process confirmations asked for at the answer (``k``; 0: none).
        confirmed: whether ``reliable`` fitted in all ``confirmations`` fresh processes.
        step_downs: how many times a failed confirmation moved the answer down.
        margin_bytes: what ``safe_batch_size`` keeps below the reliable edge's peak, in bytes
            (``None`` without a memory model).
        margin_reason: how that margin was sized, in words.
        safe_checks: fresh processes ``safe_batch_size`` was also probed in under the
            framework's default settings (0: not checked; see :mod:`batchfit.verbs.safe_check`).
        safe_confirmed: it fitted in all of them (after any step down).
        safe_settings: those settings, in words.
    """

    reliable: int = 0
    sometimes: list[int] = field(default_factory=list)
    never: int | None = None
    confirmations: int = 0
    confirmed: bool = False
    step_downs: int = 0
    margin_bytes: float | None = None
    margin_reason: str = ""
    safe_checks: int = 0
    safe_confirmed: bool = False
    safe_settings: str = ""


@register_result
@dataclass(frozen=True)
class MaxBatchResult(_Serializable):
    """What :func:`batchfit.find_max_batch_size` found.

    Args:
        max_batch_size: the largest batch size verified to fit: the reliable edge of the
            :attr:`band` (it fitted every time it was tried, in ``band.confirmations`` fresh
            processes too when confirmation ran).
        safe_batch_size: the reliable edge less a margin sized from the band's width and the
            spread of the measured peaks (see ``band.margin_bytes`` / ``band.margin_reason``),
            and at least ``headroom`` of the budget when one was asked for.
        headroom: fraction of the budget ``safe_batch_size`` is predicted to leave free (the
            fraction asked for, in results saved before the band existed).
        memory_budget_bytes: the budget searched under (``None`` if the device's total is
            unknown and the search ran until the device refused).
        budget_source: ``"user"`` (``memory=`` given) or ``"device"``.
        device: where the probes ran, e.g. ``"CPU:0"`` or ``"GPU:0 (NVIDIA H100)"``.
        isolation: ``"process"`` (an isolated worker with the budget enforced) or
            ``"in-process"`` (peaks measured in the caller's process against the budget).
        search: the search policy: ``"guided"``, ``"binsearch"`` or ``"power"`` (saved as
            ``"strategy"`` before it was renamed: such files still load, and ``to_dict``
            writes both keys for one release, so an older batchfit reads a new file).
        granularity: sizes searched are multiples of this.
        upper_bound: the largest size the search was allowed to try.
        bracketed: ``True`` when the search bracketed its edge: a failing size its answer
            ``+ granularity`` (or the bound) was observed, i.e. exact to the granularity, or
            the smallest failure within ``search_tolerance`` above it. Judged on the search's
            own probes: confirmations that step down below it leave the answer at the band's
            reliable edge (``band``), not a lower bound.
        memory_model: the linear model fitted to the probes that fit (``None`` with < 2).
        probes: every probe, in the order made.
        seconds: wall time of the whole search, worker start-up included.
        model_name: the model's name.
        notes: plain-language remarks (fallbacks taken, caveats).
        environment: versions and platform, for reproducing the run.
        replicas: replicas in sync under ``tf.distribute`` (1 without a strategy). With more
            than one, ``max_batch_size`` and ``safe_batch_size`` are *per replica* (probed on
            one device, the smallest replica device's memory), and the global sizes, the
            ``batch_size`` to pass to ``fit``, are ``global_max_batch_size`` and
            ``global_safe_batch_size`` (per replica x replicas).
        distribute: the strategy: ``"mirrored"``, ``"multiworker"``, or ``""`` for none.
        search_tolerance: the search stopped once the smallest failure was at most this
            fraction above ``max_batch_size`` (0: bracketed to the granularity).
        band: the reliable edge, the sizes that fitted only sometimes and the smallest that
            never fitted (:class:`Band`); results saved before it existed load with ``None``.
        xla_step: the probes ran an XLA-compiled training step (the model's ``jit_compile``,
            or ``jit=True``).
        xla_prediction: the largest batch the step's compile-time memory predicted under the
            probes' margin, where the search started (``None``: not an XLA step, no budget,
            or the step could not be compiled).
    """

    kind: ClassVar[str] = "max_batch"

    max_batch_size: int
    safe_batch_size: int
    headroom: float
    memory_budget_bytes: int | None
    budget_source: str
    device: str
    isolation: str
    search: str
    granularity: int
    upper_bound: int
    bracketed: bool
    memory_model: MemoryModel | None
    probes: list[Probe] = field(default_factory=list)
    seconds: float = 0.0
    model_name: str = ""
    notes: list[str] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)
    replicas: int = 1
    distribute: str = ""
    search_tolerance: float = 0.0
    band: Band | None = None
    xla_step: bool = False
    xla_prediction: int | None = None
    schema_version: int = SCHEMA_VERSION

    @property
    def global_max_batch_size(self) -> int:
        """The largest global batch: ``max_batch_size`` per replica x ``replicas``."""
        return self.max_batch_size * self.replicas

    @property
    def global_safe_batch_size(self) -> int:
        """The safe global batch: ``safe_batch_size`` per replica x ``replicas``."""
        return self.safe_batch_size * self.replicas

    @property
    def oom_count(self) -> int:
        """How many probes ran out of memory, crashed the worker or stalled (the costly failures)."""
        return sum(p.outcome in ("oom", "crashed", "timeout") for p in self.probes)

    @property
    def strategy(self) -> str:
        """Deprecated name of :attr:`search` (warns; goes in the next release)."""
        warnings.warn("MaxBatchResult.strategy is deprecated: the search policy is "
                      "MaxBatchResult.search", FutureWarning, stacklevel=2)
        return self.search

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MaxBatchResult:
        return super().from_dict(upgrade_max_batch_dict(data))  # type: ignore[no-any-return]

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["strategy"] = self.search  # the old key, for readers older than the rename
        data["oom_count"] = self.oom_count
        data["global_max_batch_size"] = self.global_max_batch_size
        data["global_safe_batch_size"] = self.global_safe_batch_size
        return data


def upgrade_max_batch_dict(data: Any) -> Any:
    """A saved ``max_batch`` result with the search policy under ``"search"``.

    Files written before the rename keep it under ``"strategy"`` (same schema version: the
    value is the same, only the key moved).
    """
    if isinstance(data, dict) and "search" not in data and "strategy" in data:
        data = {**data, "search": data["strategy"]}
    return data
