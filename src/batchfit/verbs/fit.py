"""``batchfit.fit``: ``model.fit`` that shrinks its micro-batch on out-of-memory and goes on.

Orchestration only: the decisions are a :class:`~batchfit.core.fit_control.FitController`'s,
the execution is the backend's (:meth:`batchfit.backend.Backend.run_fit`; for TensorFlow
:mod:`batchfit.backend.tensorflow.fitting`).

How it works (Keras 3, TensorFlow backend):

* Keras's own ``fit`` loop runs unchanged (callbacks, ``History``, progress bar, early
  stopping, checkpoints, learning-rate schedules). Only ``model.train_function`` and
  ``model.test_function`` are replaced, for the duration of the call, by Python callables that
  take one batch out of Keras's iterator and run Keras's own compiled step on it (built with
  ``model._make_function`` around ``model.train_step``, so a custom ``train_step`` works).
* While a batch runs whole (no micro-batch set, or one no smaller than every batch seen), it
  is read inside a compiled function, as Keras's own function reads it (reading it eagerly in
  Python cost ~0.3 ms a step, 2.6% of an 11.6 ms step, measured). That function first keeps a
  reference to the batch in host-side replay variables (an assignment shares the tensor's
  buffer: no copy, no allocation) and checks its size; every op of the step that reads the
  batch waits for both. A step that then fails hands its batch back, which takes the path
  below. A batch larger than the micro-batch fails the check before it runs and is split.
  The reference is dropped outside that path (between epochs, in evaluation, after a
  shrink), so no extra batch stays in memory while smaller steps run. Otherwise (the first
  batch, after an out-of-memory error, under a strategy) the callable takes the batch out of
  the iterator in Python.
* A step that runs out of memory is replayed: the state from before it is restored, the batch
  is split into ``k`` micro-batches, and the optimizer accumulates their gradients
  (``gradient_accumulation_steps = k``) into one update. Keras sees one step per batch, so
  step counts, callbacks and ``optimizer.iterations`` are those of the run asked for.
* Restoring is cheap because a failed step writes little. Measured under a capped allocator:
  after an out-of-memory error in a compiled step the weights and optimizer slots were
  untouched, but ``optimizer.iterations`` and the loss metric had already been incremented
  (their updates do not depend on the gradients, so the graph ran them early). So:
  - every weight and optimizer-slot update is made to wait for *all* gradients (a control
    dependency added around ``optimizer.apply``): nothing of the model changes unless the
    whole backward pass succeeded;
  - the small state a step writes before that (metric totals, the iteration counter,
    non-trainable model state such as BatchNorm statistics and seed-generator state) is copied
    on the device into shadow variables at the start of each step, inside the same graph, and
    assigned back after a failure; gradient accumulators are zeroed (they are zero at the start
    of every batch).
  Not covered: an out-of-memory error *inside* the optimizer's update, after some variables
  were updated (its memory does not depend on the batch size, so a smaller batch could not
  help anyway); non-trainable variables over
  :data:`batchfit.backend.tensorflow.fit_state.SHADOW_LIMIT_BYTES` (frozen weights,
  which a step does not write) are not shadowed.
* Learning-rate schedules: with ``gradient_accumulation_steps = k`` Keras evaluates a schedule
  at its raw counter, which advances ``k`` times per update; during :func:`fit` the optimizer
  evaluates it at the update count instead (patched on the instance, not in its config).
* Between epochs and after :func:`fit` the optimizer is the user's own again (no
  accumulation; the accumulators are untracked), so epoch-end checkpoints are unchanged.
"""

from __future__ import annotations

import logging
from typing import Any

from ..backend import get_backend
from ..core.fit_control import FitController
from ..core.shrink import MemoryModelShrink, ShrinkPolicy
from ..core.validate import check_int
from ..errors import InvalidInputError

__all__ = ["fit"]

LOGGER = logging.getLogger("batchfit")


def fit(model: Any, x: Any = None, y: Any = None, *, batch_size: int | None = None,
        shrink_policy: ShrinkPolicy | None = None, keep_effective_batch: bool = True,
        grow_after_epochs: int | None = None, micro_batch_size: int | None = None,
        validation_micro_batch_size: int | None = None,
        logger: logging.Logger | None = None, distribute: Any = None,
        **fit_kwargs: Any) -> Any:
    """Train like ``model.fit``, shrinking the micro-batch instead of dying of out-of-memory.

    A drop-in for ``model.fit``: same arguments (passed through), same loop, same callbacks,
    and the same return value, a ``keras.callbacks.History``. When a training step runs out of
    memory, the state from before the step is restored (weights, optimizer variables and
    iteration count, metrics), the micro-batch shrinks as ``shrink_policy`` says, and the
    failed batch is replayed as several micro-batches whose gradients the optimizer
    accumulates into one update, so the updates are those of the batch size asked for.
    Training then carries on in the same epoch. Under ``tf.distribute.MirroredStrategy`` (the
    model built under ``strategy.scope()``) ``batch_size`` is the global batch; an
    out-of-memory error on any replica shrinks the micro-batch of every replica together,
    and the global batch is kept by accumulation. An out-of-memory error during evaluation
    (``validation_data``) shrinks the evaluation micro-batch only. Every adjustment is logged
    (logger ``"batchfit"``, level WARNING) and listed in ``history.adjustments``.

    On JAX the loop is batchfit's own, without donated buffers (``docs/jax.md``): arrays, a
    ``keras.utils.PyDataset`` or a generator of batches; under a
    ``keras.distribution.DataParallel`` the global batch is sharded over the devices.

    Args:
        model: a compiled ``keras.Model``, optimizer without ``gradient_accumulation_steps``
            (batchfit manages it).
        x, y: the training data, as for ``model.fit`` (arrays, tensors, ``tf.data.Dataset``;
            on JAX arrays, a ``PyDataset`` or a generator of ``(x, y)`` batches).
        batch_size: the (effective) batch size. Required for arrays; for a dataset ``None``
            uses its own batches, a different size re-batches it (keeping its cardinality).
        shrink_policy: an object with ``next_size(failed, observations)`` (see
            :mod:`batchfit.core.shrink`). Default: :class:`batchfit.MemoryModelShrink`, the
            largest size the memory model fitted to the peaks seen says fits, else halving.
        keep_effective_batch: default True: accumulate the micro-batches' gradients into one
            update per batch. False: each micro-batch updates the weights (a smaller effective
            batch; a warning says so).
        grow_after_epochs: ``None`` (default) never grows back; ``N`` doubles the micro-batch
            (up to ``batch_size``) after ``N`` epochs without an out-of-memory error.
        micro_batch_size: start with this training micro-batch (default: ``batch_size``).
        validation_micro_batch_size: start with this evaluation micro-batch (default: the
            evaluation batch).
        logger: where adjustments are logged (default ``logging.getLogger("batchfit")``).
        distribute: ``None`` (default: the strategy the model was built under, if any), a
            ``tf.distribute.MirroredStrategy`` or ``"mirrored"`` (the model must have been
            built under that strategy's scope); on JAX ``"data_parallel"`` or a
            ``keras.distribution.DataParallel``. Multi-worker training goes through
            :func:`batchfit.fit_multiworker`.
        **fit_kwargs: everything else ``model.fit`` takes (``epochs``, ``callbacks``,
            ``validation_data``, ``shuffle``, ...).

    Returns:
        The ``History`` of ``model.fit``, with ``adjustments`` (a list of
        :class:`batchfit.BatchAdjustment`), ``micro_batch_size`` and ``accumulation_steps``
        (the last training plan; sizes global) added, and under a strategy ``replicas``,
        ``per_replica_batch_size`` and ``per_replica_micro_batch_size`` (each replica's
        share; with one device they equal the global sizes).

    Raises:
        TrainingOutOfMemoryError: when even a micro-batch of one example does not fit; the
            message states the model's fixed memory.
        InvalidInputError: for an unsupported setup (a strategy other than MirroredStrategy,
            an optimizer that already accumulates gradients, a bad option).

    Any other error from training propagates unchanged.

    Example:

    >>> import keras, numpy as np, batchfit
    >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    >>> m.compile("sgd", "mse")
    >>> h = batchfit.fit(m, np.ones((8, 4)), np.ones((8, 1)), batch_size=4, epochs=2,
    ...                  verbose=0)
    >>> len(h.history["loss"]), h.adjustments
    (2, [])

    Under a strategy (``batch_size`` is global: 64 is 32 per replica on 2 devices):

    >>> strategy = tf.distribute.MirroredStrategy()       # doctest: +SKIP
    >>> with strategy.scope():                            # doctest: +SKIP
    ...     model = build_and_compile()
    >>> h = batchfit.fit(model, x, y, batch_size=64)      # doctest: +SKIP
    """
    backend = get_backend()
    backend.check_fit_model(model)
    # Taken as Python ints (a NumPy integer is accepted), so History reports plain ints.
    batch_size, micro_batch_size, validation_micro_batch_size, grow_after_epochs = (
        check_int(name, value, minimum=1, optional=True) for name, value in (
            ("batch_size", batch_size), ("micro_batch_size", micro_batch_size),
            ("validation_micro_batch_size", validation_micro_batch_size),
            ("grow_after_epochs", grow_after_epochs)))
    strategy = backend.fit_strategy(distribute, model)
    policy = shrink_policy if shrink_policy is not None else MemoryModelShrink()
    if not callable(getattr(policy, "next_size", None)):
        raise InvalidInputError(
            f"shrink_policy needs a next_size(failed, observations) method, got {policy!r}")
    x, fit_batch = backend.fit_inputs(x, batch_size)
    if micro_batch_size is not None and batch_size is not None:
        micro_batch_size = min(micro_batch_size, batch_size)
    control = FitController(
        policy, batch_size=batch_size, keep_effective_batch=keep_effective_batch,
        grow_after_epochs=grow_after_epochs, micro_batch_size=micro_batch_size,
        eval_micro_batch_size=validation_micro_batch_size,
        replicas=backend.num_replicas(strategy), distributed=strategy is not None,
        logger=logger or LOGGER)
    history, largest = backend.run_fit(model, x, y, control=control, strategy=strategy,
                                       fit_batch=fit_batch, logger=logger or LOGGER,
                                       fit_kwargs=fit_kwargs)
    summary = control.summary(largest)
    history.adjustments = list(control.adjustments)
    history.micro_batch_size = summary.micro_batch_size
    history.accumulation_steps = summary.accumulation_steps
    history.replicas = summary.replicas
    history.per_replica_batch_size = summary.per_replica_batch_size
    history.per_replica_micro_batch_size = summary.per_replica_micro_batch_size
    return history
