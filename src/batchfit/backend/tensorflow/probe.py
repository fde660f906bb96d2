"""Run a few real training steps at one batch size and measure them, leaving the model as it was.

A probe uses the user's own compiled model: its optimizer, loss, layers and train step, through
``model.train_on_batch``. Around the steps it resets and reads the allocator's peak
(``tf.config.experimental.reset_memory_stats`` / ``get_memory_info``), times each step, and
afterwards assigns back every variable it may have touched (weights, non-trainable state, random
seed state, optimizer slots and iteration count), so probing is invisible to the caller.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from ...errors import error_line
from ...results import Probe
from ..oom import is_oom_error

BatchFn = Callable[[int], "tuple[Any, Any]"]


def failure_line(exc: BaseException, limit: int = 300) -> str:
    """The line a failed step reports: ``"TypeName: line"``, at most ``limit`` characters.

    Of a long TensorFlow or Keras error it keeps the most informative line: the first that names
    an OOM or a limit exceeded, else the last that names an Error, else the first.
    """
    return error_line(exc, limit=None, with_type=True, prefer="OOM|exceeds",
                      prefer_last="Error")[:limit]



def model_variables(model: Any) -> list[Any]:
    """Every variable a training step can change: model state, optimizer state, metric state.

    Builds the optimizer first when it has never been built, so its slots exist to be saved (the
    values are the optimizer's fresh initial values, as its first real step would create them).
    """
    opt = getattr(model, "optimizer", None)
    if opt is not None and not getattr(opt, "built", True):
        opt.build(model.trainable_variables)
    return unique_variables(model.variables, getattr(opt, "variables", []) or [],
                            *metric_variable_groups(model))


def metric_variable_groups(model: Any) -> list[Any]:
    """The variables of each of the model's metrics (one list per metric)."""
    return [getattr(m, "variables", []) or [] for m in getattr(model, "metrics", []) or []]


def unique_variables(*groups: Any) -> list[Any]:
    """The variables of ``groups`` in order, each once (groups share variables)."""
    seen: set[int] = set()
    out: list[Any] = []
    for group in groups:
        for v in group:
            if id(v) not in seen:
                seen.add(id(v))
                out.append(v)
    return out


def _bytes_of(variables: Any) -> int:
    total = 0
    for v in variables:
        n = int(np.prod(v.shape)) if len(v.shape) else 1
        total += n * tf.as_dtype(v.dtype).size
    return total


def weights_bytes(model: Any) -> int:
    """Bytes of the model's own variables (weights and state), without building anything."""
    return _bytes_of(model.variables)


def state_bytes(model: Any) -> int:
    """Bytes held by the model's and optimizer's variables: the floor of any batch's memory."""
    return _bytes_of(model_variables(model))


RESTORE_CHUNK_BYTES = 1 << 20


def _assign_in_chunks(variable: Any, value: np.ndarray) -> None:
    if value.ndim == 0 or value.nbytes <= RESTORE_CHUNK_BYTES or value.shape[0] < 2:
        variable.assign(value)
        return
    target = getattr(variable, "value", variable)  # the tf.Variable behind a keras.Variable
    if callable(target) or not hasattr(target, "__getitem__"):
        variable.assign(value)
        return
    rows = max(1, RESTORE_CHUNK_BYTES // max(1, value[0].nbytes))
    for start in range(0, value.shape[0], rows):
        target[start:start + rows].assign(value[start:start + rows])


class ModelState:
    """A snapshot of every variable of a model (see :func:`model_variables`), restorable exactly.

    Example:

    >>> import keras, numpy as np
    >>> m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    >>> m.compile("adam", "mse")
    >>> s = ModelState(m)
    >>> _ = m.train_on_batch(np.ones((4, 3)), np.ones((4, 1)))
    >>> s.restore(); s.equals_current()
    True
    """

    def __init__(self, model: Any) -> None:
        self._vars = model_variables(model)
        self._values = [np.array(v.numpy(), copy=True) for v in self._vars]

    def restore(self) -> None:
        """Assign the saved values back to every variable.

        Large variables are assigned in slices of at most :data:`RESTORE_CHUNK_BYTES`:
        assigning a whole array first converts it into a tensor of its full size, and when the
        allocator is nearly full (right after an out-of-memory step) that conversion crashed
        the process instead of raising (measured under a CPU allocator cap).
        """
        for v, value in zip(self._vars, self._values):
            _assign_in_chunks(v, value)

    def equals_current(self) -> bool:
        """Whether every variable holds exactly (bitwise) its saved value."""
        return all(np.array_equal(np.asarray(v.numpy()), value, equal_nan=True)
                   for v, value in zip(self._vars, self._values))


def memory_device(device: str | None = None) -> str:
    """The device whose allocator a probe reads: ``'GPU:0'`` when a GPU is visible, else ``'CPU:0'``."""
    if device:
        return device
    return "GPU:0" if tf.config.list_physical_devices("GPU") else "CPU:0"


def read_peak(device: str) -> int | None:
    """The allocator's peak bytes since the last reset, or ``None`` if it keeps no statistics."""
    try:
        return int(tf.config.experimental.get_memory_info(device)["peak"])
    except (ValueError, RuntimeError, tf.errors.OpError):
        return None


def reset_peak(device: str) -> None:
    try:
        tf.config.experimental.reset_memory_stats(device)
    except (ValueError, RuntimeError, tf.errors.OpError):
        pass


def trace_general_step(model: Any, batch_fn: Any, state: Any,
                       sizes: tuple[int, ...] = (1, 2)) -> tuple[bool, str] | None:
    """Run tiny training steps so Keras has traced the step ``fit`` runs; restore the state.

    Keras traces its step with ``reduce_retracing=True``: the first batch size gets a graph
    specialized to that static shape, the second a graph with a ``None`` batch dimension, used
    for every size after (and the kind ``fit`` runs, whose batches have a ``None`` batch
    dimension). Memory probes and throughput timing both run this first, so that neither
    measures a graph of its own for whichever size comes first.

    Args:
        model: the compiled model.
        batch_fn: ``batch_fn(b) -> (x, y)``, a batch of ``b`` samples.
        state: the model's saved state (``restore()`` puts weights and optimizer back).
        sizes: the batch sizes of the tiny steps.

    Returns:
        ``None``, or ``(is_oom, message)`` for the first step that failed (it stops there).

    Example:

    >>> import keras, numpy as np
    >>> m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    >>> m.compile("adam", "mse")
    >>> state = ModelState(m)
    >>> trace_general_step(m, lambda b: (np.ones((b, 3)), np.ones((b, 1))), state) is None
    True
    >>> state.equals_current()  # the two tiny steps left no trace in the weights
    True
    """
    for b in sizes:
        failure = None
        try:
            x, y = batch_fn(b)
            model.train_on_batch(x, y)
        except Exception as exc:  # noqa: BLE001 - the caller decides
            failure = (is_oom_error(exc), failure_line(exc))
        # Restore only once the exception (whose traceback keeps the failed step's tensors
        # alive) is gone.
        state.restore()
        if failure is not None:
            return failure
    return None


class ProbeRunner:
    """Measures training steps at chosen batch sizes on one model, in this process.

    Args:
        model: a compiled ``keras.Model``; its state is restored after every probe.
        batch_fn: ``batch_fn(b) -> (x, y)`` builds one batch of ``b`` examples.
        steps: training steps per probe (the first also traces; default 3, as Lightning).
        device: allocator to read (``'CPU:0'``/``'GPU:0'``); default: the GPU if any.
        budget_bytes: the memory budget. A probe whose measured peak exceeds it is
            ``"over_budget"`` (when the budget is not enforced by the allocator itself); one
            whose peak comes within ``limit_margin`` of it is ``"at_limit"``.
        limit_margin: fraction of the budget below which a peak must stay to count as fitting
            (default 0.02). Measured under a capped allocator: near the cap an allocation that
            cannot be served waits (up to 10 s) for other ops to free memory, the peak reads
            "the budget" for a band of sizes, steps slow down, and whether a size in that band
            passes depends on thread timing (the same size fitting in one fresh process and not
            in the next). Sizes in the band are not reported as fitting.
    """

    def __init__(self, model: Any, batch_fn: BatchFn, *, steps: int = 3,
                 device: str | None = None, budget_bytes: int | None = None,
                 limit_margin: float = 0.02) -> None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.model = model
        self.batch_fn = batch_fn
        self.steps = steps
        self.device = memory_device(device)
        self.budget_bytes = budget_bytes
        if not 0 <= limit_margin < 1:
            raise ValueError(f"limit_margin must be in [0, 1), got {limit_margin}")
        self.limit_margin = limit_margin
        self.state = ModelState(model)

    def warm_up(self, sizes: tuple[int, ...] = (1, 2)) -> tuple[bool, str] | None:
        """Trace the training step for any batch size before measuring.

        See :func:`trace_general_step`. Measured: the graph specialized to the first batch
        size differs in peak memory from the general one by up to 30%, so without this a
        probe's answer depended on which sizes ran before it.

        Returns:
            ``None``, or ``(is_oom, message)`` for the first step that failed (warming up
            stops there).
        """
        return trace_general_step(self.model, self.batch_fn, self.state, sizes)

    def run(self, batch_size: int) -> Probe:
        """Run ``steps`` training steps at ``batch_size`` and report what happened.

        Out-of-memory errors and errors raised by the model become the probe's outcome
        (``"oom"``/``"refused"``); the model's state is restored in every case.
        """
        t0 = time.perf_counter()
        step_times: list[float] = []
        probe: Probe | None = None
        try:
            x, y = self.batch_fn(batch_size)
            reset_peak(self.device)
            for _ in range(self.steps):
                s = time.perf_counter()
                logs = self.model.train_on_batch(x, y, return_dict=True)
                # train_on_batch returns numpy values: the step has finished on the device.
                step_times.append(time.perf_counter() - s)
            peak = read_peak(self.device)
            del x, y
            loss = logs.get("loss") if isinstance(logs, dict) else None
            detail = ""
            if loss is not None and not np.isfinite(loss):
                detail = "loss is not finite at this batch size (memory measured anyway)"
            outcome = "fits"
            if self.budget_bytes is not None and peak is not None:
                if peak > self.budget_bytes:
                    outcome, detail = "over_budget", "measured peak exceeds the budget"
                elif peak >= (1.0 - self.limit_margin) * self.budget_bytes:
                    outcome = "at_limit"
                    detail = (f"peak within {self.limit_margin:.0%} of the budget: too close "
                              f"to count as fitting (near the cap the same size fits in one "
                              f"process and not in the next)")
            probe = Probe(
                batch_size=batch_size, fits=outcome == "fits", outcome=outcome,
                peak_bytes=peak, seconds=time.perf_counter() - t0,
                step_seconds=statistics.median(step_times[1:]) if len(step_times) > 1 else None,
                detail=detail)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a probe outcome
            probe = Probe(batch_size=batch_size, fits=False,
                          outcome="oom" if is_oom_error(exc) else "refused", peak_bytes=None,
                          seconds=time.perf_counter() - t0, step_seconds=None,
                          detail=failure_line(exc))
        finally:
            # Outside the handler: the exception's traceback, which keeps the failed step's
            # tensors alive, is released before the state is assigned back. Metrics are reset
            # first (those built by the steps start at zero), then the snapshot is restored
            # (the caller's metric totals included).
            with contextlib.suppress(Exception):  # metrics without reset are harmless here
                self.model.reset_metrics()
            self.state.restore()
        return probe
