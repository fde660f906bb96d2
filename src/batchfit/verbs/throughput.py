"""``profile_throughput``: steady-state training samples/s against batch size, measured honestly.

Each batch size runs the model's own compiled train function the way ``model.fit`` calls it
(one call per step), in this process, with the user's normal settings (no allocator cap: a
capped allocator slows steps). Every size is first traced, warmed up and calibrated (excluded
from the timing); then the timed windows run in interleaved rounds (window 1 of every size, then
window 2, ...), each about the same wall time (the number of steps per window adapts to the step
time), so a drift of the machine's speed moves all sizes alike. The median window and the spread
are reported. The model's weights and optimizer state are restored afterwards.

This module orchestrates: the timing runs behind the backend seam
(:meth:`batchfit.backend.Backend.measure_throughput`), the statistics in
:mod:`batchfit.core.throughput`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from ..backend import get_backend
from ..backend.machine import reference_rate
from ..backend.nvml import nvml_status
from ..core.throughput import TimingPlan, drift, geometric_grid, knee_range
from ..core.validate import check_int, is_int, is_number
from ..errors import InvalidInputError
from ..results import ThroughputPoint, ThroughputResult
from .resolve import resolve

DEFAULT_WINDOW_SECONDS = 0.3
DEFAULT_WINDOWS = 5
DEFAULT_TARGET_ERROR = 0.02


def validate_timing(window_seconds: float, windows: int, max_windows: int | None,
                    target_error: float, tolerance: float, warmup_steps: int = 2) -> int:
    """Check :func:`profile_throughput`'s timing arguments; return ``max_windows`` (default
    ``3 * windows``). Raises :class:`~batchfit.errors.InvalidInputError` naming the bad one."""
    if not is_number(window_seconds) or not window_seconds > 0:
        raise InvalidInputError(f"window_seconds must be > 0, got {window_seconds!r}")
    check_int("windows", windows, minimum=2, hint="a spread needs two")
    if max_windows is None:
        max_windows = 3 * windows
    if not is_int(max_windows) or max_windows < windows:
        raise InvalidInputError(
            f"max_windows must be an integer >= windows ({windows}), got {max_windows!r}; "
            "pass max_windows=windows for a fixed number of windows")
    if not is_number(target_error) or not target_error > 0:
        raise InvalidInputError(
            f"target_error must be a fraction > 0 (e.g. 0.02 for 2%), got {target_error!r}")
    check_int("warmup_steps", warmup_steps, minimum=1)
    check_tolerance(tolerance)
    return int(max_windows)


def check_tolerance(tolerance: Any) -> None:
    """Refuse a knee ``tolerance`` outside ``[0, 1)`` (``profile_throughput``'s and ``tune``'s)."""
    if not is_number(tolerance) or not 0 <= tolerance < 1:
        raise InvalidInputError(f"tolerance must be a fraction in [0, 1), e.g. 0.05, got {tolerance!r}")


def check_sizes(batch_sizes: Sequence[int]) -> list[int]:
    """The sizes, sorted and each once; refuses anything but positive integers."""
    try:
        sizes = list(batch_sizes)
    except TypeError:
        raise InvalidInputError(
            f"batch_sizes must be a list of positive integers, got {batch_sizes!r}") from None
    # numpy integers too (np.arange, np.int64), each as a plain int
    if not sizes or any(not is_int(b) or b < 1 for b in sizes):
        raise InvalidInputError(f"batch_sizes must be positive integers, got {batch_sizes!r}")
    return sorted({int(b) for b in sizes})


def profile_throughput(
    model: Any,
    batch_sizes: Sequence[int] | None = None,
    *,
    max_batch: int | None = None,
    memory: str | int | None = None,
    data: Any = None,
    input_shapes: Any = None,
    granularity: int = 1,
    window_seconds: float = DEFAULT_WINDOW_SECONDS,
    windows: int = DEFAULT_WINDOWS,
    max_windows: int | None = None,
    target_error: float = DEFAULT_TARGET_ERROR,
    warmup_steps: int = 2,
    tolerance: float = 0.05,
    device: str | None = None,
    seed: int = 0,
    on_point: Callable[[ThroughputPoint], None] | None = None,
) -> ThroughputResult:
    """Measure steady-state training throughput (samples/s) at several batch sizes.

    Args:
        model: a compiled ``keras.Model``, a zero-argument function returning one, or a spec
            (``"file.py:factory"``, ``"package.module:factory"``, ``"model.keras"``). A model
            built under a ``tf.distribute`` strategy is timed as ``fit`` runs it: sizes are
            global batches, each replica runs its share.
        batch_sizes: the sizes to measure. Default: a geometric grid (powers of two) up to the
            largest batch that fits, which is ``max_batch`` when given, else found first with
            :func:`batchfit.find_max_batch_size` under ``memory``.
        max_batch: the largest batch that fits, if already known.
        memory: the memory budget for that search (see ``find_max_batch_size``).
        data: the user's sample, ``(x, y)`` or a ``tf.data.Dataset`` (default: synthesized).
        input_shapes: lengths of non-batch ``None`` dimensions.
        granularity: grid sizes are multiples of this.
        window_seconds: wall time each timed window aims at (default 0.3 s).
        windows: timed windows per size at least (default 5; the median is reported).
        max_windows: timed windows per size at most (default ``3 * windows``). Past
            ``windows``, a size gets more windows while its median's estimated relative
            standard error is above ``target_error``; ``max_windows=windows`` fixes the count.
        target_error: the relative standard error of the median to reach (default 0.02).
        warmup_steps: untimed steps per size before timing (tracing happens here; default 2).
        tolerance: the knee is the smallest size within this fraction of the best throughput.
        device: ``"CPU:0"`` / ``"GPU:0"`` (default: the GPU if any).
        seed: seed for synthesized data.
        on_point: called with each :class:`~batchfit.results.ThroughputPoint`, in size
            order, once all are measured (the sizes are timed in interleaved rounds, so
            no size's median is final before the last round).

    Returns:
        A :class:`~batchfit.results.ThroughputResult`; ``knee`` is its recommendation by speed.

    Example:

    >>> import batchfit
    >>> from batchfit.examples.models import seed_mlp
    >>> r = batchfit.profile_throughput(seed_mlp(), [16, 64, 256])   # doctest: +SKIP
    >>> [round(p.samples_per_second) for p in r.points], r.knee       # doctest: +SKIP
    ([41000, 122000, 210000], 256)
    """
    t_start = time.perf_counter()
    max_windows = validate_timing(window_seconds, windows, max_windows, target_error,
                                  tolerance, warmup_steps)
    windows, warmup_steps = int(windows), int(warmup_steps)  # NumPy integers, as plain ones
    notes: list[str] = []
    if batch_sizes is not None:
        sizes = check_sizes(batch_sizes)
    else:
        sizes = _default_sizes(model, max_batch, granularity, notes, memory=memory, data=data,
                               input_shapes=input_shapes, device=device, seed=seed)
    resolved = resolve(model, build=True)
    keras_model = resolved.model
    backend = get_backend()
    dev = backend.timing_device(device)
    gpu_ok, gpu_note = nvml_status(dev)
    batch_fn, data_notes = backend.make_batch_fn(keras_model, data, input_shapes, seed)
    notes.extend(data_notes)
    if resolved.replicas > 1:
        notes.append(f"the model is under a strategy with {resolved.replicas} replicas: sizes "
                     "are global batches, each replica runs its share")
    plan = TimingPlan(window_seconds=float(window_seconds), windows=windows,
                      max_windows=max_windows, target_error=float(target_error),
                      warmup_steps=warmup_steps)
    before = reference_rate()
    points, trace_seconds = backend.measure_throughput(keras_model, batch_fn, sizes, plan,
                                                       device=dev, gpu_metrics=gpu_ok)
    machine_drift = drift(before, reference_rate())
    if on_point is not None:
        for p in points:
            on_point(p)
    ok = [p for p in points if p.samples_per_second is not None]
    k_range = (list(knee_range([p.batch_size for p in ok],
                               [p.samples_per_second or 0.0 for p in ok],
                               [p.median_error for p in ok], tolerance=tolerance))
               if ok else None)
    if not ok:
        notes.append("no size could be measured")
    return ThroughputResult(points=points, knee=k_range[0] if k_range else None,
                            knee_range=k_range, machine_drift=machine_drift,
                            tolerance=float(tolerance), device=dev,
                            window_target_seconds=float(window_seconds), gpu_metrics=gpu_note,
                            seconds=time.perf_counter() - t_start, trace_seconds=trace_seconds,
                            model_name=resolved.name, notes=notes,
                            environment=backend.environment_info())


def _default_sizes(model: Any, max_batch: int | None, granularity: int, notes: list[str],
                   **search: Any) -> list[int]:
    """The geometric grid up to ``max_batch``, found first with a memory search when unknown."""
    granularity = int(check_int("granularity", granularity, minimum=1))  # type: ignore[arg-type]
    if max_batch is not None and (not is_int(max_batch) or max_batch < granularity):
        raise InvalidInputError(
            f"max_batch must be an integer >= granularity ({granularity!r}), got "
            f"{max_batch!r}: no size of the grid would fit; pass a smaller granularity "
            "or batch_sizes")
    if max_batch is None:
        from .maxbatch import find_max_batch_size

        found = find_max_batch_size(model, granularity=granularity, **search)
        max_batch = found.global_max_batch_size  # per replica x replicas (1 without)
        notes.append(f"sizes up to the largest batch that fits: {max_batch}")
    return geometric_grid(int(max_batch), granularity=granularity)
