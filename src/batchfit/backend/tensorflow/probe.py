"""Run a few real training steps at one batch size and measure them, leaving the model as it was.

A probe runs the path ``model.fit`` runs, with the user's own compiled model: the batches come
through Keras's own epoch iterator (the data adapter, prefetching, the model's strategy and
``steps_per_execution``; :func:`~batchfit.backend.tensorflow.keras_compat.fit_epoch_iterator`)
into ``model.train_function``, the compiled function ``fit`` calls, and after each epoch one
batch of the same size goes through ``model.test_function``, as ``fit``'s validation pass at
the end of an epoch does (the next epoch starts on the heap it left). The peak is taken over
both: neither training nor validation at the answer can need memory the probe did not see.
Around them it resets and reads the allocator's peak
(``tf.config.experimental.reset_memory_stats`` / ``get_memory_info``), times each step, and
afterwards assigns back every variable it may have touched (weights, non-trainable state, random
seed state, optimizer slots and iteration count, metrics), so probing is invisible to the caller.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tensorflow as tf

from ...core.settle import LIMIT_MARGIN, PROBE_STEPS, SettleRule, limit_note, limit_outcome
from ...errors import error_line
from ...results import Probe
from ..oom import is_oom_error
from .keras_compat import compiled_step_function, epoch_dataset, fit_epoch_iterator

BatchFn = Callable[[int], "tuple[Any, Any]"]
#: ``watch(True)`` as a compiled step starts, ``watch(False)`` as it returns (see :func:`in_step`).
Watch = Callable[[bool], None]


@contextlib.contextmanager
def in_step(watch: Watch | None) -> Iterator[None]:
    """Tell ``watch`` that a compiled step runs now (and when it returned): the stall watch
    (:mod:`batchfit.workers.stall`) counts a process's quiet time only inside such a section.
    The conversion of a probe's arrays into tensors (where the budget may run out too, before
    any step: 20,000 samples of seed_wide under 64 MiB) is watched the same way.

    Outside a step a probe process can sit still for seconds without waiting on memory:
    deleting a ``tf.data`` iterator (``fit``'s epoch iterator, at the end of every epoch) joins
    its autotuning thread, which wakes only at its next optimization period, doubling from
    10 ms as the iterator lives (measured, TensorFlow 2.21: ResNet50 probes sat in
    ``~IteratorResource`` 1-5 s with every thread asleep, and were killed as out of memory).
    Inside the call, a process with no thread running is blocked on the capped allocator.
    Python's cyclic garbage collector is off meanwhile, so that no iterator freed as garbage
    is deleted inside the call.

    Example:

    >>> seen = []
    >>> with in_step(seen.append):
    ...     pass
    >>> seen
    [True, False]
    """
    if watch is None:
        yield
        return
    collecting = gc.isenabled()
    gc.disable()
    watch(True)
    try:
        yield
    finally:
        watch(False)
        if collecting:
            gc.enable()


def release_epochs(held: list[Any]) -> None:
    """Delete the epoch iterators and ``tf.data`` iterators in ``held`` now (see
    :func:`in_step`: outside any step), instead of whenever the garbage collector reaches them
    (an epoch iterator and its generator hold each other)."""
    while held:
        item = held.pop()
        with contextlib.suppress(Exception):
            if hasattr(item, "reset"):
                item.reset()
        del item


def failure_line(exc: BaseException, limit: int = 300) -> str:
    """The line a failed step reports: ``"TypeName: line"``, at most ``limit`` characters.

    Of a long TensorFlow or Keras error it keeps the most informative line: the first that names
    an OOM or a limit exceeded, else the last that names an Error, else the first.
    """
    return error_line(exc, limit=None, with_type=True, prefer="OOM|exceeds",
                      prefer_last="Error")[:limit]



def model_variables(model: Any, build: bool = True) -> list[Any]:
    """Every variable a training step can change: model state, optimizer state, metric state.

    With ``build`` (the default), builds the optimizer first when it has never been built, so
    its slots exist to be saved (the values are the optimizer's fresh initial values, as its
    first real step would create them).
    """
    opt = getattr(model, "optimizer", None)
    if build and opt is not None and not getattr(opt, "built", True):
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
    """Bytes held by the model's and optimizer's variables: the floor of any batch's memory.

    Builds nothing: an optimizer not built yet adds its slots, counted from a copy of it built
    on one small variable (slots per variable, times the trainable bytes), because building
    the real one before the first step changes the step's own peak (see ``own_model`` in
    :class:`ProbeRunner`).
    """
    total = _bytes_of(model_variables(model, build=False))
    opt = getattr(model, "optimizer", None)
    if opt is not None and not getattr(opt, "built", True):
        total += _unbuilt_slots_per_variable(opt) * _bytes_of(model.trainable_variables)
    return total


def _unbuilt_slots_per_variable(opt: Any) -> int:
    """How many slots per trainable variable ``opt`` will create once built (its scalars,
    the step counter and learning rate, exist before it is built)."""
    import keras

    try:
        probe_var = keras.Variable(np.zeros((8,), "float32"), name="batchfit_slot_probe")
        clone = opt.__class__.from_config(opt.get_config())
        clone.build([probe_var])
        return sum(tuple(v.shape) == (8,) for v in clone.variables)
    except Exception:  # noqa: BLE001 - a custom optimizer: count two slots, as Adam's
        return 2


def assign_whole(variable: Any, value: Any) -> None:
    """Assign ``value`` to the whole of ``variable``, never to a slice of it.

    A slice assignment (``v[a:b].assign(...)``, TensorFlow's ``ResourceStridedSliceAssign``)
    puts a resource variable in copy-on-read mode for good: from then on every dense read of
    it in a step copies its buffer. Measured: after a state restore by slices, a probe of
    ResNet50 (64x64, Adam) at batch 16 peaked at 567-585 MiB where the same process had
    peaked at 422 MiB before it, and the user's own ``fit`` in a fresh process at 449 MiB; a
    two-layer MLP with 4 MiB kernels went from 32 to 52 MiB. Whole assignments keep the
    peaks at 423-457 MiB.
    """
    variable.assign(value)


class ModelState:
    """A snapshot of every variable of a model (see :func:`model_variables`), restorable exactly.

    ``build_optimizer=False`` leaves an unbuilt optimizer unbuilt: its slots, created later by
    the first step, are then not part of the snapshot.

    Example:

    >>> import keras, numpy as np
    >>> m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    >>> m.compile("adam", "mse")
    >>> s = ModelState(m)
    >>> _ = m.train_on_batch(np.ones((4, 3)), np.ones((4, 1)))
    >>> s.restore(); s.equals_current()
    True
    """

    def __init__(self, model: Any, build_optimizer: bool = True) -> None:
        self._vars = model_variables(model, build=build_optimizer)
        self._values = [np.array(v.numpy(), copy=True) for v in self._vars]

    def restore(self) -> None:
        """Assign the saved values back to every variable, each whole (see
        :func:`assign_whole`: a restore by slices made every later step read copies)."""
        for v, value in zip(self._vars, self._values):
            assign_whole(v, value)

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


class StepPeaks:
    """The allocator's peak in each compiled training call of a probe, and outside them.

    ``before()`` and ``after()`` go around each call: the peak since the last reading is
    booked outside the steps (the epoch iterator's conversion, the gathers between calls) or
    to the step, and the statistics are reset. :func:`train_like_fit` calls them.

    Example:

    >>> import keras, numpy as np
    >>> m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    >>> m.compile("sgd", "mse")
    >>> peaks = StepPeaks("CPU:0")
    >>> _ = train_like_fit(m, np.ones((12, 3)), np.ones((12, 1)), 4, step_peaks=peaks)
    >>> len(peaks.steps)
    3
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.steps: list[int] = []
        self.outside = 0
        self.validation = 0  # the largest peak of a validation pass (see :meth:`around`)
        self.known = read_peak(device) is not None

    def before(self) -> None:
        self.outside = max(self.outside, read_peak(self.device) or 0)
        reset_peak(self.device)

    def after(self) -> None:
        peak = read_peak(self.device)
        if peak is not None:
            self.steps.append(peak)
        reset_peak(self.device)

    def around(self, validation: Callable[[], Any]) -> Any:
        """Run a validation pass, its peak booked apart (:attr:`validation`); return its result."""
        self.before()
        try:
            return validation()
        finally:
            self.validation = max(self.validation, read_peak(self.device) or 0)
            reset_peak(self.device)

    def total(self) -> int | None:
        """The largest peak so far: steps, validation and outside them (``None``: no
        statistics)."""
        if not self.known:
            return None
        self.outside = max(self.outside, read_peak(self.device) or 0)
        return max([self.outside, self.validation, *self.steps])

    def typical(self) -> float | None:
        """The median step's peak, where the largest peak so far came from a step."""
        if not self.steps or max(self.outside, self.validation) >= max(self.steps):
            return None
        return float(statistics.median(self.steps))


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


def _sync(logs: Any) -> Any:
    """Wait for a step's outputs (``fit`` reads them back the same way, for its callbacks)."""
    return {k: np.asarray(v) for k, v in logs.items()} if isinstance(logs, dict) else logs


def train_like_fit(model: Any, x: Any, y: Any, batch_size: int, *, watch: Watch | None = None,
                   hold: list[Any] | None = None, fresh: bool = False,
                   again: Callable[[], bool] | None = None,
                   step_peaks: StepPeaks | None = None,
                   prepared: Any = None) -> tuple[Any, list[float]]:
    """Train on ``x``/``y`` in batches of ``batch_size`` the way one epoch of ``fit`` does.

    Keras's epoch iterator feeds ``model.train_function`` (built by ``make_train_function``, as
    ``fit`` builds it), one call per ``steps_per_execution`` steps, until the data runs out.
    ``watch`` is told when each call starts and returns (:func:`in_step`). With ``hold``, the
    epoch iterator is appended to it and kept alive, as ``fit`` keeps its own (with the next
    epoch's ``tf.data`` iterator) through the validation pass; :func:`release_epochs` ends it.
    ``fresh``: build a new train function (``make_train_function(force=True)``), so its first
    call traces the graph specialized to this batch shape, the graph a process's first ``fit``
    at this batch size runs (a function traced before runs its ``None``-batch graph instead,
    which may need less memory: measured, a Transformer whose general graph fitted at 141
    under 64 MiB where the user's own ``fit`` at 141 ran out of memory). ``again``: called after
    each epoch; while it returns ``True`` another epoch runs over the same batches, through the
    same epoch iterator, as ``fit``'s epochs do. ``step_peaks``: told before and after each
    compiled call (:class:`StepPeaks`). ``prepared``: the epoch iterator over ``x``/``y``
    that :meth:`ProbeRunner.prepare` made, with the train function it traced for it (used as
    they are: ``fresh`` was applied there).

    Returns:
        The last logs (NumPy values) and the seconds of each step (an execution's time split
        evenly over its steps).

    Example:

    >>> import keras, numpy as np
    >>> m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    >>> m.compile("sgd", "mse", steps_per_execution=2)
    >>> logs, times = train_like_fit(m, np.ones((12, 3)), np.ones((12, 1)), 4)
    >>> int(m.optimizer.iterations.numpy()), len(times)
    (3, 3)
    """
    if prepared is None:
        with in_step(watch):  # the arrays become tensors here: memory the allocator may refuse
            epochs = fit_epoch_iterator(model, x, y, batch_size=batch_size, shuffle=True)
    else:
        epochs = prepared
    held = [epochs] if hold is None else hold
    if hold is not None:
        hold.append(epochs)
    model.make_train_function(force=fresh and prepared is None)
    model.reset_metrics()
    logs: Any = None
    times: list[float] = []
    per_call = max(1, int(getattr(model, "steps_per_execution", 1) or 1))
    try:
        while True:
            logs = _one_epoch(model, epochs, per_call, watch, hold, times, logs, step_peaks)
            if again is None or not again():
                break
    finally:
        if hold is None:
            release_epochs(held)
    return logs, times


def _one_epoch(model: Any, epochs: Any, per_call: int, watch: Watch | None,
               hold: list[Any] | None, times: list[float], logs: Any,
               step_peaks: StepPeaks | None = None) -> Any:
    """One epoch of :func:`train_like_fit`; appends each step's seconds to ``times``."""
    with epochs.catch_stop_iteration():
        for begin, end, iterator in epochs:
            if hold is not None and not any(h is iterator for h in hold):
                # Keras replaces this epoch's tf.data iterator as the data runs out; held,
                # it is deleted with the rest (its buffers are empty by then)
                hold.append(iterator)
            if step_peaks is not None:
                step_peaks.before()
            s = time.perf_counter()
            with in_step(watch):
                logs = _sync(model.train_function(iterator))
            if step_peaks is not None:
                step_peaks.after()
            n = max(1, min(per_call, end - begin + 1, (epochs.num_batches or end + 1) - begin))
            times.extend([(time.perf_counter() - s) / n] * n)
    return logs


class FitValidation:
    """``fit``'s validation pass at the end of each epoch, one pass per call.

    ``fit`` builds its validation epoch iterator at the first epoch's end and keeps it for the
    others (``_eval_epoch_iterator``, reset before each pass, which drops the ``tf.data``
    iterator the last pass left for the next); each pass runs ``model.test_function`` over all
    of the validation data. So does this: the first call builds the iterator (appended to
    ``hold``, as in :func:`train_like_fit`) and, with ``fresh``, a new test function traced for
    this batch shape; later calls reset the iterator and reuse both. ``watch``: see
    :func:`in_step`.

    Example:

    >>> import keras, numpy as np
    >>> m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    >>> m.compile("sgd", "mse")
    >>> held = []
    >>> validate = FitValidation(m, np.ones((4, 3)), np.ones((4, 1)), 4, hold=held)
    >>> sorted(validate()), sorted(validate()), len(held)
    (['loss'], ['loss'], 1)
    >>> release_epochs(held)
    """

    def __init__(self, model: Any, x: Any, y: Any, batch_size: int, *, hold: list[Any],
                 watch: Watch | None = None, fresh: bool = False) -> None:
        self.model, self.x, self.y, self.batch_size = model, x, y, batch_size
        self.hold, self.watch, self.fresh = hold, watch, fresh
        self._epochs: Any = None

    def __call__(self) -> Any:
        """One validation pass; returns its logs (NumPy values)."""
        if self._epochs is None:
            with in_step(self.watch):
                self._epochs = fit_epoch_iterator(self.model, self.x, self.y,
                                                  batch_size=self.batch_size, shuffle=False)
            self.hold.append(self._epochs)
            self.model.make_test_function(force=self.fresh)
        else:
            self._epochs.reset()
        self.model.reset_metrics()
        logs: Any = None
        with self._epochs.catch_stop_iteration():
            for _, _, iterator in self._epochs:
                with in_step(self.watch):
                    logs = _sync(self.model.test_function(iterator))
        return logs


def evaluate_like_fit(model: Any, x: Any, y: Any, batch_size: int, *,
                      watch: Watch | None = None, hold: list[Any] | None = None,
                      fresh: bool = False) -> Any:
    """One validation pass over ``x``/``y`` at ``batch_size``, as ``fit``'s end-of-epoch
    ``evaluate`` runs it (:class:`FitValidation`; ``watch``, ``hold`` and ``fresh`` as in
    :func:`train_like_fit`).

    Example:

    >>> import keras, numpy as np
    >>> m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    >>> m.compile("sgd", "mse")
    >>> sorted(evaluate_like_fit(m, np.ones((8, 3)), np.ones((8, 1)), 4))
    ['loss']
    """
    held: list[Any] = [] if hold is None else hold
    try:
        return FitValidation(model, x, y, batch_size, hold=held, watch=watch, fresh=fresh)()
    finally:
        if hold is None:
            release_epochs(held)


def trace_general_once(model: Any, batch_fn: Any, steps: int, watch: Watch | None = None) -> None:
    """Trace the train and test steps once each, directly with a ``None`` batch dimension.

    ``fit``'s iterator over arrays has a static batch shape, so Keras's ``reduce_retracing``
    needs two sizes to reach the ``None``-batch graph (four traces: train and test at 1, then
    at 2). Fed once from ``fit``'s own dataset re-batched without ``drop_remainder`` (element
    spec ``(None, ...)``), each function is traced once, in that general form, and every later
    static-shaped batch reuses it (its shapes are subtypes of the traced ones). Measured on a
    two-input model with ``steps_per_execution=2``: one trace each across sizes 1, 2, 5, 7.
    Raises whatever the steps raise (the caller restores the state). ``watch``: see
    :func:`in_step` (each iterator is deleted outside the step that used it).
    """
    x, y = batch_fn(steps)
    with in_step(watch):
        epochs = fit_epoch_iterator(model, x, y, batch_size=1, shuffle=False)
        general = epoch_dataset(epochs).unbatch().batch(1)
    model.make_train_function()
    model.make_test_function()
    for function in (model.train_function, model.test_function):
        model.reset_metrics()
        iterator = iter(general)
        with in_step(watch):
            _sync(function(iterator))
        del iterator


def trace_fit_path(model: Any, batch_fn: Any, state: Any, steps: int,
                   sizes: tuple[int, ...] = (1, 2),
                   watch: Watch | None = None) -> tuple[bool, str] | None:
    """:func:`trace_general_step` for the path ``fit`` runs (training and validation).

    The train and test steps are traced once each with a ``None`` batch dimension
    (:func:`trace_general_once`); if that cannot run (a Keras whose epoch iterator differs,
    a distributed dataset), two tiny sizes, so that Keras's ``reduce_retracing`` has traced
    them in the general form before any probe measures them. The state is restored.
    ``watch``: see :func:`in_step`.

    Returns:
        ``None``, or ``(is_oom, message)`` for the first size that failed.
    """
    failure = None
    try:
        trace_general_once(model, batch_fn, steps, watch)
    except Exception as exc:  # noqa: BLE001 - the caller decides; other errors: two sizes
        failure = (is_oom_error(exc), failure_line(exc))
    with contextlib.suppress(Exception):
        model.reset_metrics()
    state.restore()
    if failure is None:
        return None
    if failure[0]:
        return failure
    for b in sizes:
        failure = None
        try:
            x, y = batch_fn(b * steps)
            train_like_fit(model, x, y, b, watch=watch)
            evaluate_like_fit(model, x, y, b, watch=watch)
        except Exception as exc:  # noqa: BLE001 - the caller decides
            failure = (is_oom_error(exc), failure_line(exc))
        with contextlib.suppress(Exception):
            model.reset_metrics()
        state.restore()
        if failure is not None:
            return failure
    return None


def repeated_batches(batch_fn: BatchFn, batch_size: int, steps: int) -> tuple[Any, Any]:
    """``steps`` batches of ``batch_size`` for a probe: one batch from ``batch_fn``, repeated.

    A step's memory does not depend on the values; making ``steps`` distinct batches costs time
    that grows with the batch: 100,000 synthesized samples of 64x32 took 6 s, with the stall
    watch (which kills a probe waiting on memory after 1 s) not yet running.

    Example:

    >>> x, y = repeated_batches(lambda b: (np.arange(b), None), 2, 3)
    >>> x.tolist(), y
    ([0, 1, 0, 1, 0, 1], None)
    """
    xb, yb = batch_fn(batch_size)

    def repeat(a: Any) -> Any:
        return np.concatenate([np.asarray(a)] * steps) if steps > 1 else a

    return (tf.nest.map_structure(repeat, xb),
            None if yb is None else tf.nest.map_structure(repeat, yb))


def trace_ahead(model: Any, epochs: Any) -> bool:
    """Trace the train and test functions for the batches of ``epochs`` without running them.

    Each compiled function is traced for the iterator type of the epoch's dataset
    (``get_concrete_function`` on a ``tf.data.IteratorSpec``), the same type the first call
    with the epoch's own iterator has, so that call runs the traced graph instead of tracing.
    Nothing executes; what tracing creates (the optimizer's slots, if not built yet) is created
    here, in the order the first step would have created it, after the batches. Returns
    whether both were traced (a distributed dataset, or a Keras whose functions are not found
    by :func:`~batchfit.backend.tensorflow.keras_compat.compiled_step_function`, is left to its
    first step). Raises what tracing raises.

    Example:

    >>> import keras, numpy as np
    >>> m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    >>> m.compile("sgd", "mse")
    >>> epochs = fit_epoch_iterator(m, np.ones((8, 3)), np.ones((8, 1)), batch_size=4,
    ...                             shuffle=True)
    >>> m.make_train_function(force=True); m.make_test_function(force=True)
    >>> trace_ahead(m, epochs)
    True
    >>> logs, _ = train_like_fit(m, None, None, 4, prepared=epochs)
    >>> compiled_step_function(m.train_function).experimental_get_tracing_count()
    1
    """
    dataset = epoch_dataset(epochs)
    functions = [compiled_step_function(f) for f in (model.train_function, model.test_function)]
    if not isinstance(dataset, tf.data.Dataset) or any(f is None for f in functions):
        return False
    spec = tf.data.IteratorSpec(dataset.element_spec)
    for function in functions:
        function.get_concrete_function(spec)
    return True


@dataclasses.dataclass
class _Prepared:
    """A probe's first part, done ahead by :meth:`ProbeRunner.prepare`."""

    batch_size: int
    x: Any = None
    y: Any = None
    epochs: Any = None
    failure: Probe | None = None


class ProbeRunner:
    """Measures training steps at chosen batch sizes on one model, in this process.

    Args:
        model: a compiled ``keras.Model``; its state is restored after every probe.
        batch_fn: ``batch_fn(b) -> (x, y)`` builds one batch of ``b`` examples.
        steps: training steps per epoch of a probe (the first also traces; default
            :data:`~batchfit.core.settle.PROBE_STEPS`, 5: see there why not Lightning's 3).
        device: allocator to read (``'CPU:0'``/``'GPU:0'``); default: the GPU if any.
        budget_bytes: the memory budget. A probe whose measured peak exceeds it is
            ``"over_budget"`` (when the budget is not enforced by the allocator itself); one
            whose peak comes within ``limit_margin`` of it is ``"at_limit"``.
        limit_margin: fraction of the budget below which a peak must stay to count as fitting
            (default :data:`~batchfit.core.settle.LIMIT_MARGIN`, 3%). Measured under a capped
            allocator: near the cap an allocation that cannot be served waits (up to 10 s) for
            other ops to free memory, the peak reads "the budget" for a band of sizes, steps
            slow down, and whether a size in that band passes depends on thread timing (the
            same size fitting in one fresh process and not in the next). Sizes in the band are
            not reported as fitting.
        own_model: the model is this process's own (a probe worker's): an optimizer not built
            yet is left for the first probe's traced step to build, as a process's first
            ``fit`` does, and its slots are not restored between probes (their values change
            no memory). Building it before the first step lowered the step's peak (where the
            allocator placed the rest): measured, ResNet50 (64x64, Adam) at 24 under 512 MiB
            fitted at 465 MiB in fresh workers that had built it, 2 of 2, and ran out of memory
            in those that had not, 2 of 2, as the user's own ``fit`` did (2 of 3). Default
            ``False``: the caller's model, restored exactly.
        settle_epochs: run the ``steps`` as epochs over the same batches until the peak stops
            rising, at most this many (default 8; ``1``: the steps once). A step's peak creeps
            up for a while as the allocator's free chunks fragment; three steps saw 5-7% less
            than training meets (see :mod:`batchfit.core.settle`).

    Attributes:
        watch: told when each compiled step starts and returns (:func:`in_step`); a probe
            worker sets it so that its parent's stall watch runs only inside steps.
        defer_cleanup: leave deleting the probe's iterators and restoring the model to
            :meth:`finish` (default ``False``: :meth:`run` does it). A probe worker answers
            first: deleting ``tf.data`` iterators can sit for seconds, and a process that ran
            its only probe is killed instead.
    """

    def __init__(self, model: Any, batch_fn: BatchFn, *, steps: int = PROBE_STEPS,
                 device: str | None = None, budget_bytes: int | None = None,
                 limit_margin: float = LIMIT_MARGIN, own_model: bool = False,
                 settle_epochs: int = 8) -> None:
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
        self.settle = SettleRule.for_budget(budget_bytes, max_epochs=settle_epochs,
                                            limit_margin=limit_margin)
        self.state = ModelState(model, build_optimizer=not own_model)
        self.watch: Watch | None = None
        self.defer_cleanup = False
        self._pending: list[Any] | None = None  # a deferred cleanup's held iterators
        self._prepared: _Prepared | None = None  # the next probe's first part (prepare)
        self.ran_prepared = False  # whether the last run started from what prepare made

    def warm_up(self, sizes: tuple[int, ...] = (1, 2)) -> tuple[bool, str] | None:
        """Trace the training and validation steps for any batch size before measuring.

        See :func:`trace_fit_path`. Measured: the graph specialized to the first batch
        size differs in peak memory from the general one by up to 30%, so without this a
        probe's answer depended on which sizes ran before it.

        Returns:
            ``None``, or ``(is_oom, message)`` for the first step that failed (warming up
            stops there).
        """
        return trace_fit_path(self.model, self.batch_fn, self.state, self.steps, sizes,
                              self.watch)

    def prepare(self, batch_size: int) -> None:
        """Do the first part of the next :meth:`run` at ``batch_size`` now: the batches, the
        epoch iterator (the batches as tensors) and the train and test functions traced for
        them (:func:`trace_ahead`), in the order ``run`` does it, no step run.

        A worker started ahead of a probe whose size is known (a confirmation, a check of the
        safe size) prepares while the current probe runs: its probe then starts at its first
        step. Measured (MobileNetV2 at 96x96, batch 29, one thread, the machine loaded): the
        first call of the train function took 18.8 s, of which tracing 11.9 s, where a later
        step took 0.6 s. A failure here (the batches do not fit) is kept and becomes that
        probe's outcome, as it would have in ``run``.
        """
        self.finish()
        self._prepared = None
        t0 = time.perf_counter()
        prepared = _Prepared(batch_size)
        try:
            prepared.x, prepared.y = repeated_batches(self.batch_fn, batch_size, self.steps)
            reset_peak(self.device)
            prepared.epochs = fit_epoch_iterator(self.model, prepared.x, prepared.y,
                                                 batch_size=batch_size, shuffle=True)
            self.model.make_train_function(force=True)
            self.model.make_test_function(force=True)
            trace_ahead(self.model, prepared.epochs)
        except Exception as exc:  # noqa: BLE001 - the probe's outcome, reported by run
            prepared = _Prepared(batch_size, failure=Probe(
                batch_size=batch_size, fits=False,
                outcome="oom" if is_oom_error(exc) else "refused", peak_bytes=None,
                seconds=time.perf_counter() - t0, step_seconds=None, detail=failure_line(exc),
                epochs=0))
            del exc
            gc.collect()
            with contextlib.suppress(Exception):
                self.model.reset_metrics()
            self.state.restore()
        self._prepared = prepared

    def _take_prepared(self, batch_size: int) -> _Prepared | None:
        """The prepared first part for ``batch_size`` (``None``: none; one prepared for
        another size is dropped and the probe starts from scratch)."""
        prepared, self._prepared = self._prepared, None
        if prepared is not None and prepared.batch_size != batch_size:
            if prepared.epochs is not None:
                release_epochs([prepared.epochs])
            return None
        return prepared

    def run(self, batch_size: int) -> Probe:
        """Run ``steps`` training steps at ``batch_size`` and report what happened.

        The train and test functions are built anew and traced for this batch shape (see
        ``fresh`` in :func:`train_like_fit`): the graph the user's own ``fit`` at this size
        runs, not the warm-up's ``None``-batch one (or :meth:`prepare` did that ahead). Out-of-
        memory errors and errors raised by the model become the probe's outcome
        (``"oom"``/``"refused"``); the model's state is restored in every case.
        """
        prepared = self._take_prepared(batch_size)
        self.ran_prepared = prepared is not None
        if prepared is not None and prepared.failure is not None:
            return prepared.failure
        self.finish()
        t0 = time.perf_counter()
        probe: Probe | None = None
        phase = ["training"]
        epochs = [0]  # training epochs that ended (each followed by its validation pass)
        held: list[Any] = []  # fit keeps its epoch iterator through validation: so does this
        ready = None if prepared is None else prepared.epochs
        try:
            if prepared is None:
                x, y = repeated_batches(self.batch_fn, batch_size, self.steps)
                reset_peak(self.device)
            else:  # the peak since prepare's reset counts, as run's own would
                x, y, prepared = prepared.x, prepared.y, None
            peaks = StepPeaks(self.device)
            logs, step_times = train_like_fit(
                self.model, x, y, batch_size, watch=self.watch, hold=held, fresh=True,
                again=self._end_of_epoch(x, y, batch_size, held, peaks, phase, epochs,
                                         traced=ready is not None),
                step_peaks=peaks, prepared=ready)
            del x, y
            peak = peaks.total()
            probe = self._outcome(batch_size, logs, peak, peaks.validation if peak else None,
                                  step_times, t0, peaks, epochs[0])
        except Exception as exc:  # noqa: BLE001 - every failure becomes a probe outcome
            where = "" if phase[0] == "training" else "in the validation step: "
            probe = Probe(batch_size=batch_size, fits=False,
                          outcome="oom" if is_oom_error(exc) else "refused", peak_bytes=None,
                          seconds=time.perf_counter() - t0, step_seconds=None,
                          detail=where + failure_line(exc), epochs=epochs[0])
        finally:
            # Outside the handler: the exception's traceback, which keeps the failed step's
            # tensors alive, is released before the state is assigned back. Metrics are reset
            # first (those built by the steps start at zero), then the snapshot is restored
            # (the caller's metric totals included). The epoch iterators go first, outside
            # any step (their deletion can sit still for seconds; see in_step).
            ready = None  # (``held`` alone keeps a prepared epoch iterator now)
            self._pending = held
            if not self.defer_cleanup:
                self.finish()
        return probe

    def _end_of_epoch(self, x: Any, y: Any, batch_size: int, held: list[Any],
                      step_peaks: StepPeaks, phase: list[str],
                      epochs: list[int], traced: bool = False) -> Callable[[], bool]:
        """``again`` for :func:`train_like_fit`: after every epoch a validation pass on one
        batch, as ``fit`` runs it (:class:`FitValidation`), then another epoch until the peak
        settles (see :mod:`batchfit.core.settle`; one epoch where the allocator keeps no peak).

        Validation between the epochs, not once after them: ``fit``'s next epoch starts on the
        heap its validation left. Measured (the Transformer of the examples under 128 MiB, the
        worker's settings, fresh processes): the user's ``fit`` of 6 epochs of 4 batches with
        one validation batch ran out of memory at 226 in 5 of 6, every time in an epoch after
        a validation pass (4 times at its first step), and once at 220 (of 6), where probes
        with a single validation at the end had fitted 3 of 3.
        """
        def first(a: Any) -> Any:
            return None if a is None else tf.nest.map_structure(lambda t: t[:batch_size], a)

        validate = FitValidation(self.model, first(x), first(y), batch_size, hold=held,
                                 watch=self.watch, fresh=not traced)
        settling = self._settling(step_peaks)

        def again() -> bool:
            epochs[0] += 1
            phase[0] = "validation"
            step_peaks.around(validate)
            phase[0] = "training"
            return settling is not None and settling()

        return again

    def _settling(self, step_peaks: StepPeaks) -> Callable[[], bool] | None:
        """A function saying, after each epoch, whether to run another: until the peak
        settles (see :mod:`batchfit.core.settle`); ``None`` where the allocator keeps no peak."""
        if self.settle.max_epochs <= 1 or not step_peaks.known:
            return None
        peaks: list[float] = []

        def again() -> bool:
            peaks.append(float(step_peaks.total() or 0))
            return not self.settle.settled(peaks)

        return again

    def finish(self) -> None:
        """The last probe's cleanup, if it was deferred (see ``defer_cleanup``); else nothing."""
        held, self._pending = self._pending, None
        if held is None:
            return
        release_epochs(held)
        with contextlib.suppress(Exception):  # metrics without reset are harmless here
            self.model.reset_metrics()
        self.state.restore()

    def _outcome(self, batch_size: int, logs: Any, peak: int | None, eval_peak: int | None,
                 step_times: list[float], t0: float, step_peaks: StepPeaks,
                 epochs: int | None = None) -> Probe:
        """The probe of steps that ran: fits, or too close to / over the budget (see
        :func:`~batchfit.core.settle.limit_outcome`: a peak near the budget in a few training
        steps only, the typical one well under it, still fits)."""
        loss = logs.get("loss") if isinstance(logs, dict) else None
        detail = ""
        if loss is not None and not np.isfinite(loss):
            detail = "loss is not finite at this batch size (memory measured anyway)"
        outcome = "fits"
        in_eval = eval_peak is not None and peak is not None and eval_peak >= peak
        typical = None if in_eval else step_peaks.typical()
        if self.budget_bytes is not None and peak is not None:
            outcome = limit_outcome(peak, self.budget_bytes, typical=typical,
                                    margin=self.limit_margin)
            detail = _limit_detail(outcome, peak, self.budget_bytes, self.limit_margin,
                                   typical, in_eval) or detail
        return Probe(
            batch_size=batch_size, fits=outcome == "fits", outcome=outcome,
            peak_bytes=peak, seconds=time.perf_counter() - t0,
            step_seconds=statistics.median(step_times[1:]) if len(step_times) > 1 else None,
            detail=detail, typical_peak_bytes=None if typical is None else int(typical),
            epochs=epochs)


def _limit_detail(outcome: str, peak: int, budget: int, margin: float, typical: float | None,
                  in_eval: bool) -> str:
    """What a probe's verdict from its peak says (empty: nothing to say)."""
    note = limit_note(outcome, peak, budget, typical=typical, margin=margin,
                      what="measured peak" if outcome == "over_budget" else "peak")
    return note + (" (in the validation step)" if note and in_eval else "")
