"""Results of ``profile_throughput`` and ``tune``: the throughput curve and the recommendation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ._base import SCHEMA_VERSION, _Serializable, register_result
from .maxbatch import MaxBatchResult, upgrade_max_batch_dict
from .noise import NoiseScaleResult


@dataclass(frozen=True)
class ThroughputPoint(_Serializable):
    """Steady-state training throughput at one batch size.

    Args:
        batch_size: the batch size measured.
        outcome: ``"ok"``, ``"oom"`` (out of memory at this size) or ``"failed"``.
        samples_per_second: median over the timed windows (``None`` unless ``"ok"``).
        low: the slowest window's samples/s.
        high: the fastest window's samples/s.
        cv: coefficient of variation over the windows.
        median_error: estimated relative standard error of the median (the timing went on
            until it reached the target or the window limit).
        step_seconds: median seconds per training step.
        steps_per_window: steps in each timed window, adapted to the step time.
        window_seconds: wall time of each timed window.
        warmup_steps: steps run before timing (tracing, first-touch allocation): excluded.
        warmup_seconds: their wall time, excluded from the throughput.
        first_step_seconds: the first warm-up step alone (tracing shows here).
        gpu_utilization: mean GPU utilization (%) over the windows (NVML), ``None`` without.
        gpu_memory_bytes: peak GPU memory used during the windows (NVML), ``None`` without.
        peak_bytes: allocator peak over the size's warm-up and calibration steps (the
            same steps as the timed ones), when the device keeps statistics.
        detail: why it failed, or a remark.
    """

    batch_size: int
    outcome: str
    samples_per_second: float | None = None
    low: float | None = None
    high: float | None = None
    cv: float | None = None
    median_error: float | None = None
    step_seconds: float | None = None
    steps_per_window: int = 0
    window_seconds: list[float] = field(default_factory=list)
    warmup_steps: int = 0
    warmup_seconds: float = 0.0
    first_step_seconds: float | None = None
    gpu_utilization: float | None = None
    gpu_memory_bytes: int | None = None
    peak_bytes: int | None = None
    detail: str = ""


@register_result
@dataclass(frozen=True)
class ThroughputResult(_Serializable):
    """What :func:`batchfit.profile_throughput` measured.

    Args:
        points: one :class:`ThroughputPoint` per batch size, ascending.
        knee: the smallest size within ``tolerance`` of the best throughput, as far as the
            timing error can tell (the low end of ``knee_range``; ``None`` if no size was
            measured).
        tolerance: the knee's tolerance (fraction of the best throughput).
        device: where it ran.
        window_target_seconds: the wall time each timed window aimed at.
        gpu_metrics: ``"nvml"`` when GPU utilization was recorded, else why not.
        seconds: wall time of the whole measurement.
        trace_seconds: the first part of it: two tiny untimed steps that trace the general
            training step (the graph ``fit`` runs, with a ``None`` batch dimension) before any
            size is timed, so the first size is not timed on a graph specialized to it.
        model_name: the model's name.
        notes: plain-language remarks.
        environment: versions and platform.
        knee_range: ``[low, high]``: the sizes that may be the knee given each median's error
            (see :func:`batchfit.core.throughput.knee_range`); ``None`` in old results.
        machine_drift: relative change of a fixed NumPy workload's speed from before to after
            the timing (``-0.04``: the machine itself ran 4% slower at the end); differences
            between sizes below it are not the model's. ``None`` when not measured.
    """

    kind: ClassVar[str] = "throughput"

    points: list[ThroughputPoint]
    knee: int | None
    tolerance: float
    device: str
    window_target_seconds: float
    gpu_metrics: str
    seconds: float = 0.0
    trace_seconds: float = 0.0
    model_name: str = ""
    notes: list[str] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)
    knee_range: list[int] | None = None
    machine_drift: float | None = None
    schema_version: int = SCHEMA_VERSION

    def measured(self) -> list[ThroughputPoint]:
        """The points with a throughput, ascending by batch size."""
        return sorted((p for p in self.points if p.samples_per_second is not None),
                      key=lambda p: p.batch_size)


@dataclass(frozen=True)
class Verdict(_Serializable):
    """What one criterion says.

    Args:
        criterion: its name (``"memory"``, ``"throughput"``, ``"goodput"``, ...).
        batch_size: the size it caps at or proposes (``None``: no opinion).
        kind: ``"cap"`` (an upper limit) or ``"propose"`` (a preferred size).
        priority: among proposals, the highest priority decides.
        reason: one sentence in plain words.
    """

    criterion: str
    batch_size: int | None
    kind: str
    priority: int = 0
    reason: str = ""


@dataclass(frozen=True)
class Recommendation(_Serializable):
    """The recommended batch size and why.

    Args:
        batch_size: the size to train with.
        decided_by: the criterion whose verdict decided.
        reasons: plain-language sentences, the deciding one first.
        verdicts: every criterion's verdict.
    """

    batch_size: int
    decided_by: str
    reasons: tuple[str, ...]
    verdicts: tuple[Verdict, ...]


@dataclass(frozen=True)
class TargetPlan(_Serializable):
    """How to train at a target (effective) batch size that may not fit.

    Args:
        target: the effective batch size asked for.
        fits: whether it fits as one batch.
        micro_batch: the per-step batch to run.
        accumulation_steps: gradient accumulation steps (Keras optimizers'
            ``gradient_accumulation_steps``); 1 when the target fits.
        effective_batch: ``micro_batch * accumulation_steps`` (equals ``target`` when a divisor
            was found).
        samples_per_second: expected throughput at the micro-batch (from the measured curve).
        relative_to_best: that throughput over the best measured (``None`` if unknown).
        summary: one paragraph in plain words.
    """

    target: int
    fits: bool
    micro_batch: int
    accumulation_steps: int
    effective_batch: int
    samples_per_second: float | None
    relative_to_best: float | None
    summary: str


@register_result
@dataclass(frozen=True)
class TuneResult(_Serializable):
    """What :func:`batchfit.tune` found: memory, speed, and the batch size to use.

    Args:
        recommendation: the batch size to train with, which criterion decided, and why.
        max_batch: the memory search (largest batch that fits, probes, memory model).
        throughput: the throughput curve up to the largest batch that fits.
        target: the plan for a requested target batch (``None`` if none was asked).
        noise_scale: the gradient noise scale ``B_simple`` the goodput criterion weighed
            (``None``: not measured, the recommendation is by memory and speed).
        noise: the noise-scale measurement, when ``tune`` made it.
        goodput: goodput (samples/s x statistical efficiency, relative to the smallest size)
            at each measured throughput size, ascending; empty without a noise scale.
        seconds: wall time of the whole run.
        notes: plain-language remarks.
        replicas: replicas in sync under ``tf.distribute`` (1 without a strategy). With more
            than one, the recommendation, the throughput curve and the target plan are in
            *global* batch sizes (what ``fit`` takes; throughput is measured with the model
            under its strategy), ``max_batch`` holds the per-replica memory search, and
            ``per_replica_batch_size`` is the recommendation per replica.
        distribute: the strategy: ``"mirrored"``, ``"multiworker"``, or ``""`` for none.
    """

    kind: ClassVar[str] = "tune"

    recommendation: Recommendation
    max_batch: MaxBatchResult
    throughput: ThroughputResult
    target: TargetPlan | None = None
    noise_scale: float | None = None
    noise: NoiseScaleResult | None = None
    goodput: list[float] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    replicas: int = 1
    distribute: str = ""
    schema_version: int = SCHEMA_VERSION

    @property
    def batch_size(self) -> int:
        """The recommended (global) batch size."""
        return self.recommendation.batch_size

    @property
    def per_replica_batch_size(self) -> int:
        """The recommended batch size per replica (``batch_size // replicas``)."""
        return self.recommendation.batch_size // max(1, self.replicas)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TuneResult:
        if isinstance(data, dict) and "max_batch" in data:  # the memory search's old key
            data = {**data, "max_batch": upgrade_max_batch_dict(data["max_batch"])}
        return super().from_dict(data)  # type: ignore[no-any-return]

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["per_replica_batch_size"] = self.per_replica_batch_size
        return data
