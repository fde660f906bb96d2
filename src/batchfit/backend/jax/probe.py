"""``max``'s probes on JAX: real steps on a GPU, compile-time memory on a CPU.

On a GPU (written for it, **not yet run on one**: see ``docs/jax.md``), a worker process
starts with XLA's allocator sized to the budget (``XLA_PYTHON_CLIENT_MEM_FRACTION`` of the
device, preallocated, as JAX's default BFC pool), runs ``steps`` real training steps at the
batch size (the model's own jitted ``train_step``, its state donated as in Keras's training,
so held once; restored from a host copy afterwards), reads the peak from
``device.memory_stats()["peak_bytes_in_use"]``, and takes ``RESOURCE_EXHAUSTED`` as out of
memory. JAX cannot reset that peak: each probe needs a fresh worker (``fresh=True``, the
default).

On a CPU, JAX has no allocator cap and ``memory_stats()`` is ``None``: nothing could measure
a step under a budget. The probe compiles the step instead (nothing runs) and takes the
compiled step's memory (:func:`batchfit.backend.jax.compiled.compiled_step_memory`) as the
peak; every probe's detail says that no step ran under the budget.

Example:

>>> import keras, numpy as np
>>> m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
>>> m.compile("adam", "mse")
>>> r = JaxProbeRunner(m, lambda b: (np.ones((b, 3), "float32"), np.ones((b, 1), "float32")),
...                    steps=2, device="CPU:0", budget_bytes=1 << 20)
>>> p = r.run(8)
>>> p.outcome, p.peak_bytes > 0, "compile-time" in p.detail
('fits', True, True)
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np

from ...core.settle import LIMIT_MARGIN, limit_note, limit_outcome
from ...errors import error_line
from ...results import Probe
from ..oom import is_oom_error
from .compiled import compiled_step_memory
from .step import BatchFn, StepRunner

#: Every CPU probe's detail: what the peak is, and that no step ran under the budget.
CPU_DETAIL = ("compile-time memory (XLA memory_analysis of the compiled train_step): no step "
              "ran under the budget (JAX on CPU has no allocator cap)")


def failure_line(exc: BaseException, limit: int = 300) -> str:
    """``"TypeName: line"`` of an error, preferring the line that names the out-of-memory."""
    return error_line(exc, limit=None, with_type=True, prefer="RESOURCE_EXHAUSTED|OOM|exceeds",
                      prefer_last="Error")[:limit]


def device_kind(device: str | None) -> str:
    """``"gpu"`` or ``"cpu"`` for ``device`` (default: JAX's default backend)."""
    if device:
        return "gpu" if device.upper().startswith("GPU") else "cpu"
    import jax

    return "gpu" if jax.default_backend() in ("gpu", "cuda", "rocm") else "cpu"


def read_peak() -> int | None:
    """The default device's peak bytes in use (``None`` where JAX keeps no statistics)."""
    import jax

    stats = jax.devices()[0].memory_stats()
    if not stats:
        return None
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else int(peak)


class JaxProbeRunner:
    """Measures the training step at chosen batch sizes, the model left unchanged.

    Args: as :class:`batchfit.backend.tensorflow.probe.ProbeRunner`.
    """

    def __init__(self, model: Any, batch_fn: BatchFn, *, steps: int = 3,
                 device: str | None = None, budget_bytes: int | None = None,
                 limit_margin: float = LIMIT_MARGIN) -> None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if not 0 <= limit_margin < 1:
            raise ValueError(f"limit_margin must be in [0, 1), got {limit_margin}")
        self.model = model
        self.batch_fn = batch_fn
        self.steps = steps
        if device:
            from . import check_device

            check_device(device)  # GPU:0 where JAX sees none: bad input
        self.kind = device_kind(device)
        self.budget_bytes = budget_bytes
        self.limit_margin = limit_margin
        self.runner = StepRunner(model, batch_fn)
        self._example: Any = None

    def warm_up(self, sizes: tuple[int, ...] = (1, 2)) -> tuple[bool, str] | None:
        """Nothing to warm up: JAX compiles one program per batch shape, each probe its own."""
        return None

    def run(self, batch_size: int) -> Probe:
        """One probe at ``batch_size``: compile-time memory on CPU, real steps on GPU."""
        t0 = time.perf_counter()
        try:
            if self.kind == "cpu":
                peak, step_seconds, detail = self._compiled(batch_size)
            else:  # a GPU (the peak); tests run it on CPU, where there is no peak
                peak, step_seconds, detail = self._measured(batch_size)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a probe outcome
            return Probe(batch_size=batch_size, fits=False,
                         outcome="oom" if is_oom_error(exc) else "refused",
                         seconds=time.perf_counter() - t0, detail=failure_line(exc))
        outcome = "fits"
        if self.budget_bytes is not None and peak is not None:
            outcome = limit_outcome(peak, self.budget_bytes, margin=self.limit_margin)
            what = "predicted peak" if self.kind == "cpu" else "measured peak"
            note = limit_note(outcome, peak, self.budget_bytes, margin=self.limit_margin,
                              what=what)
            detail = f"{note}; {detail}" if note else detail
        return Probe(batch_size=batch_size, fits=outcome == "fits", outcome=outcome,
                     peak_bytes=peak, seconds=time.perf_counter() - t0,
                     step_seconds=step_seconds, detail=detail)

    def _compiled(self, b: int) -> tuple[int, float | None, str]:
        if self._example is None:
            self._example = self.batch_fn(1)  # the batches' own shapes and dtypes (data=)
        memory = compiled_step_memory(self.model, b, example=self._example)
        return memory.total_bytes, None, CPU_DETAIL

    def _measured(self, b: int) -> tuple[int | None, float | None, str]:
        """``steps`` real steps as Keras runs them: the model's own state donated to the
        step (held once on the device, as in training), restored from a host copy after,
        whether the steps ran or failed (a failed step leaves the donated buffers deleted)."""
        from .compiled import state_groups
        from .step import block

        snapshot = [[np.array(v.value, copy=True) for v in g] for g in state_groups(self.model)]
        times: list[float] = []
        try:
            data = self.runner.batch(b)
            fn = self.runner.compiled(b, data)
            state = tuple([v.value for v in g] for g in state_groups(self.model))
            for _ in range(self.steps):
                s = time.perf_counter()
                logs, state = fn(state, data)
                block(logs)
                times.append(time.perf_counter() - s)
            peak = read_peak()
            del state, data
        finally:
            for group, values in zip(state_groups(self.model), snapshot):
                for variable, value in zip(group, values):
                    variable.assign(value)
        step = statistics.median(times[1:]) if len(times) > 1 else None
        return peak, step, "measured: peak_bytes_in_use of the device"
