"""``profile_throughput``: steady-state training samples/s against batch size, measured honestly.

Each batch size runs the model's own compiled train function the way ``model.fit`` calls it
(one call per step on a ``tf.data`` iterator), in this process, with the user's normal
TensorFlow settings (no allocator cap: a capped allocator slows steps). Every size is first
traced, warmed up and calibrated (excluded from the timing); then the timed windows run in
interleaved rounds (window 1 of every size, then window 2, ...), each about the same wall time
(the number of steps per window adapts to the step time), so a drift of the machine's speed
moves all sizes alike. The median window and the spread are reported. The model's weights and
optimizer state are restored afterwards.
"""

from __future__ import annotations

import contextlib
import numbers
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..backend import get_backend
from ..core.throughput import (
    geometric_grid,
    knee,
    needs_more_windows,
    steps_per_window,
    summarize_windows,
    window_rates,
)
from ..errors import InvalidInputError
from ..results import ThroughputPoint, ThroughputResult

DEFAULT_WINDOW_SECONDS = 0.3
DEFAULT_WINDOWS = 5
DEFAULT_TARGET_ERROR = 0.02


def resolve_model(model: Any) -> Any:
    """A compiled ``keras.Model`` from a model, a zero-argument factory or a spec string."""
    from ..backend.tensorflow.loader import check_model, load_model

    if isinstance(model, str):
        return load_model(model)
    if hasattr(model, "train_on_batch") and hasattr(model, "variables"):
        check_model(model)
        return model
    if callable(model):
        from ..backend.tensorflow.loader import model_from_factory

        return model_from_factory(model)
    raise InvalidInputError(
        f"model must be a compiled keras.Model, a function returning one, or a spec "
        f"'file.py:factory' / 'package.module:factory' / 'model.keras'; got {type(model).__name__}")


def validate_timing(window_seconds: float, windows: int, max_windows: int | None,
                    target_error: float, tolerance: float, warmup_steps: int = 2) -> int:
    """Check :func:`profile_throughput`'s timing arguments; return ``max_windows`` (default
    ``3 * windows``). Raises :class:`~batchfit.errors.InvalidInputError` naming the bad one."""
    if max_windows is None and isinstance(windows, int) and not isinstance(windows, bool):
        max_windows = 3 * windows
    _validate(window_seconds, windows, max_windows, target_error,  # type: ignore[arg-type]
              warmup_steps, tolerance)
    return int(max_windows)  # type: ignore[arg-type]


def _validate(window_seconds: float, windows: int, max_windows: int, target_error: float,
              warmup_steps: int, tolerance: float) -> None:
    if not (isinstance(window_seconds, (int, float)) and window_seconds > 0):
        raise InvalidInputError(f"window_seconds must be > 0, got {window_seconds!r}")
    if isinstance(windows, bool) or not isinstance(windows, int) or windows < 2:
        raise InvalidInputError(f"windows must be an integer >= 2 (a spread needs two), got {windows!r}")
    if isinstance(max_windows, bool) or not isinstance(max_windows, int) or max_windows < windows:
        raise InvalidInputError(
            f"max_windows must be an integer >= windows ({windows}), got {max_windows!r}; "
            "pass max_windows=windows for a fixed number of windows")
    if not (isinstance(target_error, (int, float)) and target_error > 0):
        raise InvalidInputError(
            f"target_error must be a fraction > 0 (e.g. 0.02 for 2%), got {target_error!r}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
        raise InvalidInputError(f"warmup_steps must be an integer >= 1, got {warmup_steps!r}")
    if not (isinstance(tolerance, (int, float)) and 0 <= tolerance < 1):
        raise InvalidInputError(f"tolerance must be a fraction in [0, 1), e.g. 0.05, got {tolerance!r}")


def check_sizes(batch_sizes: Sequence[int]) -> list[int]:
    """The sizes, sorted and each once; refuses anything but positive integers."""
    try:
        sizes = list(batch_sizes)
    except TypeError:
        raise InvalidInputError(
            f"batch_sizes must be a list of positive integers, got {batch_sizes!r}") from None
    # numpy integers too (np.arange, np.int64), each as a plain int
    if not sizes or any(isinstance(b, (bool, np.bool_)) or not isinstance(b, numbers.Integral)
                        or b < 1 for b in sizes):
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
    notes: list[str] = []
    if batch_sizes is not None:
        sizes = check_sizes(batch_sizes)
    else:
        if isinstance(granularity, bool) or not isinstance(granularity, int) or granularity < 1:
            raise InvalidInputError(f"granularity must be an integer >= 1, got {granularity!r}")
        if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(
                max_batch, int) or max_batch < granularity):
            raise InvalidInputError(
                f"max_batch must be an integer >= granularity ({granularity!r}), got "
                f"{max_batch!r}: no size of the grid would fit; pass a smaller granularity "
                "or batch_sizes")
        if max_batch is None:
            from .maxbatch import find_max_batch_size
            found = find_max_batch_size(model, memory=memory, data=data,
                                        input_shapes=input_shapes, granularity=granularity,
                                        device=device, seed=seed)
            max_batch = found.global_max_batch_size  # per replica x replicas (1 without)
            notes.append(f"sizes up to the largest batch that fits: {max_batch}")
        sizes = geometric_grid(int(max_batch), granularity=granularity)
    keras_model = resolve_model(model)

    import tensorflow as tf

    from ..backend.nvml import GpuSampler, nvml_status
    from ..backend.tensorflow.probe import ModelState, memory_device, read_peak, reset_peak

    dev = memory_device(device)
    gpu_ok, gpu_note = nvml_status(dev)
    batch_fn, data_notes = get_backend().make_batch_fn(keras_model, data, input_shapes, seed)
    notes.extend(data_notes)
    state = ModelState(keras_model)
    from ..backend.tensorflow.distribute import model_strategy, num_replicas

    replicas = num_replicas(model_strategy(keras_model))
    if replicas > 1:
        notes.append(f"the model is under a strategy with {replicas} replicas: sizes are "
                     "global batches, each replica runs its share")
    try:
        # Under a strategy each replica places its own ops: no device scope around them.
        with tf.device(dev) if replicas == 1 else contextlib.nullcontext():
            points, trace_seconds = _measure(keras_model, batch_fn, sizes, tf=tf, state=state,
                              window_seconds=float(window_seconds), windows=windows,
                              max_windows=int(max_windows),  # type: ignore[arg-type]
                              target_error=float(target_error),
                              warmup_steps=warmup_steps, device=dev, gpu=gpu_ok,
                              sampler_cls=GpuSampler, read_peak=read_peak, reset_peak=reset_peak)
    finally:
        # Reset first (metrics built by the steps start at zero), then restore the snapshot,
        # which holds the caller's metric totals.
        try:
            keras_model.reset_metrics()
        except Exception:  # noqa: BLE001, S110 - metrics without reset are harmless
            pass
        state.restore()
    if on_point is not None:
        for p in points:
            on_point(p)
    ok = [p for p in points if p.samples_per_second is not None]
    k = (knee([p.batch_size for p in ok], [p.samples_per_second or 0.0 for p in ok],
              tolerance=tolerance) if ok else None)
    if not ok:
        notes.append("no size could be measured")
    return ThroughputResult(points=points, knee=k, tolerance=float(tolerance), device=dev,
                            window_target_seconds=float(window_seconds), gpu_metrics=gpu_note,
                            seconds=time.perf_counter() - t_start, trace_seconds=trace_seconds,
                            model_name=str(getattr(keras_model, "name", "")), notes=notes,
                            environment=get_backend().environment_info())


class _Prepared:
    """One batch size, traced and calibrated, ready for timed windows."""

    def __init__(self, b: int, fn: Any, iterator: Any, steps: int, first: float | None,
                 warmup_seconds: float, peak: int | None, per_call: int = 1) -> None:
        # ``calls`` train-function calls per window, each running ``per_call`` steps (the
        # model's ``steps_per_execution``): ``steps`` training steps per window.
        self.b, self.fn, self.iterator, self.calls = b, fn, iterator, steps
        self.per_call = per_call
        self.steps = steps * per_call
        self.first, self.warmup_seconds, self.peak = first, warmup_seconds, peak
        self.times: list[float] = []
        self.util: list[float] = []
        self.mem: list[int] = []
        self.failure: tuple[str, str] | None = None


def _sync(logs: Any) -> None:
    # Reading a value waits for the step (and, by data dependence, every step before it).
    for v in (logs.values() if isinstance(logs, dict) else [logs]):
        if hasattr(v, "numpy"):
            v.numpy()
            return


def _measure(model: Any, batch_fn: Any, sizes: list[int], *, tf: Any, state: Any,
             window_seconds: float, windows: int, max_windows: int, target_error: float,
             warmup_steps: int, device: str, gpu: bool, sampler_cls: Any, read_peak: Any,
             reset_peak: Any) -> tuple[list[ThroughputPoint], float]:
    """Prepare every size (trace, warm up, calibrate), then time them in interleaved rounds.

    Round ``r`` times window ``r`` of every size in turn, so the windows of each size are spread
    over the whole measurement: a slow drift of the machine's speed (measured on this CI VM:
    +-20% over seconds) moves every size alike instead of skewing the sizes measured during it,
    and each size's median samples the whole period. After ``windows`` rounds, the rounds go on
    for the sizes whose median is not yet known to ``target_error`` (up to ``max_windows``).
    """
    from ..backend.oom import is_oom_error
    from ..backend.tensorflow.probe import _first_line

    points: dict[int, ThroughputPoint] = {}
    ready: list[_Prepared] = []
    trace_seconds = _trace_general(model, batch_fn, state)
    for b in sizes:
        if any(p.outcome == "oom" for p in points.values()):
            smallest_oom = min(q.batch_size for q in points.values() if q.outcome == "oom")
            points[b] = ThroughputPoint(batch_size=b, outcome="skipped",
                                        detail=f"not measured: {smallest_oom} ran out of memory")
            continue
        failure = None
        prepared = None
        try:
            prepared = _prepare(model, batch_fn, b, tf=tf, window_seconds=window_seconds,
                                warmup_steps=warmup_steps, device=device, read_peak=read_peak,
                                reset_peak=reset_peak)
        except Exception as exc:  # noqa: BLE001 - a size that fails is reported, not fatal
            failure = ("oom" if is_oom_error(exc) else "failed", _first_line(exc))
        if prepared is None:
            state.restore()  # outside the handler: the failed step's tensors are released
            outcome, detail = failure or ("failed", "unknown failure")
            points[b] = ThroughputPoint(batch_size=b, outcome=outcome, detail=detail)
        else:
            ready.append(prepared)
    for _ in range(max_windows):
        todo = [r for r in ready if r.failure is None and needs_more_windows(
            window_rates(r.b, r.steps, r.times), minimum=windows, maximum=max_windows,
            target_error=target_error)]
        if not todo:
            break
        for r in todo:
            try:
                with sampler_cls(gpu) as sampler:
                    t0 = time.perf_counter()
                    logs = None
                    for _ in range(r.calls):
                        logs = r.fn(r.iterator)
                    _sync(logs)
                    r.times.append(time.perf_counter() - t0)
                if sampler.mean_utilization is not None:
                    r.util.append(sampler.mean_utilization)
                if sampler.peak_memory_bytes is not None:
                    r.mem.append(sampler.peak_memory_bytes)
            except Exception as exc:  # noqa: BLE001
                r.failure = ("oom" if is_oom_error(exc) else "failed", _first_line(exc))
    for r in ready:
        if r.failure is not None or len(r.times) < 2:
            outcome, detail = r.failure or ("failed", "too few windows")
            points[r.b] = ThroughputPoint(batch_size=r.b, outcome=outcome, detail=detail)
            continue
        stats = summarize_windows(r.b, r.steps, r.times)
        points[r.b] = ThroughputPoint(
            batch_size=r.b, outcome="ok", samples_per_second=stats.samples_per_second,
            low=stats.low, high=stats.high, cv=stats.cv, step_seconds=stats.step_seconds,
            median_error=stats.median_error,
            steps_per_window=r.steps, window_seconds=r.times, warmup_steps=warmup_steps + 1,
            warmup_seconds=r.warmup_seconds, first_step_seconds=r.first,
            gpu_utilization=sum(r.util) / len(r.util) if r.util else None,
            gpu_memory_bytes=max(r.mem) if r.mem else None, peak_bytes=r.peak)
    return [points[b] for b in sizes], trace_seconds


def _trace_general(model: Any, batch_fn: Any, state: Any) -> float:
    """Trace the general training step (:func:`~batchfit.backend.tensorflow.probe.trace_general_step`).

    Without this, the first size measured would be timed on a graph specialized to its static
    shape. A model that cannot train on a batch of 1 or 2 (e.g. a strategy with more replicas)
    skips it: its sizes trace as they come, each reporting its own failure.

    Returns:
        Its wall time in seconds (excluded from every measurement).
    """
    from ..backend.tensorflow.probe import trace_general_step

    t0 = time.perf_counter()
    trace_general_step(model, batch_fn, state)
    return time.perf_counter() - t0


def _prepare(model: Any, batch_fn: Any, b: int, *, tf: Any, window_seconds: float,
             warmup_steps: int, device: str, read_peak: Any, reset_peak: Any) -> _Prepared:
    """Build the batch and its iterator, run the untimed warm-up steps, pick steps per window."""
    import keras

    x, y = batch_fn(b)
    # As Keras's data adapters do: a list of inputs (or targets) is a structure, not one
    # tensor (tf.data would stack it, and fail on arrays of different shapes).
    dataset = tf.data.Dataset.from_tensors(keras.tree.lists_to_tuples((x, y))).repeat()
    # One batch repeated: nothing for tf.data's autotuner to tune, and its background thread
    # held up the iterator's deletion by up to 5.5 s per size (measured: a 10-size profile
    # spent 10.6 s freeing its iterators), competing for the cores meanwhile.
    options = tf.data.Options()
    options.autotune.enabled = False
    dataset = dataset.with_options(options)
    strategy = getattr(model, "_distribute_strategy", None)
    if strategy is not None and strategy.num_replicas_in_sync > 1:
        # As fit does: each replica gets its share of the global batch b.
        dataset = strategy.experimental_distribute_dataset(dataset)
    iterator = iter(dataset)
    reset_peak(device)
    warm_t0 = time.perf_counter()
    first: float | None = None
    last = 0.0
    fn = None
    for i in range(warmup_steps):
        s = time.perf_counter()
        if i == 0:  # as fit does first: build whatever is unbuilt (model, metrics)
            model.train_on_batch(x, y)
            model.make_train_function()
            fn = model.train_function
        else:
            _sync(fn(iterator))  # type: ignore[misc]
        last = time.perf_counter() - s
        first = last if first is None else first
    if fn is None:
        model.make_train_function()
        fn = model.train_function
    # One more untimed step calibrates (the warm-up's last may still pay for tracing).
    s = time.perf_counter()
    _sync(fn(iterator))
    calib = time.perf_counter() - s
    warmup_seconds = time.perf_counter() - warm_t0
    # Each call of the train function runs ``steps_per_execution`` steps (as in fit).
    per_call = max(1, int(getattr(model, "steps_per_execution", 1) or 1))
    calls = steps_per_window(min(calib, last) if last > 0 else calib, window_seconds)
    return _Prepared(b, fn, iterator, calls, first, warmup_seconds, read_peak(device),
                     per_call=per_call)
