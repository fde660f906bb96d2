"""The TensorFlow execution of :func:`batchfit.fit_multiworker`: batchfit's own distributed step.

The decisions (the micro-batch, the shrink agreement across workers) are the
:class:`~batchfit.core.fit_control.FitController`'s, in :mod:`batchfit.verbs.multiworker_fit`;
this module executes them: :class:`MultiWorkerSession` checks and builds the model under the
strategy, reads the data as arrays, saves and restores the state a dropped step changed, and
reads the allocator's peak; :class:`Trainer` accumulates a worker's gradients micro-batch by
micro-batch, all-reduces the out-of-memory flag and applies the update.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from ...errors import InvalidInputError
from .collective import communication_options
from .keras_compat import (
    call_has_training_arg,
    communication_options_of,
    compile_loss,
    compute_loss_fn,
    model_distribute_strategy,
    unscale_loss_for_distribution,
)

__all__ = ["MultiWorkerSession", "Trainer"]


def _nested_len(data: Any) -> int:
    first = tf.nest.flatten(data)[0]
    return int(first.shape[0])


def _cut(data: Any, start: int, stop: int) -> Any:
    return tf.nest.map_structure(lambda t: t[start:stop], data)


def _take(data: Any, index: np.ndarray) -> Any:
    return tf.nest.map_structure(lambda t: np.asarray(t)[index], data)


def _arrays_from(x: Any, y: Any, sample_weight: Any) -> tuple[Any, Any, Any]:
    """NumPy arrays (nested as given) from ``x, y`` or a finite dataset of batches."""
    if isinstance(x, tf.data.Dataset):
        if y is not None:
            raise InvalidInputError("with a tf.data.Dataset, pass y inside it, not as y=")
        if int(x.cardinality().numpy()) < 0:
            raise InvalidInputError(
                "the dataset is infinite or of unknown size: fit_multiworker reads it whole "
                "(every worker the same data, each training on its share of every global "
                "batch); pass a finite dataset or arrays")
        parts: list[Any] = list(x.as_numpy_iterator())
        if not parts:
            raise InvalidInputError("the dataset is empty")
        joined = tf.nest.map_structure(lambda *t: np.concatenate(t, axis=0), *parts)
        if not isinstance(joined, tuple) or len(joined) not in (2, 3):
            raise InvalidInputError("dataset elements must be batches of (x, y) or "
                                    "(x, y, sample_weight)")
        return joined[0], joined[1], joined[2] if len(joined) == 3 else None
    if x is None or y is None:
        raise InvalidInputError("pass x and y (arrays), or a finite tf.data.Dataset as x")
    sw = None if sample_weight is None else np.asarray(sample_weight)
    return tf.nest.map_structure(np.asarray, x), tf.nest.map_structure(np.asarray, y), sw


class Trainer:
    """batchfit's own distributed step: local accumulation, a collective OOM decision, apply.

    The accumulators are on-read-synchronized variables (one local copy per replica, updated
    without any collective), so the step functions take no per-replica arguments but the
    micro-batch: applying gradients passed into a ``tf.function`` as ``PerReplica`` values
    failed under this strategy ("destinations can not be empty"), reading them from such
    variables works.
    """

    def __init__(self, model: Any, strategy: tf.distribute.Strategy, global_batch: int,
                 timeout: float | None) -> None:
        self.model, self.strategy = model, strategy
        self.global_batch = global_batch
        self.options = communication_options(timeout)
        self.variables = list(model.trainable_variables)
        on_read: dict[str, Any] = {"trainable": False,
                                   "synchronization": tf.VariableSynchronization.ON_READ,
                                   "aggregation": tf.VariableAggregation.SUM}
        with strategy.scope():
            self.acc = [tf.Variable(tf.zeros(tuple(v.shape), v.dtype), name="batchfit_acc",
                                    **on_read) for v in self.variables]
            self.loss_acc = tf.Variable(0.0, dtype=tf.float32, name="batchfit_loss", **on_read)
        self._grad = self._make_grad_fn()
        self._apply = self._make_apply_fn()
        self._flag = self._make_flag_fn()
        self._zero = self._make_zero_fn()

    def _make_grad_fn(self) -> Callable[..., Any]:
        model, opt = self.model, self.model.optimizer
        call_has_training = call_has_training_arg(model)
        compute_loss = compute_loss_fn(model)
        variables, acc, loss_acc = self.variables, self.acc, self.loss_acc
        global_batch = float(self.global_batch)

        def replica(x: Any, y: Any, sw: Any) -> None:
            with tf.GradientTape() as tape:
                y_pred = model(x, training=True) if call_has_training else model(x)
                # compute_loss divides by the replicas under a strategy (Keras's own step
                # relies on the optimizer's SUM all-reduce): undo that, then weigh this
                # micro-batch by its share of the global batch.
                loss = unscale_loss_for_distribution(compute_loss(
                    x=x, y=y, y_pred=y_pred, sample_weight=sw, training=True))
                n = tf.cast(tf.shape(tf.nest.flatten(x)[0])[0], loss.dtype)
                share = loss * n / tf.cast(global_batch, loss.dtype)
                scaled = opt.scale_loss(share)
            grads = tape.gradient(scaled, variables)
            for a, g in zip(acc, grads):
                if g is not None:
                    a.assign_add(tf.cast(g, a.dtype))
            loss_acc.assign_add(tf.cast(share, tf.float32))

        @tf.function(reduce_retracing=True)
        def grad(x: Any, y: Any, sw: Any) -> None:
            self.strategy.run(replica, args=(x, y, sw))

        return grad

    def _make_apply_fn(self) -> Callable[..., Any]:
        opt, variables, acc = self.model.optimizer, self.variables, self.acc

        def replica() -> None:
            opt.apply_gradients(zip([a.read_value() for a in acc], variables))

        @tf.function
        def apply() -> None:
            self.strategy.run(replica)

        return apply

    def _make_flag_fn(self) -> Callable[..., Any]:
        options, loss_acc = self.options, self.loss_acc

        def replica(flag: Any) -> Any:
            ctx = tf.distribute.get_replica_context()
            return ctx.all_reduce(tf.distribute.ReduceOp.SUM,
                                  tf.stack([flag, loss_acc.read_value()]), options=options)

        @tf.function
        def flag_fn(flag: Any) -> Any:
            return self.strategy.run(replica, args=(flag,))

        return flag_fn

    def _make_zero_fn(self) -> Callable[..., Any]:
        acc, loss_acc = self.acc, self.loss_acc

        def replica() -> None:
            for a in acc:
                a.assign(tf.zeros_like(a))
            loss_acc.assign(0.0)

        @tf.function
        def zero() -> None:
            self.strategy.run(replica)

        return zero

    def distribute(self, data: Any, start: int, per_replica: int, offset: int, size: int
                   ) -> Any:
        """Each replica's micro-batch: rows ``[offset, offset+size)`` of its share."""
        if data is None:
            return None

        def value(ctx: Any) -> Any:
            lo = start + ctx.replica_id_in_sync_group * per_replica + offset
            return tf.nest.map_structure(tf.convert_to_tensor, _cut(data, lo, lo + size))

        return self.strategy.experimental_distribute_values_from_function(value)

    def gradients(self, x: Any, y: Any, sw: Any, start: int, per_replica: int,
                  sizes: tuple[int, ...]) -> None:
        """Accumulate this worker's share of one global batch, micro-batch by micro-batch."""
        self._zero()
        offset = 0
        for size in sizes:
            self._grad(*[self.distribute(d, start, per_replica, offset, size)
                         for d in (x, y, sw)])
            offset += size

    def decide(self, oom: bool) -> tuple[bool, float]:
        """All-reduce ``[oom flag, loss]``: (whether any worker ran out of memory, step loss)."""
        out = self._flag(tf.constant(1.0 if oom else 0.0, tf.float32))
        total = self.strategy.experimental_local_results(out)[0].numpy()
        return bool(total[0] > 0.5), float(total[1])

    def apply(self) -> None:
        self._apply()

    def release(self) -> None:
        self._zero()


def _memory_device() -> str:
    return "GPU:0" if tf.config.list_logical_devices("GPU") else "CPU:0"


class MultiWorkerSession:
    """One worker's side of :func:`batchfit.fit_multiworker`, everything that touches TensorFlow.

    Args:
        model: a compiled ``keras.Model`` built under ``strategy.scope()``, or a zero-argument
            function returning one (called under the scope).
        strategy: the ``tf.distribute`` strategy.
        timeout: seconds each collective batchfit issues may wait (``None``: no limit).

    Raises:
        InvalidInputError: the model is not compiled, not built under this strategy, or its
            optimizer already accumulates gradients.
    """

    def __init__(self, model: Any, strategy: Any, timeout: float | None) -> None:
        self.strategy = strategy
        self.timeout = timeout
        self.replicas = int(strategy.num_replicas_in_sync)
        self.model = self._resolve(model)
        self.device = _memory_device()
        self._non_trainable: list[Any] = []

    def _resolve(self, model: Any) -> Any:
        strategy = self.strategy
        if not (hasattr(model, "train_on_batch") and hasattr(model, "variables")):
            if not callable(model):
                raise InvalidInputError("model must be a compiled keras.Model or a function "
                                        "returning one")
            with strategy.scope():
                model = model()
        if (getattr(model, "optimizer", None) is None
                or compile_loss(model) is None):
            raise InvalidInputError("the model must be compiled (an optimizer and a loss), "
                                    "under strategy.scope()")
        owner = model_distribute_strategy(model)
        if owner is not strategy and self.replicas > 1:
            raise InvalidInputError("build and compile the model under this strategy's scope "
                                    "(`with strategy.scope(): model = build_model()`)")
        if getattr(model.optimizer, "gradient_accumulation_steps", None):
            raise InvalidInputError("the optimizer already has gradient_accumulation_steps; "
                                    "fit_multiworker accumulates by itself: leave it unset")
        return model

    # --- data -------------------------------------------------------------------------------
    @staticmethod
    def arrays(x: Any, y: Any, sample_weight: Any) -> tuple[Any, Any, Any]:
        """NumPy arrays (nested as given) from ``x, y`` or a finite dataset of batches."""
        return _arrays_from(x, y, sample_weight)

    @staticmethod
    def num_examples(xs: Any) -> int:
        """The examples in ``xs`` (the first dimension of its first array)."""
        return _nested_len(xs)

    @staticmethod
    def reorder(xs: Any, ys: Any, ws: Any, order: np.ndarray | None) -> tuple[Any, Any, Any]:
        """The epoch's arrays in ``order`` (as they are for ``None``)."""
        if order is None:
            return xs, ys, ws
        return (_take(xs, order), _take(ys, order),
                None if ws is None else np.asarray(ws)[order])

    # --- the model and its state -------------------------------------------------------------
    def collective_timeout(self) -> float | None:
        """The timeout the strategy's own collectives were created with (``None``: none)."""
        return getattr(communication_options_of(self.strategy), "timeout_seconds", None)

    def build(self, xs: Any) -> None:
        """Build the model and its optimizer under the strategy (on one example of ``xs``)."""
        model, strategy = self.model, self.strategy
        if not model.built:
            with strategy.scope():
                model(tf.nest.map_structure(lambda t: t[:1], xs))
        if not model.optimizer.built:
            with strategy.scope():
                model.optimizer.build(model.trainable_variables)
        self._non_trainable = list(model.non_trainable_variables)

    def iterations(self) -> int:
        """The optimizer's update count."""
        return int(self.model.optimizer.iterations.numpy())

    def save_state(self) -> list[Any]:
        """The non-trainable state a step's forward passes change (BatchNorm statistics...)."""
        return [v.numpy() for v in self._non_trainable]

    def restore_state(self, saved: list[Any]) -> None:
        """Put back what :meth:`save_state` returned (after a dropped step)."""
        for v, value in zip(self._non_trainable, saved):
            v.assign(value)

    def trainer(self, global_batch: int) -> Trainer:
        """batchfit's own step at ``global_batch`` examples per update."""
        return Trainer(self.model, self.strategy, global_batch, self.timeout)

    # --- the allocator's peak ---------------------------------------------------------------
    def reset_peak(self) -> None:
        with contextlib.suppress(Exception):  # an allocator without statistics
            tf.config.experimental.reset_memory_stats(self.device)

    def read_peak(self) -> float | None:
        try:
            return float(tf.config.experimental.get_memory_info(self.device)["peak"])
        except Exception:  # noqa: BLE001 - allocator without statistics
            return None
