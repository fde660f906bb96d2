"""Results of :func:`batchfit.estimate_noise_scale`: the gradient noise scale and its pairs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ._base import SCHEMA_VERSION, _Serializable, register_result


@dataclass(frozen=True)
class NoisePair(_Serializable):
    """One measurement pair: squared gradient norms at the small and the big batch.

    Args:
        small_sq_norm: ``|G_small|^2``, averaged over the micro-batches of the pair.
        big_sq_norm: ``|G_big|^2``, the squared norm of their mean (the big batch's gradient).
        gradient_sq_norm: this pair's unbiased estimate of ``|G|^2`` (may be negative).
        trace_sigma: this pair's unbiased estimate of ``tr(Sigma)``.
    """

    small_sq_norm: float
    big_sq_norm: float
    gradient_sq_norm: float
    trace_sigma: float


@register_result
@dataclass(frozen=True)
class NoiseScaleResult(_Serializable):
    """What :func:`batchfit.estimate_noise_scale` measured.

    Infinite values are saved as ``null`` in JSON and read back as ``None``.

    Args:
        b_simple: the simple noise scale ``tr(Sigma) / |G|^2`` (ratio of the averages over the
            pairs); about the critical batch size. ``None`` when the ``|G|^2`` estimate is
            not positive: the noise swamps the signal at the sizes measured (very large).
        low: lower end of the bootstrap interval of ``b_simple``.
        high: upper end; ``None`` when the data cannot bound it above.
        confidence: nominal coverage of the interval.
        gradient_sq_norm: average estimate of ``|G|^2``.
        trace_sigma: average estimate of ``tr(Sigma)``.
        small_batch: the small batch size (one micro-batch).
        big_batch: the big batch size (``big_batch / small_batch`` micro-batches averaged).
        pairs: the per-pair measurements.
        seconds: wall time of the measurement, tracing included.
        examples: how many examples of the user's data were sampled from.
        model_name: the model's name.
        optimizer: the model optimizer's class name.
        notes: plain-language remarks and caveats.
        environment: versions, for reproducing the run.
    """

    kind: ClassVar[str] = "noise_scale"

    b_simple: float | None
    low: float | None
    high: float | None
    confidence: float
    gradient_sq_norm: float
    trace_sigma: float
    small_batch: int
    big_batch: int
    pairs: list[NoisePair] = field(default_factory=list)
    seconds: float = 0.0
    examples: int = 0
    model_name: str = ""
    optimizer: str = ""
    notes: list[str] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def critical_batch(self) -> float | None:
        """The critical batch size, approximated by ``b_simple`` (McCandlish et al. 2018)."""
        return self.b_simple
