"""What :func:`batchfit.fit` changed during a run: one record per batch-size adjustment.

Plain data (no TensorFlow): ``history.adjustments`` of the ``History`` that
:func:`batchfit.fit` returns is a list of :class:`BatchAdjustment`.

Example:

>>> a = BatchAdjustment(phase="train", epoch=0, step=3, optimizer_step=3, batch_size=64,
...     from_micro_batch=64, to_micro_batch=32, accumulation_steps=2, reason="oom",
...     detail="ResourceExhaustedError: OOM when allocating tensor", seconds=10.2,
...     time_unix=1.7e9)
>>> BatchAdjustment.from_dict(a.to_dict()) == a
True
"""

from __future__ import annotations

from dataclasses import dataclass

from ._base import _Serializable

ADJUSTMENT_REASONS = ("oom", "grow")
PHASES = ("train", "eval")


@dataclass(frozen=True)
class BatchAdjustment(_Serializable):
    """One change of the micro-batch size, as :func:`batchfit.fit` made it.

    Attributes:
        phase: ``"train"`` or ``"eval"`` (an evaluation batch shrinks separately).
        epoch: the epoch (0-based, as Keras callbacks count) in which it happened.
        step: the batch index within the epoch whose step failed and was replayed.
        optimizer_step: optimizer updates done before it (``optimizer.iterations``).
        batch_size: the batch the user asked for (the effective batch).
        from_micro_batch: the micro-batch size before.
        to_micro_batch: the micro-batch size after.
        accumulation_steps: micro-batches per batch afterwards (1: no accumulation; with
            ``keep_effective_batch=False``, optimizer updates per batch).
        reason: ``"oom"`` (a step ran out of memory) or ``"grow"`` (clean epochs allowed a
            larger micro-batch).
        detail: the first line of the error, or why it grew.
        seconds: time lost: the failed attempt plus restoring the state.
        time_unix: when it happened (seconds since the epoch).
    """

    phase: str
    epoch: int
    step: int
    optimizer_step: int
    batch_size: int
    from_micro_batch: int
    to_micro_batch: int
    accumulation_steps: int
    reason: str
    detail: str
    seconds: float
    time_unix: float

    def describe(self) -> str:
        """One line for a log."""
        where = f"epoch {self.epoch + 1}, step {self.step}"
        what = f"{self.phase} micro-batch {self.from_micro_batch} -> {self.to_micro_batch}"
        acc = ""
        if self.accumulation_steps > 1:
            acc = (f" ({self.accumulation_steps} x accumulated into batch {self.batch_size})"
                   if self.phase == "train" else
                   f" (each batch of {self.batch_size} in {self.accumulation_steps} parts)")
        return f"batchfit: {where}: {what}{acc} because of {self.reason}: {self.detail}"
