"""Throughput measurement on TensorFlow: the model's own train function, timed in windows.

Each batch size runs the model's compiled train function the way ``model.fit`` calls it (one
call per step on a ``tf.data`` iterator), in this process, with the user's normal TensorFlow
settings (no allocator cap: a capped allocator slows steps). Every size is first traced, warmed
up and calibrated (excluded from the timing); then the timed windows run in interleaved rounds
(window 1 of every size, then window 2, ...), each about the same wall time, so a drift of the
machine's speed moves all sizes alike. The model's variables are restored afterwards.

What to time and what the windows say is pure logic in :mod:`batchfit.core.throughput`; the
verb (:func:`batchfit.verbs.throughput.profile_throughput`) calls :func:`measure_throughput`
through :meth:`batchfit.backend.Backend.measure_throughput`.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import keras
import tensorflow as tf

from ...core.throughput import TimingPlan, steps_per_window, summarize_windows, window_rates
from ...results import ThroughputPoint
from ..nvml import GpuSampler
from ..oom import is_oom_error
from .distribute import model_strategy, num_replicas
from .keras_compat import model_distribute_strategy
from .probe import ModelState, failure_line, read_peak, reset_peak, trace_general_step

__all__ = ["measure_throughput"]


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


def measure_throughput(model: Any, batch_fn: Any, sizes: list[int], plan: TimingPlan, *,
                       device: str, gpu_metrics: bool) -> tuple[list[ThroughputPoint], float]:
    """Time ``model`` at each of ``sizes``; the model's variables and metrics are restored.

    Args:
        model: the compiled model (under a strategy, sizes are global batches).
        batch_fn: ``batch_fn(b) -> (x, y)``.
        sizes: the batch sizes, ascending.
        plan: windows, their wall time, the warm-up.
        device: where the steps run and whose allocator peak is read (``"GPU:0"``).
        gpu_metrics: sample GPU utilization and memory through NVML during the windows.

    Returns:
        ``(points, trace_seconds)``: one point per size, in ``sizes`` order, and the wall time
        of tracing the general step (excluded from every measurement).
    """
    state = ModelState(model)
    replicas = num_replicas(model_strategy(model))
    try:
        # Under a strategy each replica places its own ops: no device scope around them.
        with tf.device(device) if replicas == 1 else contextlib.nullcontext():
            return _measure(model, batch_fn, sizes, plan, state=state, device=device,
                            gpu=gpu_metrics)
    finally:
        # Reset first (metrics built by the steps start at zero), then restore the snapshot,
        # which holds the caller's metric totals.
        try:
            model.reset_metrics()
        except Exception:  # noqa: BLE001, S110 - metrics without reset are harmless
            pass
        state.restore()


def sync(logs: Any) -> None:
    """Wait for a step: reading a value waits for it (and, by data dependence, all before)."""
    for v in (logs.values() if isinstance(logs, dict) else [logs]):
        if hasattr(v, "numpy"):
            v.numpy()
            return


def _measure(model: Any, batch_fn: Any, sizes: list[int], plan: TimingPlan, *, state: Any,
             device: str, gpu: bool) -> tuple[list[ThroughputPoint], float]:
    """Prepare every size (trace, warm up, calibrate), then time them in interleaved rounds.

    Round ``r`` times window ``r`` of every size in turn, so the windows of each size are spread
    over the whole measurement: a slow drift of the machine's speed (measured on this CI VM:
    +-20% over seconds) moves every size alike instead of skewing the sizes measured during it,
    and each size's median samples the whole period. After ``windows`` rounds, the rounds go on
    for the sizes whose median is not yet known to ``target_error`` (up to ``max_windows``).
    """
    trace_seconds = trace_general(model, batch_fn, state)
    points, ready = _prepare_all(model, batch_fn, sizes, plan, state=state, device=device)
    for _ in range(plan.max_windows):
        todo = [r for r in ready
                if r.failure is None and plan.needs_more(window_rates(r.b, r.steps, r.times))]
        if not todo:
            break
        for r in todo:
            _time_window(r, gpu)
    for r in ready:
        points[r.b] = _point(r, plan.warmup_steps)
    return [points[b] for b in sizes], trace_seconds


def _prepare_all(model: Any, batch_fn: Any, sizes: list[int], plan: TimingPlan, *, state: Any,
                 device: str) -> tuple[dict[int, ThroughputPoint], list[_Prepared]]:
    """Prepare each size in turn; a failed size gets its point, sizes above an OOM are skipped."""
    points: dict[int, ThroughputPoint] = {}
    ready: list[_Prepared] = []
    for b in sizes:
        if any(p.outcome == "oom" for p in points.values()):
            smallest_oom = min(q.batch_size for q in points.values() if q.outcome == "oom")
            points[b] = ThroughputPoint(batch_size=b, outcome="skipped",
                                        detail=f"not measured: {smallest_oom} ran out of memory")
            continue
        failure = None
        prepared = None
        try:
            prepared = _prepare(model, batch_fn, b, window_seconds=plan.window_seconds,
                                warmup_steps=plan.warmup_steps, device=device)
        except Exception as exc:  # noqa: BLE001 - a size that fails is reported, not fatal
            failure = ("oom" if is_oom_error(exc) else "failed", failure_line(exc))
        if prepared is None:
            state.restore()  # outside the handler: the failed step's tensors are released
            outcome, detail = failure or ("failed", "unknown failure")
            points[b] = ThroughputPoint(batch_size=b, outcome=outcome, detail=detail)
        else:
            ready.append(prepared)
    return points, ready


def _time_window(r: _Prepared, gpu: bool) -> None:
    """One timed window of ``r``: its wall time, and the GPU's utilization and memory."""
    try:
        with GpuSampler(gpu) as sampler:
            t0 = time.perf_counter()
            logs = None
            for _ in range(r.calls):
                logs = r.fn(r.iterator)
            sync(logs)
            r.times.append(time.perf_counter() - t0)
        if sampler.mean_utilization is not None:
            r.util.append(sampler.mean_utilization)
        if sampler.peak_memory_bytes is not None:
            r.mem.append(sampler.peak_memory_bytes)
    except Exception as exc:  # noqa: BLE001
        r.failure = ("oom" if is_oom_error(exc) else "failed", failure_line(exc))


def _point(r: _Prepared, warmup_steps: int) -> ThroughputPoint:
    """The measured point of one size (or its failure)."""
    if r.failure is not None or len(r.times) < 2:
        outcome, detail = r.failure or ("failed", "too few windows")
        return ThroughputPoint(batch_size=r.b, outcome=outcome, detail=detail)
    stats = summarize_windows(r.b, r.steps, r.times)
    return ThroughputPoint(
        batch_size=r.b, outcome="ok", samples_per_second=stats.samples_per_second,
        low=stats.low, high=stats.high, cv=stats.cv, step_seconds=stats.step_seconds,
        median_error=stats.median_error,
        steps_per_window=r.steps, window_seconds=r.times, warmup_steps=warmup_steps + 1,
        warmup_seconds=r.warmup_seconds, first_step_seconds=r.first,
        gpu_utilization=sum(r.util) / len(r.util) if r.util else None,
        gpu_memory_bytes=max(r.mem) if r.mem else None, peak_bytes=r.peak)


def trace_general(model: Any, batch_fn: Any, state: Any) -> float:
    """Trace the general training step (:func:`~batchfit.backend.tensorflow.probe.trace_general_step`).

    Without this, the first size measured would be timed on a graph specialized to its static
    shape. A model that cannot train on a batch of 1 or 2 (e.g. a strategy with more replicas)
    skips it: its sizes trace as they come, each reporting its own failure.

    Returns:
        Its wall time in seconds (excluded from every measurement).
    """
    t0 = time.perf_counter()
    trace_general_step(model, batch_fn, state)
    return time.perf_counter() - t0


def _prepare(model: Any, batch_fn: Any, b: int, *, window_seconds: float, warmup_steps: int,
             device: str) -> _Prepared:
    """Build the batch and its iterator, run the untimed warm-up steps, pick steps per window."""
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
    strategy = model_distribute_strategy(model)
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
            sync(fn(iterator))  # type: ignore[misc]
        last = time.perf_counter() - s
        first = last if first is None else first
    if fn is None:
        model.make_train_function()
        fn = model.train_function
    # One more untimed step calibrates (the warm-up's last may still pay for tracing).
    s = time.perf_counter()
    sync(fn(iterator))
    calib = time.perf_counter() - s
    warmup_seconds = time.perf_counter() - warm_t0
    # Each call of the train function runs ``steps_per_execution`` steps (as in fit).
    per_call = max(1, int(getattr(model, "steps_per_execution", 1) or 1))
    calls = steps_per_window(min(calib, last) if last > 0 else calib, window_seconds)
    return _Prepared(b, fn, iterator, calls, first, warmup_seconds, read_peak(device),
                     per_call=per_call)
