"""``tune``'s timing on JAX: the model's own train step, compiled per size, timed in windows.

Each size's program is compiled first (JAX compiles one per batch shape; the compile time is
excluded from the timing and reported as the size's first step), warmed up and calibrated;
then the timed windows run in interleaved rounds as on TensorFlow
(:mod:`batchfit.backend.tensorflow.throughput`), each window ending with
``jax.block_until_ready`` (JAX dispatches asynchronously: without it a window would time the
dispatch, not the steps). The steps run on a copy of the model's state
(:class:`~batchfit.backend.jax.step.StepRunner`): the model is left as it was.

Under a ``keras.distribution.DataParallel`` (set globally, or the one the model's variables
live under) each size is a global batch sharded over the devices and the state is replicated,
as Keras's own ``fit`` runs: the throughput is the global step's.
"""

from __future__ import annotations

import time
from typing import Any

from ...core.throughput import TimingPlan, steps_per_window, summarize_windows, window_rates
from ...results import ThroughputPoint
from ..nvml import GpuSampler
from ..oom import is_oom_error
from .probe import failure_line, read_peak
from .step import StepRunner, block

__all__ = ["measure_throughput"]


class _Prepared:
    def __init__(self, b: int, fn: Any, data: Any, state: Any, steps: int, first: float,
                 warmup_seconds: float, peak: int | None) -> None:
        self.b, self.fn, self.data, self.state, self.steps = b, fn, data, state, steps
        self.first, self.warmup_seconds, self.peak = first, warmup_seconds, peak
        self.times: list[float] = []
        self.util: list[float] = []
        self.mem: list[int] = []
        self.failure: tuple[str, str] | None = None
        #: Several CPU devices (XLA's host platform split): wait for each step. With steps in
        #: flight its in-process all-reduce deadlocked (aborted after 40 s, JAX 0.10.2).
        self.sync_each_step = False


def measure_throughput(model: Any, batch_fn: Any, sizes: list[int], plan: TimingPlan, *,
                       device: str, gpu_metrics: bool, distribution: Any = None
                       ) -> tuple[list[ThroughputPoint], float]:
    """Time ``model`` at each of ``sizes`` (see
    :meth:`batchfit.backend.Backend.measure_throughput`); the model is unchanged.

    Returns ``(points, compile_seconds)``: the second is the total compile time of every
    size's program, excluded from every measurement.
    """
    runner = StepRunner(model, batch_fn, distribution)
    points: dict[int, ThroughputPoint] = {}
    ready: list[_Prepared] = []
    for b in sizes:
        oom = [q.batch_size for q in points.values() if q.outcome == "oom"]
        if oom:
            points[b] = ThroughputPoint(batch_size=b, outcome="skipped",
                                        detail=f"not measured: {min(oom)} ran out of memory")
            continue
        try:
            ready.append(_prepare(runner, b, plan))
        except Exception as exc:  # noqa: BLE001 - a size that fails is reported, not fatal
            points[b] = ThroughputPoint(batch_size=b,
                                        outcome="oom" if is_oom_error(exc) else "failed",
                                        detail=failure_line(exc))
    for _ in range(plan.max_windows):
        todo = [r for r in ready
                if r.failure is None and plan.needs_more(window_rates(r.b, r.steps, r.times))]
        if not todo:
            break
        for r in todo:
            _time_window(r, gpu_metrics)
    for r in ready:
        points[r.b] = _point(r, plan.warmup_steps)
    return [points[b] for b in sizes], sum(runner.compile_seconds.values())


def _prepare(runner: StepRunner, b: int, plan: TimingPlan) -> _Prepared:
    """Compile (timed apart), run the untimed warm-up steps, pick the steps per window."""
    t0 = time.perf_counter()
    data = runner.batch(b)
    fn = runner.compiled(b, data)
    first = time.perf_counter() - t0  # the compile: JAX's "first step"
    state = runner.fresh_state()
    last = 0.0
    for _ in range(max(1, plan.warmup_steps)):
        s = time.perf_counter()
        logs, state = fn(state, data)
        block(logs)
        last = time.perf_counter() - s
    s = time.perf_counter()
    logs, state = fn(state, data)
    block(logs)
    calib = time.perf_counter() - s
    calls = steps_per_window(min(calib, last) if last > 0 else calib, plan.window_seconds)
    ready = _Prepared(b, fn, data, state, calls, first, time.perf_counter() - t0, read_peak())
    ready.sync_each_step = runner.place.replicas > 1 and runner.place.platform == "cpu"
    return ready


def _time_window(r: _Prepared, gpu: bool) -> None:
    try:
        with GpuSampler(gpu) as sampler:
            t0 = time.perf_counter()
            logs, state = None, r.state
            for _ in range(r.steps):
                logs, state = r.fn(state, r.data)
                if r.sync_each_step:
                    block(logs)
            block((logs, state))
            r.times.append(time.perf_counter() - t0)
            r.state = state
        if sampler.mean_utilization is not None:
            r.util.append(sampler.mean_utilization)
        if sampler.peak_memory_bytes is not None:
            r.mem.append(sampler.peak_memory_bytes)
    except Exception as exc:  # noqa: BLE001
        r.failure = ("oom" if is_oom_error(exc) else "failed", failure_line(exc))


def _point(r: _Prepared, warmup_steps: int) -> ThroughputPoint:
    if r.failure is not None or len(r.times) < 2:
        outcome, detail = r.failure or ("failed", "too few windows")
        return ThroughputPoint(batch_size=r.b, outcome=outcome, detail=detail)
    stats = summarize_windows(r.b, r.steps, r.times)
    return ThroughputPoint(
        batch_size=r.b, outcome="ok", samples_per_second=stats.samples_per_second,
        low=stats.low, high=stats.high, cv=stats.cv, step_seconds=stats.step_seconds,
        median_error=stats.median_error, steps_per_window=r.steps, window_seconds=r.times,
        warmup_steps=max(1, warmup_steps) + 1, warmup_seconds=r.warmup_seconds,
        first_step_seconds=r.first,
        gpu_utilization=sum(r.util) / len(r.util) if r.util else None,
        gpu_memory_bytes=max(r.mem) if r.mem else None, peak_bytes=r.peak,
        detail=f"compile {r.first:.2f} s (excluded)")
