"""The TensorFlow execution of :func:`batchfit.fit`: Keras's loop, batchfit's step functions.

The decisions (micro-batch, plans, shrink, grow, measurements) are the
:class:`~batchfit.core.fit_control.FitController`'s; this module executes them:
:class:`FitExecutor` runs one batch of Keras's loop on one device (the fast path reading the
batch inside the compiled step, the split path replaying it as micro-batches, undoing a failed
step), :class:`ReplicatedExecutor` the same under a ``MirroredStrategy``; :func:`run_fit`
installs them around ``model.fit``. See :mod:`batchfit.verbs.fit` for the whole design.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from ...core.fit_control import FitController
from ...errors import InvalidInputError, TrainingOutOfMemoryError
from ..oom import is_oom_error
from .distribute import (
    is_multiworker,
    merge_per_replica,
    model_strategy,
    num_replicas,
    replica_devices,
    resolve_strategy,
)
from .distribute import (
    split_per_replica as _split_per_replica,
)
from .fit_optimizer import OptimizerPatch
from .fit_state import NO_LIMIT, TOO_LARGE, NotReplayable, Replay, data_size, slice_batch
from .fit_steps import StepCompiler
from .probe import failure_line, memory_device, read_peak, reset_peak, state_bytes

__all__ = ["FitExecutor", "ReplicatedExecutor", "check_fit_model", "fit_inputs",
           "fit_strategy", "rebatch", "run_fit"]


class FitExecutor:
    """Runs the batches of Keras's loop on one device as a :class:`FitController` decides.

    Args:
        model: the compiled model.
        control: the decisions.
        strategy: the strategy (``None`` here; :class:`ReplicatedExecutor` takes one).
        logger: where a failure to switch accumulation off after training is logged.
    """

    def __init__(self, model: Any, control: FitController, strategy: Any = None,
                 logger: logging.Logger | None = None) -> None:
        self.model = model
        self.control = control
        self.strategy = strategy
        self.logger = logger or logging.getLogger("batchfit")
        self.optimizer = OptimizerPatch(model, strategy)
        self.steps = StepCompiler(model, self.optimizer)
        self.replays: dict[str, Replay] = {}
        self.device = memory_device(None)
        self._done = 0          # examples of this batch whose updates are final
        self._target = 0        # the shadow copy a failure returns to
        self._accumulating = False
        self._saved_functions = (model.train_function, model.test_function)

    # --- setup and teardown ------------------------------------------------------------
    def install(self) -> None:
        """Patch the optimizer and stand in for Keras's step functions."""
        self.optimizer.install()
        self.model.train_function = _StepFunction(self, "train")
        self.model.test_function = _StepFunction(self, "eval")

    def uninstall(self) -> None:
        """Give the model and optimizer back as they were (never masking a training error)."""
        for replay in self.replays.values():
            replay.clear()
        try:
            self.optimizer.use_accumulation(1)
        except Exception as exc:  # noqa: BLE001 - never mask the error that ended training
            self.logger.warning("batchfit: could not switch gradient accumulation off after "
                                "training: %s", failure_line(exc))
        finally:
            self.optimizer.uninstall()
            self.model.train_function, self.model.test_function = self._saved_functions

    # --- Keras's callbacks ----------------------------------------------------------------
    def epoch_begin(self, epoch: int) -> None:
        self.control.epoch_begin(epoch)

    def epoch_end(self, epoch: int) -> None:
        self.release("train")
        # Between epochs the optimizer is the user's own (no gradient_accumulation_steps,
        # iterations in updates), so epoch-end checkpoints save its own config; the next
        # batch switches accumulation back on.
        self.optimizer.use_accumulation(1)
        self.control.epoch_end(self.optimizer.updates)

    def test_begin(self) -> None:
        self.control.eval_begin()
        self.release("train")

    def release(self, phase: str) -> None:
        """Let go of the last batch the fast path held (between epochs, during evaluation)."""
        replay = self.replays.get(phase)
        if replay is not None:
            replay.clear()

    def largest_seen(self, phase: str) -> int:
        """The largest batch the compiled fast path ran (the host never saw it)."""
        replay = self.replays.get(phase)
        return int(replay.largest.numpy()) if replay is not None else 0

    # --- running one batch -------------------------------------------------------------
    def fast(self, phase: str) -> bool:
        """Whether the next batch may be read inside the compiled step (see ``run_fast``)."""
        replay = self.replays.get(phase)
        return (replay is not None and replay.usable
                and not self.model.run_eagerly   # its step must stay eager
                and self.control.may_run_whole(phase))

    def run_batch(self, phase: str, data: Any) -> Any:
        """Run one batch of Keras's loop, shrinking and replaying it on out-of-memory."""
        n = data_size(data)
        self.control.see_batch(phase, n)
        replay = self.replays.get(phase)
        if replay is None:
            replay = self.replays[phase] = Replay(data)
        replay.clear()
        try:
            return self._run_batch(phase, data, n)
        finally:
            replay.stored = int(replay.count.numpy())
            limit = self.control.limit(phase)
            replay.set_limit(NO_LIMIT if limit is None else limit)

    def run_fast(self, phase: str, iterator: Any) -> Any:
        """One batch read from ``iterator`` inside the compiled step, as Keras's own does.

        The step stores the batch first; when it then fails (out of memory, or a batch larger
        than the micro-batch), the batch is taken back and goes through :meth:`run_batch`.
        """
        shadow = self.steps.shadows[phase]
        replay = self.replays[phase]
        if phase == "train":
            self.optimizer.use_accumulation(1)
        self._accumulating = False
        fn = self.steps.fast_function(phase, replay)
        shadow.arm(True)
        self._target = shadow.count + 1
        t0 = time.perf_counter()
        replay.holding = True
        try:
            logs = fn(iterator)
        except (StopIteration, tf.errors.OutOfRangeError):
            raise StopIteration from None
        except NotReplayable:
            # Found while tracing, before anything ran or was read.
            return self.run_batch(phase, next(iterator))
        except Exception as exc:
            oom = is_oom_error(exc)
            if not oom and not (isinstance(exc, tf.errors.InvalidArgumentError)
                                and TOO_LARGE in str(exc)):
                raise
            failure = failure_line(exc)
        else:
            shadow.count = self._target
            replay.stored += 1
            return logs
        data = replay.take_back()
        if data is None:
            raise TrainingOutOfMemoryError(
                f"out of memory before batchfit held the {phase} batch (while the input "
                f"pipeline produced it): {failure}. Lower the input pipeline's memory "
                "(prefetch, cache, shuffle buffer)", fixed_bytes=float(state_bytes(self.model))
            ) from None
        # The size check may fail after the copy was taken (the step's ops that do not read
        # the batch are not ordered after it): restore in both cases.
        shadow.restore_if_taken(self._target)
        if oom:
            n = data_size(data)
            self.control.failed(phase, n)
            self._shrink(phase, n, n, failure, time.perf_counter() - t0)
        return self.run_batch(phase, data)

    def _run_batch(self, phase: str, data: Any, n: int) -> Any:
        self._done = 0
        while True:
            plan = self.control.plan(phase, n - self._done)
            ran, logs = self._attempt(
                phase, plan.micro_batch_size, n,
                functools.partial(self._run_plan, phase, data, plan),
                reset=lambda: reset_peak(self.device), peak=lambda: read_peak(self.device))
            if ran:
                return logs

    def _attempt(self, phase: str, micro: int, n: int, run: Callable[[], Any], *,
                 reset: Callable[[], None], peak: Callable[[], int | None]) -> tuple[bool, Any]:
        """Run one plan of a batch of ``n``; on an out-of-memory error, undo it and shrink.

        Returns ``(True, logs)`` when the plan ran, ``(False, None)`` after a failure, once
        the state is back where the failure returns to and the micro-batch is smaller (the
        caller plans the rest again). Errors other than out-of-memory propagate. When a
        measurement is due, the allocator's peak is reset before and read after.
        """
        t0 = time.perf_counter()
        failure = None
        measure = self.control.measuring(phase)
        try:
            if measure:
                reset()
            logs = run()
        except Exception as exc:
            if not is_oom_error(exc):
                raise
            failure = failure_line(exc)
        if failure is None:
            if measure:
                self.control.measured(phase, micro, peak())
            return True, logs
        # Outside the handler: the traceback holding the failed step's tensors is gone.
        self.steps.shadows[phase].restore_if_taken(self._target)
        if self._accumulating:
            self.optimizer.zero_accumulators()
        self.control.failed(phase, micro)
        self._shrink(phase, micro, n, failure, time.perf_counter() - t0)
        return False, None

    def _shrink(self, phase: str, failed: int, n: int, detail: str, seconds: float) -> None:
        self.control.shrink(phase, failed, n, detail, seconds,
                            optimizer_step=self.optimizer.updates(),
                            fixed_bytes=lambda: float(state_bytes(self.model)))

    def _call(self, fn: Callable[[Any], Any], data: Any, phase: str, *, snapshot: bool) -> Any:
        """One compiled step; with ``snapshot``, its start is the state a failure returns to."""
        shadow = self.steps.shadow(phase)
        shadow.arm(snapshot)
        if snapshot:
            self._target = shadow.count + 1
            shadow.take()
        logs = fn([data])
        if snapshot:
            shadow.count = self._target
        return logs

    def _run_plan(self, phase: str, data: Any, plan: Any) -> Any:
        """Run the examples ``data[self._done:]`` as ``plan`` says.

        Accumulating (training, ``keep_effective_batch``): one update after all micro-batches,
        so a failure anywhere returns to the batch's start. Otherwise (evaluation, or
        ``keep_effective_batch=False``) every micro-batch is final once it ran, and a failure
        resumes after the last one that ran.
        """
        shadow = self.steps.shadow(phase)
        accumulate = self.control.accumulates(phase, plan.steps)
        self._accumulating = accumulate
        if phase == "train":
            self.optimizer.use_accumulation(plan.steps if accumulate else 1)
        fn = self.steps.function(phase, self.optimizer.accumulation if phase == "train" else 1)
        if plan.steps == 1 and self._done == 0:
            return self._call(fn, data, phase, snapshot=True)
        logs = None
        start = self._done
        try:
            for i, size in enumerate(plan.sizes):
                piece = slice_batch(data, start, start + size)
                logs = self._call(fn, piece, phase, snapshot=i == 0 or not accumulate)
                start += size
                if not accumulate:
                    self._done = start
        finally:
            shadow.arm(True)
        return logs


class ReplicatedExecutor(FitExecutor):
    """:class:`FitExecutor` under a ``MirroredStrategy``: every replica shrinks together.

    In one process an out-of-memory error on any replica fails the whole step in the caller,
    so the decision is one for all replicas: the batch each replica holds is split into the
    same number of micro-batches (:meth:`FitController.plan_replicas`), and the policy
    reasons per replica. Batches always go through the host (no fast path).
    """

    def __init__(self, model: Any, control: FitController, strategy: Any,
                 logger: logging.Logger | None = None) -> None:
        super().__init__(model, control, strategy, logger)
        self.replicas = num_replicas(strategy)
        self._peak_devices = [self.device]
        if self.replicas > 1:
            gpus = [d for d in replica_devices(strategy) if "GPU:" in d.upper()]
            # Logical CPU devices share one allocator: its peak is not one replica's.
            self._peak_devices = ([f"GPU:{d.upper().rsplit('GPU:', 1)[1]}" for d in gpus]
                                  if len(gpus) == self.replicas else [])

    def fast(self, phase: str) -> bool:
        return False

    def _replica_peak(self) -> int | None:
        peaks = [read_peak(d) for d in self._peak_devices]
        known = [p for p in peaks if p is not None]
        return max(known) if known and len(known) == len(peaks) else None

    def _reset_replica_peaks(self) -> None:
        for d in self._peak_devices:
            reset_peak(d)

    def run_batch(self, phase: str, data: Any) -> Any:
        local = _split_per_replica(self.strategy, data)
        sizes = [data_size(p) for p in local]
        n = sum(sizes)
        self.control.see_batch(phase, n)
        done = [0] * self.replicas   # examples of each replica's share whose updates are final
        self._done = 0
        while True:
            plan = self.control.plan_replicas(phase, [s - d for s, d in zip(sizes, done)])
            ran, logs = self._attempt(
                phase, plan.micro, n,
                functools.partial(self._run_plan_replicated, phase, data, local, done,
                                  [list(p) for p in plan.pieces], plan.steps),
                reset=self._reset_replica_peaks, peak=self._replica_peak)
            if ran:
                return logs

    def _run_plan_replicated(self, phase: str, data: Any, local: list[Any], done: list[int],
                             pieces: list[list[int]], steps: int) -> Any:
        """Run micro-batch ``i`` of every replica together, for ``i`` in ``range(steps)``."""
        self.steps.shadow(phase)    # built (with the optimizer) before accumulation switches
        accumulate = self.control.accumulates(phase, steps)
        self._accumulating = accumulate
        if phase == "train":
            self.optimizer.use_accumulation(steps if accumulate else 1)
        if steps == 1 and not any(done):
            return self._call(self.steps.function(phase, 1), data, phase, snapshot=True)
        starts = list(done)
        logs = None
        for i in range(steps):
            role = None
            if accumulate:
                role = "final" if i == steps - 1 else "accumulate"
            fn = self.steps.function(phase, steps if accumulate else 1, role)
            batch = merge_per_replica(self.strategy, [
                slice_batch(local[r], starts[r], starts[r] + pieces[r][i])
                for r in range(self.replicas)])
            logs = self._call(fn, batch, phase, snapshot=i == 0 or not accumulate)
            starts = [s + p[i] for s, p in zip(starts, pieces)]
            if not accumulate:
                done[:] = starts
                self._done = sum(starts)
        return logs


class _StepFunction:
    """Stands in for ``model.train_function``/``test_function`` during :func:`batchfit.fit`."""

    def __init__(self, run: FitExecutor, phase: str) -> None:
        self.run = run
        self.phase = phase

    def __call__(self, iterator: Any) -> Any:
        run = self.run
        spe = max(1, int(run.model.steps_per_execution))
        if spe == 1 and isinstance(iterator, tf.data.Iterator) and run.fast(self.phase):
            logs = run.run_fast(self.phase, iterator)
            run.control.advance(self.phase)
            return logs
        logs = None
        for _ in range(spe):
            try:
                data = next(iterator)
            except (StopIteration, tf.errors.OutOfRangeError):
                if logs is None:
                    raise StopIteration from None
                break
            logs = run.run_batch(self.phase, data)
            run.control.advance(self.phase)
        return logs


class _EpochHook(keras.callbacks.Callback):
    def __init__(self, run: FitExecutor) -> None:
        super().__init__()
        self.run = run

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.run.epoch_begin(epoch)

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self.run.epoch_end(epoch)

    def on_test_begin(self, logs: Any = None) -> None:
        self.run.test_begin()

    def on_test_end(self, logs: Any = None) -> None:
        self.run.release("eval")


# --- what fit checks and prepares ------------------------------------------------------------
def check_fit_model(model: Any) -> None:
    """Refuse a model :func:`batchfit.fit` cannot train (not compiled, not TensorFlow)."""
    if getattr(model, "optimizer", None) is None or not getattr(model, "compiled", True):
        raise InvalidInputError("batchfit.fit needs a compiled model (call model.compile first)")
    if keras.backend.backend() != "tensorflow":
        raise InvalidInputError(
            f"batchfit.fit supports the TensorFlow backend, not {keras.backend.backend()!r}")


def fit_strategy(distribute: Any, model: Any) -> Any:
    """The strategy :func:`batchfit.fit` runs under (``None`` for one device), or a refusal."""
    strategy = resolve_strategy(distribute, model)
    if strategy is None:
        return None
    if is_multiworker(strategy):
        raise InvalidInputError(
            "batchfit.fit does not train under MultiWorkerMirroredStrategy (Keras 3's "
            "model.fit fails there, keras-team/keras issue 20585): train with "
            "batchfit.fit_multiworker(model, x, y, batch_size=..., strategy=..., epochs=...), "
            "batchfit's own step with the same out-of-memory recovery, on every worker")
    if not isinstance(strategy, tf.distribute.MirroredStrategy):
        raise InvalidInputError(
            f"batchfit.fit supports tf.distribute.MirroredStrategy (one host), not "
            f"{type(strategy).__name__}")
    if model_strategy(model) is not strategy:
        raise InvalidInputError(
            f"the model was not built under the {type(strategy).__name__} given as "
            "distribute=: build and compile it inside strategy.scope()")
    return strategy


def _is_arrays(x: Any) -> bool:
    """Whether ``x`` is array data (arrays, tensors, or a list/dict of them) that Keras batches.

    Other inputs (a generator, a ``PyDataset``, a torch ``DataLoader``) bring their own batches.
    """
    leaves = tf.nest.flatten(x)
    return bool(leaves) and all(
        tf.is_tensor(t) or isinstance(t, np.ndarray) or hasattr(t, "__array__") for t in leaves)


def _static_batch(ds: tf.data.Dataset) -> int | None:
    for spec in tf.nest.flatten(ds.element_spec):
        shape = getattr(spec, "shape", None)
        if shape is not None and shape.rank:
            return shape[0]
    return None


def rebatch(ds: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
    """Re-batch ``ds`` to ``batch_size``, keeping a known cardinality known.

    ``rebatch`` leaves the cardinality unknown, and Keras then miscounts steps (and shifts
    accumulation boundaries); the number of batches is restored with ``assert_cardinality``.

    Raises:
        InvalidInputError: the dataset's batches are of unknown size.

    Example:

    >>> import tensorflow as tf
    >>> ds = tf.data.Dataset.range(96).batch(12, drop_remainder=True)
    >>> int(rebatch(ds, 32).cardinality().numpy())
    3
    """
    old = _static_batch(ds)
    if old == batch_size:
        return ds
    if old is None:
        raise InvalidInputError(
            "batchfit.fit got a tf.data.Dataset with batches of unknown size and "
            f"batch_size={batch_size}: batch the dataset yourself (ds.batch({batch_size})) "
            "and pass batch_size=None, or batch it with drop_remainder=True")
    cardinality = int(ds.cardinality().numpy())
    out = ds.rebatch(batch_size)
    if cardinality >= 0:
        n = cardinality * old
        out = out.apply(tf.data.experimental.assert_cardinality(math.ceil(n / batch_size)))
    return out


def fit_inputs(x: Any, batch_size: int | None) -> tuple[Any, int | None]:
    """``(x, batch_size for model.fit)``: a dataset re-batched (``None``), arrays as given."""
    if isinstance(x, tf.data.Dataset):
        if batch_size is not None:
            x = rebatch(x, batch_size)
        return x, None
    if batch_size is None and _is_arrays(x):
        raise InvalidInputError("batchfit.fit needs batch_size= for array inputs")
    return x, batch_size


def run_fit(model: Any, x: Any, y: Any, *, control: FitController, strategy: Any,
            fit_batch: int | None, logger: logging.Logger | None,
            fit_kwargs: dict[str, Any]) -> tuple[Any, int]:
    """``model.fit`` with batchfit's step functions installed.

    Returns:
        ``(history, largest)``: Keras's ``History`` and the largest training batch the
        compiled fast path ran (which the controller never saw).
    """
    cls = FitExecutor if strategy is None else ReplicatedExecutor
    run = cls(model, control, strategy, logger)
    if isinstance(fit_kwargs.get("callbacks"), keras.callbacks.CallbackList):
        raise InvalidInputError("batchfit.fit takes callbacks as a list, not a CallbackList")
    callbacks = fit_kwargs.pop("callbacks", None) or []
    # model.fit takes one callback alone too.
    callbacks = [callbacks] if isinstance(callbacks, keras.callbacks.Callback) else list(callbacks)
    callbacks.insert(0, _EpochHook(run))
    run.install()
    try:
        history = model.fit(x, y, batch_size=fit_batch, callbacks=callbacks, **fit_kwargs)
    finally:
        run.uninstall()
    return history, run.largest_seen("train")
