"""Results as plain, frozen, JSON-serializable data.

Every measurement batchfit makes ends up in one of these dataclasses. They import nothing but the
standard library, so a saved run (``--json``) can be loaded and re-rendered on a machine without
TensorFlow. Each top-level result carries ``schema_version``; :func:`load_result` reads any of them
back from JSON.

Example:

>>> from batchfit.results import Probe
>>> p = Probe(batch_size=64, fits=True, outcome="fits", peak_bytes=2**20, seconds=0.5)
>>> Probe.from_dict(p.to_dict()) == p
True
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

SCHEMA_VERSION = 1

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


class _Serializable:
    """Mixin: ``to_dict``/``from_dict``/``to_json``/``from_json`` for (nested) dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def to_json(self, path: str | Path | None = None, *, indent: int = 2) -> str:
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        if path is not None:
            Path(path).write_text(text + "\n", encoding="utf-8")
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]):  # noqa: ANN206 - returns cls
        return _from_plain(cls, data)

    @classmethod
    def from_json(cls, text_or_path: str | Path):  # noqa: ANN206
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text(encoding="utf-8")
        return cls.from_dict(json.loads(text))


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _from_plain(tp: Any, data: Any) -> Any:
    if data is None:
        return None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _from_plain(args[0], data) if len(args) == 1 else data
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (Any,)
        values = [_from_plain(inner, v) for v in data]
        return tuple(values) if origin is tuple else values
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        kwargs = {}
        for f in dataclasses.fields(tp):
            if f.name in data:
                kwargs[f.name] = _from_plain(hints[f.name], data[f.name])
        return tp(**kwargs)
    return data


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
    """

    batch_size: int
    fits: bool
    outcome: str
    peak_bytes: int | None = None
    seconds: float = 0.0
    step_seconds: float | None = None
    detail: str = ""


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
class MaxBatchResult(_Serializable):
    """What :func:`batchfit.find_max_batch_size` found.

    Args:
        max_batch_size: the largest batch size verified to fit (a real probe ran it).
        safe_batch_size: the largest size whose predicted peak leaves ``headroom`` of the
            budget free, for fragmentation, longer inputs and evaluation.
        headroom: fraction of the budget kept free by ``safe_batch_size``.
        memory_budget_bytes: the budget searched under (``None`` if the device's total is
            unknown and the search ran until the device refused).
        budget_source: ``"user"`` (``memory=`` given) or ``"device"``.
        device: where the probes ran, e.g. ``"CPU:0"`` or ``"GPU:0 (NVIDIA H100)"``.
        isolation: ``"process"`` (an isolated worker with the budget enforced) or
            ``"in-process"`` (peaks measured in the caller's process against the budget).
        strategy: ``"guided"``, ``"binsearch"`` or ``"power"``.
        granularity: sizes searched are multiples of this.
        upper_bound: the largest size the search was allowed to try.
        bracketed: ``True`` when a failing size ``max_batch_size + granularity`` (or the
            bound) was observed, i.e. the answer is exact to the granularity.
        memory_model: the linear model fitted to the probes that fit (``None`` with < 2).
        probes: every probe, in the order made.
        seconds: wall time of the whole search, worker start-up included.
        model_name: the model's name.
        notes: plain-language remarks (fallbacks taken, caveats).
        environment: versions and platform, for reproducing the run.
    """

    kind: ClassVar[str] = "max_batch"

    max_batch_size: int
    safe_batch_size: int
    headroom: float
    memory_budget_bytes: int | None
    budget_source: str
    device: str
    isolation: str
    strategy: str
    granularity: int
    upper_bound: int
    bracketed: bool
    memory_model: MemoryModel | None
    probes: list[Probe] = field(default_factory=list)
    seconds: float = 0.0
    model_name: str = ""
    notes: list[str] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def oom_count(self) -> int:
        """How many probes ran out of memory, crashed the worker or stalled (the costly failures)."""
        return sum(p.outcome in ("oom", "crashed", "timeout") for p in self.probes)

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["result_kind"] = self.kind
        data["oom_count"] = self.oom_count
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MaxBatchResult":
        version = data.get("schema_version", SCHEMA_VERSION)
        if version > SCHEMA_VERSION:
            raise ValueError(
                f"this run was saved with schema_version {version}, newer than this batchfit "
                f"reads ({SCHEMA_VERSION}); upgrade batchfit to read it")
        return _from_plain(cls, data)


_RESULT_KINDS: dict[str, type[_Serializable]] = {"max_batch": MaxBatchResult}


def load_result(path_or_text: str | Path) -> _Serializable:
    """Read any saved batchfit result (``--json`` output) back into its dataclass.

    Example:

    >>> import tempfile, os
    >>> r = MaxBatchResult(max_batch_size=8, safe_batch_size=7, headroom=0.1,
    ...     memory_budget_bytes=2**20, budget_source="user", device="CPU:0",
    ...     isolation="process", strategy="guided", granularity=1, upper_bound=64,
    ...     bracketed=True, memory_model=None)
    >>> load_result(r.to_json()) == r
    True
    """
    text = str(path_or_text)
    if not text.lstrip().startswith("{"):
        p = Path(path_or_text)
        if not p.is_file():
            from .errors import InvalidInputError
            raise InvalidInputError(f"no such result file: {p} (pass the path written by --json)")
        text = p.read_text(encoding="utf-8")
    data = json.loads(text)
    kind = data.get("result_kind", "max_batch")
    if kind not in _RESULT_KINDS:
        from .errors import InvalidInputError
        raise InvalidInputError(f"unknown result kind {kind!r}; known: {sorted(_RESULT_KINDS)}")
    return _RESULT_KINDS[kind].from_dict(data)
