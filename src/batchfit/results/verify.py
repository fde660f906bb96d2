"""Results of :func:`batchfit.verify_batch_size`: the model's own ``fit`` at one batch size,
in fresh processes under the emulated device.

Example:

>>> runs = [VerifyRun(outcome="fit", peak_bytes=300 << 20, seconds=9.0)] * 3
>>> r = VerifyResult(model="m.keras", batch_size=128, memory_budget_bytes=512 << 20,
...                  device="CPU:0", epochs=1, runs=runs)
>>> r.fitted, r.all_fit, r.margin_bytes >> 20
(3, True, 212)
>>> VerifyResult.from_json(r.to_json()) == r
True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ._base import SCHEMA_VERSION, _Serializable, register_result

#: What one run can end with: trained through, out of memory, or another failure.
RUN_OUTCOMES = ("fit", "oom", "error")


@dataclass(frozen=True)
class VerifyRun(_Serializable):
    """One fresh process running ``model.fit`` (with validation) at the batch size.

    Args:
        outcome: one of :data:`RUN_OUTCOMES`.
        peak_bytes: the allocator's peak during ``fit`` (``None`` when not read).
        seconds: wall time of the process.
        message: the error's first line when the run did not fit.
    """

    outcome: str
    peak_bytes: int | None = None
    seconds: float = 0.0
    message: str = ""

    @property
    def fits(self) -> bool:
        return self.outcome == "fit"


@register_result
@dataclass(frozen=True)
class VerifyResult(_Serializable):
    """Whether training at ``batch_size`` fits the device, in ``len(runs)`` fresh processes.

    Args:
        model: the model as given (spec, file, factory name).
        batch_size: the size trained with (also the validation batch).
        memory_budget_bytes: the emulated device's memory.
        device: the device emulated, e.g. ``"CPU:0"``.
        epochs: epochs of each run.
        runs: one :class:`VerifyRun` per fresh process.
        steps: training batches per epoch.
        synthetic_data: the data was synthesized from the model's inputs (no ``data`` given).
        notes: plain-language remarks (how the data was made, ...).
        seconds: wall time of the whole verification.
    """

    kind: ClassVar[str] = "verify"

    model: str
    batch_size: int
    memory_budget_bytes: int
    device: str
    epochs: int
    runs: list[VerifyRun] = field(default_factory=list)
    steps: int = 4
    synthetic_data: bool = True
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    schema_version: int = SCHEMA_VERSION

    @property
    def fitted(self) -> int:
        """Runs that trained through."""
        return sum(r.fits for r in self.runs)

    @property
    def out_of_memory(self) -> int:
        """Runs that ran out of memory."""
        return sum(r.outcome == "oom" for r in self.runs)

    @property
    def all_fit(self) -> bool:
        """Every run trained through (the CLI's exit status 0)."""
        return bool(self.runs) and self.fitted == len(self.runs)

    @property
    def peak_bytes(self) -> int | None:
        """The largest peak over the runs that report one."""
        peaks = [r.peak_bytes for r in self.runs if r.peak_bytes is not None]
        return max(peaks) if peaks else None

    @property
    def margin_bytes(self) -> int | None:
        """Budget left above the largest peak (negative never: an overflow is an OOM)."""
        peak = self.peak_bytes
        return None if peak is None else self.memory_budget_bytes - peak

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data.update(fitted=self.fitted, out_of_memory=self.out_of_memory,
                    all_fit=self.all_fit, peak_bytes=self.peak_bytes,
                    margin_bytes=self.margin_bytes)
        return data
