"""Per-example gradient norms on TensorFlow: what ``estimate_noise_scale`` and the monitor measure.

The estimator's maths is in :mod:`batchfit.core.noise` and the verb's orchestration in
:mod:`batchfit.verbs.noise`; this module computes the squared gradient norms they need. One
*pair* draws ``big`` examples at random (with replacement), splits them into ``k = big /
small`` micro-batches and computes the gradient of the model's compiled loss
(``model.compute_loss``, regularization included) on each, in training mode: the mean of the
``k`` squared micro-batch norms estimates ``E|G_small|^2``, the squared norm of their mean is
``|G_big|^2``. Nothing is updated: every variable a training-mode pass may change is assigned
back.

:class:`NoiseScaleMonitor` (public as ``batchfit.NoiseScaleMonitor``) is a Keras callback that
records such pairs while a model trains.

Example:

>>> import numpy as np
>>> s = ExampleSampler((np.arange(10.0)[:, None], np.arange(10.0)))
>>> s.draw(4)[0].shape
(4, 1)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from ...core.noise import MAX_EXAMPLES, check_pair_sizes
from ...errors import InvalidInputError

# Framework-free: shared with the JAX backend; re-exported here for existing imports.
from ..keras_common.noise_monitor import MonitorBase
from ..keras_common.sampler import ExampleSampler
from .keras_compat import call_has_training_arg, compute_loss_fn, sublayers
from .probe import ModelState, metric_variable_groups, unique_variables


def _state_variables(model: Any) -> list[Any]:
    """Variables a training-mode forward pass may change: non-trainable ones and metrics."""
    return unique_variables(model.non_trainable_variables, *metric_variable_groups(model))


class GradientNormMeter:
    """Computes pairs of squared gradient norms (small, big) on one model, updating nothing.

    Args:
        model: a compiled ``keras.Model``.
        small: examples per micro-batch (the small batch).
        big: examples per pair (the big batch); a multiple of ``small``.

    Raises:
        InvalidInputError: bad sizes, or a model without trainable weights.
    """

    def __init__(self, model: Any, small: int, big: int) -> None:
        check_pair_sizes(small, big)
        self.model = model
        self.small = int(small)
        self.big = int(big)
        self.micro = self.big // self.small
        self._variables = list(model.trainable_variables)
        if not self._variables:
            raise InvalidInputError("The model has no trainable weights: it has no gradient.")
        self._fn = self._build()

    def _build(self) -> Callable[..., Any]:
        model, variables = self.model, self._variables
        has_training = call_has_training_arg(model)
        compute = compute_loss_fn(model)

        @tf.function(reduce_retracing=True)
        def flat_gradient(x: Any, y: Any) -> tuple[Any, Any]:
            with tf.GradientTape() as tape:
                y_pred = model(x, training=True) if has_training else model(x)
                loss = compute(x=x, y=y, y_pred=y_pred, sample_weight=None, training=True)
            grads = tape.gradient(loss, variables)
            parts = [tf.reshape(tf.cast(tf.convert_to_tensor(g), tf.float64), [-1])
                     for g in grads if g is not None]
            if not parts:
                raise ValueError("no gradient")
            flat = tf.concat(parts, axis=0)
            return flat, tf.cast(loss, tf.float64)

        return flat_gradient

    def pair(self, sampler: ExampleSampler) -> tuple[float, float]:
        """One pair: ``(mean |G_small|^2 over the micro-batches, |G_big|^2)``."""
        total = None
        small_sq = 0.0
        for _ in range(self.micro):
            x, y = sampler.draw(self.small)
            try:
                flat, _loss = self._fn(x, y)
            except ValueError as exc:
                if "no gradient" in str(exc):
                    raise InvalidInputError(
                        "The loss does not depend on any trainable weight (every gradient is "
                        "None): check the model's loss and outputs.") from None
                raise
            small_sq += float(tf.reduce_sum(tf.square(flat)))
            total = flat if total is None else total + flat
        mean = total / self.micro
        return small_sq / self.micro, float(tf.reduce_sum(tf.square(mean)))

    def pairs(self, sampler: ExampleSampler, count: int) -> tuple[np.ndarray, np.ndarray]:
        """``count`` pairs: arrays of small and big squared norms."""
        small, big = [], []
        for _ in range(count):
            s, b = self.pair(sampler)
            small.append(s)
            big.append(b)
        return np.array(small), np.array(big)


def gradient_norm_pairs(model: Any, sampler: ExampleSampler, *, small: int, big: int,
                        count: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` pairs of squared gradient norms, every variable of ``model`` restored after."""
    state = ModelState(model)
    try:
        return GradientNormMeter(model, small, big).pairs(sampler, count)
    finally:
        state.restore()


def mixes_examples(model: Any) -> bool:
    """Whether ``model`` has a layer that mixes a batch's examples (BatchNorm in training)."""
    try:
        layers = sublayers(model)
    except Exception:  # noqa: BLE001 - a private API; the note is optional
        return False
    if layers is None:
        return False
    return any(isinstance(layer, keras.layers.BatchNormalization) for layer in layers)


def _write_scalar(name: str, value: float, step: int) -> None:
    """A TensorBoard scalar through TensorFlow's own summary op.

    ``tf.summary.scalar`` lives in the ``tensorboard`` package, which ``tensorflow-cpu`` does
    not install; ``tf.summary.write`` with the scalars plugin's metadata writes the same event.
    """
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
    tf.summary.write(name, tf.constant(float(value), tf.float32), step=int(step),
                     metadata=metadata)


class NoiseScaleMonitor(MonitorBase, keras.callbacks.Callback):
    """Callback that tracks the gradient noise scale while a model trains.

    Keras callbacks never see the training batch, so every ``every`` training steps the
    monitor draws ``big`` examples from ``data`` (the training data, or a sample of it),
    computes the gradients of the model's loss on ``big / small`` micro-batches at the current
    weights, and records one pair of squared norms (see :func:`batchfit.estimate_noise_scale`). Nothing
    is updated: BatchNorm statistics, seed states and metrics touched by the extra forward pass
    are assigned back. The estimate pools the last ``window`` pairs (ratio of averages, across
    epoch boundaries); at the end of each epoch it is written into ``logs``, and so into
    ``History``:

    - ``noise_scale``: ``B_simple``, ``inf`` when the ``|G|^2`` estimate is not positive;
    - ``noise_scale_low`` / ``noise_scale_high``: bootstrap interval over the window's pairs
      (NaN with fewer than 2 pairs);
    - ``grad_sq_norm`` / ``grad_trace``: the ``|G|^2`` and ``tr(Sigma)`` estimates.

    With ``log_dir`` it also writes them to TensorBoard (per epoch, and the running estimate
    per measured step under ``noise_scale_step``).

    Cost: each measurement is ``pairs_per_measurement * big`` examples of forward and backward
    pass without an optimizer update, about ``pairs_per_measurement * big / batch_size``
    training steps every ``every`` steps: with the defaults (``big=128``, one pair every 50
    steps) and a batch of 32, about 8% more compute, plus a copy of the non-trainable
    variables per measurement. The window's pairs set the precision: a window of ``n`` pairs
    gives an interval of roughly +-``2/sqrt(n)`` of the estimate or worse, and it lags
    training by about ``window * every`` steps.

    Args:
        data: the examples to draw from: ``(x, y)`` arrays, a ``tf.data.Dataset``, a
            ``keras.utils.PyDataset``. Required: the monitor does not see the batches ``fit``
            trains on.
        small: micro-batch size (default 16).
        big: examples per pair, a multiple of ``small`` (default 128).
        every: measure every this many training steps (default 50); also once at the end of
            any epoch that had no measurement.
        pairs_per_measurement: pairs per measurement (default 1).
        window: how many of the most recent pairs the estimate pools (default 16).
        log_dir: write TensorBoard scalars there (default: no TensorBoard).
        seed: seed of the example draws.
        max_examples: how many examples of ``data`` to keep at most.

    Attributes:
        records: one dict per epoch: the epoch, the steps seen, the pairs pooled, the values
            logged.

    Example:

    >>> import keras, numpy as np
    >>> import batchfit
    >>> x = np.random.default_rng(0).normal(size=(256, 4)); y = x.sum(1, keepdims=True)
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    >>> model.compile("sgd", "mse")
    >>> monitor = batchfit.NoiseScaleMonitor((x, y), small=8, big=32, every=4)
    >>> history = model.fit(x, y, batch_size=32, epochs=2, callbacks=[monitor], verbose=0)
    >>> len(history.history["noise_scale"])
    2
    """

    def __init__(self, data: Any, *, small: int = 16, big: int = 128, every: int = 50,
                 pairs_per_measurement: int = 1, window: int = 16,
                 log_dir: str | None = None, seed: int = 0,
                 max_examples: int = MAX_EXAMPLES) -> None:
        super().__init__(data, small=small, big=big, every=every,
                         pairs_per_measurement=pairs_per_measurement, window=window,
                         log_dir=log_dir, seed=seed, max_examples=max_examples)
        self._meter: GradientNormMeter | None = None
        self._writer: Any = None

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._meter = GradientNormMeter(self.model, self.small, self.big)
        if self.log_dir is not None and self._writer is None:
            self._writer = tf.summary.create_file_writer(str(self.log_dir))

    def _pairs(self) -> tuple[np.ndarray, np.ndarray]:
        if self._meter is None:
            self._meter = GradientNormMeter(self.model, self.small, self.big)
        saved = [(v, np.array(v.numpy(), copy=True)) for v in _state_variables(self.model)]
        try:
            return self._meter.pairs(self.sampler, self.pairs_per_measurement)
        finally:
            for v, value in saved:
                v.assign(value)

    def _write(self, values: dict[str, float], step: int, *, per_step: bool) -> None:
        if self._writer is None:
            return
        with self._writer.as_default():
            for key, value in values.items():
                if math.isfinite(value):
                    _write_scalar(key, value, step)
        if not per_step:
            self._writer.flush()

    def _close(self) -> None:
        if self._writer is not None:  # closed (its event file released); the next fit reopens
            self._writer.close()
            self._writer = None


__all__ = ["ExampleSampler", "GradientNormMeter", "NoiseScaleMonitor", "gradient_norm_pairs",
           "mixes_examples"]
