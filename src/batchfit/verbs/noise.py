"""Measure the gradient noise scale of a Keras model on the user's data, without training it.

How (the estimator's maths is in :mod:`batchfit.core.noise`): one *pair* draws ``big`` examples
at random (with replacement, i.i.d. from the user's examples, as the formula assumes), splits
them into ``k = big / small`` micro-batches of ``small`` examples and computes the gradient of
the model's own compiled loss (``model.compute_loss``, regularization losses included) on
each, in training mode. The mean of the ``k`` squared micro-batch norms estimates
``E|G_small|^2``; the squared norm of the micro-batch gradients' mean is ``|G_big|^2``, the
gradient of the whole big batch for a loss that averages over examples (Keras' default
``"sum_over_batch_size"`` reduction). So a pair costs one forward and backward pass over
``big`` examples, with the memory of ``small`` examples, and no optimizer update.

The model is left exactly as it was: training-mode calls update BatchNorm statistics and
random-seed states, so every variable is snapshot before and assigned back after
(:class:`batchfit.backend.tensorflow.probe.ModelState`).

Caveats: layers that mix examples (BatchNorm in training) make a micro-batch's gradient depend
on its batch mates, which the formula ignores; a loss that sums instead of averaging scales
the gradients with the batch and breaks the big-batch identity; the noise scale of the raw
gradient is the one McCandlish et al. call ``B_simple`` (no Hessian or optimizer
preconditioning), and it grows as training progresses, so a value measured at initialization
is a lower bound for later training.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from ..backend import get_backend
from ..backend.tensorflow.data import DataSample, flatten_structure, pack_structure
from ..backend.tensorflow.loader import check_model, load_data, load_model
from ..backend.tensorflow.probe import ModelState, metric_variable_groups, unique_variables
from ..core.noise import (
    NEEDS_REAL_DATA,
    estimate_from_pairs,
    noise_scale_of_means,
    pair_estimates,
)
from ..errors import InvalidInputError
from ..results import NoisePair, NoiseScaleResult

#: Examples materialized from the user's data at most.
MAX_EXAMPLES = 50_000

class ExampleSampler:
    """Draws random batches from the user's examples (materialized as NumPy arrays).

    Args:
        data: ``(x, y)`` arrays (or lists/dicts of them), a ``tf.data.Dataset``, a
            ``keras.utils.PyDataset``, a :class:`batchfit.backend.tensorflow.data.DataSample`, or a data spec
            string ``path/file.py:function``.
        max_examples: how many examples to read at most.
        seed: seed of the random draws.

    Raises:
        InvalidInputError: no data, variable-shape examples, or fewer than 2 examples.

    Example:

    >>> import numpy as np
    >>> s = ExampleSampler((np.arange(10.0)[:, None], np.arange(10.0)))
    >>> x, y = s.draw(4)
    >>> x.shape, s.num_examples
    ((4, 1), 10)
    """

    def __init__(self, data: Any, *, max_examples: int = MAX_EXAMPLES, seed: int = 0) -> None:
        if data is None:
            raise InvalidInputError(NEEDS_REAL_DATA)
        if isinstance(data, str):
            data = load_data(data)
        sample = DataSample.from_data(data, max_examples=max_examples)
        if any("different shapes" in note for note in sample.notes):
            raise InvalidInputError(
                "The examples have different shapes (variable-length data); the noise scale "
                "needs every example, so pad them to one length (keras.utils.pad_sequences or "
                "tf.data padded_batch) before measuring.")
        if sample.num_examples < 2:
            raise InvalidInputError(
                f"The data has {sample.num_examples} example; the noise scale needs many "
                "(thousands ideally).")
        x, y = sample.batch(sample.num_examples)
        self._x_leaves, self._x_template = flatten_structure(x)
        if y is None:
            self._y_leaves, self._y_template = [], None
        else:
            self._y_leaves, self._y_template = flatten_structure(y)
        self.num_examples = sample.num_examples
        self.notes = list(sample.notes)
        self._rng = np.random.default_rng(seed)

    def draw(self, size: int) -> tuple[Any, Any]:
        """``(x, y)`` with ``size`` examples drawn uniformly with replacement."""
        idx = self._rng.integers(0, self.num_examples, size=size)
        x = pack_structure(self._x_template, [a[idx] for a in self._x_leaves])
        y = None if self._y_template is None else pack_structure(
            self._y_template, [a[idx] for a in self._y_leaves])
        return x, y


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
        check_sizes(small, big)
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
        has_training = getattr(model, "_call_has_training_arg", True)
        compute = getattr(model, "_compute_loss", None) or model.compute_loss

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


def check_sizes(small: int, big: int) -> None:
    """Refuse batch sizes the two-batch estimator cannot use, saying which would work."""
    for name, v in (("small", small), ("big", big)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise InvalidInputError(f"{name} must be a positive integer, got {v!r}")
    if big <= small or big % small:
        k = max(2, -(-big // small))
        raise InvalidInputError(
            f"big must be a multiple of small and larger (the big batch is {k} micro-batches "
            f"of small); got small={small}, big={big}: try big={k * small}")


def estimate_noise_scale(model: Any, data: Any, *, small: int = 32, big: int = 256,
                         steps: int = 32, confidence: float = 0.95, seed: int = 0,
                         max_examples: int = MAX_EXAMPLES) -> NoiseScaleResult:
    """Measure the gradient noise scale ``B_simple`` of a model on your data.

    Computes gradients of the model's compiled loss on random batches of your examples at two
    batch sizes and estimates ``B_simple = tr(Sigma) / |G|^2`` (McCandlish et al. 2018), the
    batch size above which larger batches stop paying for themselves (about the critical
    batch). The model's weights, optimizer and every other variable are left unchanged.

    Cost: ``steps`` forward and backward passes over ``big`` examples (``steps * big``
    examples), with the memory of ``small`` examples and no optimizer update.

    Args:
        model: a compiled ``keras.Model``, or a model spec (``path/file.py:factory``).
        data: your real data: ``(x, y)`` arrays, a ``tf.data.Dataset``, a
            ``keras.utils.PyDataset``, or a data spec (``path/file.py:function``). Required:
            synthetic data says nothing about your task's noise scale.
        small: the small batch size, one micro-batch (default 32).
        big: the big batch size, a multiple of ``small`` (default 256).
        steps: how many pairs to measure (default 32); the interval narrows as
            ``1/sqrt(steps)``.
        confidence: coverage of the bootstrap interval (default 0.95).
        seed: seed of the example draws and the bootstrap.
        max_examples: how many examples of the data to read at most (default 50000).

    Returns:
        A :class:`batchfit.results.NoiseScaleResult`.

    Raises:
        InvalidInputError: no data, a model that is not compiled, bad sizes, fewer than 2
            steps, non-finite gradients.

    Example:

    >>> import keras, numpy as np
    >>> import batchfit
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    >>> model.compile("sgd", "mse")
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(512, 4)); y = x.sum(1, keepdims=True) + rng.normal(size=(512, 1))
    >>> r = batchfit.estimate_noise_scale(model, (x, y), small=8, big=64, steps=8)
    >>> r.b_simple > 0
    True
    """
    t0 = time.perf_counter()
    if data is None:
        raise InvalidInputError(NEEDS_REAL_DATA)
    if isinstance(model, str):
        model = load_model(model)
    check_model(model)
    check_sizes(small, big)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 2:
        raise InvalidInputError(f"steps (pairs) must be an integer >= 2, got {steps!r}; the "
                                "interval needs several pairs (32 or more is good)")
    sampler = ExampleSampler(data, max_examples=max_examples, seed=seed)
    notes = list(sampler.notes)
    if sampler.num_examples < big:
        notes.append(f"only {sampler.num_examples} examples for a big batch of {big}: "
                     "examples repeat within a batch (the estimate is for this sample)")
    state = ModelState(model)
    try:
        meter = GradientNormMeter(model, small, big)
        small_sq, big_sq = meter.pairs(sampler, int(steps))
    finally:
        state.restore()
    est = estimate_from_pairs(small_sq, big_sq, small, big, confidence=confidence, seed=seed)
    g2, trace = pair_estimates(small_sq, big_sq, small, big)
    if est.high == math.inf or est.relative_halfwidth > 0.5:
        notes.append("the interval is wide: measure more pairs (steps=) or a larger big batch")
    if _mixes_examples(model):
        notes.append("the model has BatchNormalization: a micro-batch's gradient depends on "
                     "its batch mates, which the noise-scale formula ignores")
    pairs = [NoisePair(small_sq_norm=float(s), big_sq_norm=float(b), gradient_sq_norm=float(g),
                       trace_sigma=float(t)) for s, b, g, t in zip(small_sq, big_sq, g2, trace)]

    if est.trace_sigma <= 1e-12 * max(abs(est.gradient_sq_norm), 1e-30):
        notes.append("the examples' gradients barely differ (tr(Sigma) ~ 0): are these real, "
                     "varied examples, or copies of one?")

    def finite(v: float) -> float | None:  # inf is saved as null; keep memory and JSON alike
        return v if math.isfinite(v) else None

    return NoiseScaleResult(
        b_simple=finite(est.b_simple), low=finite(est.low), high=finite(est.high),
        confidence=confidence,
        gradient_sq_norm=est.gradient_sq_norm, trace_sigma=est.trace_sigma,
        small_batch=int(small), big_batch=int(big), pairs=pairs,
        seconds=time.perf_counter() - t0, examples=sampler.num_examples,
        model_name=str(getattr(model, "name", "")),
        optimizer=type(getattr(model, "optimizer", None)).__name__, notes=notes,
        environment=get_backend().environment_info())


def _mixes_examples(model: Any) -> bool:
    try:
        layers = model._flatten_layers(include_self=False, recursive=True)
    except Exception:  # noqa: BLE001 - a private API; the note is optional
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


class NoiseScaleMonitor(keras.callbacks.Callback):
    """Callback that tracks the gradient noise scale while a model trains.

    Keras callbacks never see the training batch, so every ``every`` training steps the
    monitor draws ``big`` examples from ``data`` (the training data, or a sample of it),
    computes the gradients of the model's loss on ``big / small`` micro-batches at the current
    weights, and records one pair of squared norms (see :func:`estimate_noise_scale`). Nothing
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
        super().__init__()
        check_sizes(small, big)
        for name, v in (("every", every), ("pairs_per_measurement", pairs_per_measurement),
                        ("window", window)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise InvalidInputError(f"{name} must be a positive integer, got {v!r}")
        self.sampler = ExampleSampler(data, max_examples=max_examples, seed=seed)
        self.small, self.big = int(small), int(big)
        self.every = int(every)
        self.pairs_per_measurement = int(pairs_per_measurement)
        self.window = int(window)
        self.log_dir = log_dir
        self.seed = seed
        self.records: list[dict[str, float]] = []
        self._meter: GradientNormMeter | None = None
        self._writer: Any = None
        self._small_sq: list[float] = []
        self._big_sq: list[float] = []
        self._step = 0
        self._measured_this_epoch = False

    # -- Keras hooks --------------------------------------------------------------------------

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._meter = GradientNormMeter(self.model, self.small, self.big)
        if self.log_dir is not None and self._writer is None:
            self._writer = tf.summary.create_file_writer(str(self.log_dir))

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._measured_this_epoch = False

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._step += 1
        if self._step % self.every == 0:
            self._measure()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if not self._measured_this_epoch:
            self._measure()
        values = self._summarize(bootstrap=True)
        if logs is not None:
            logs.update(values)
        self.records.append({"epoch": float(epoch), "step": float(self._step),
                             "pairs": float(len(self._small_sq)), **values})
        if self._writer is not None:
            with self._writer.as_default():
                for key, value in values.items():
                    if math.isfinite(value):
                        _write_scalar(key, value, epoch)
            self._writer.flush()

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if self._writer is not None:  # closed (its event file released); the next fit reopens
            self._writer.close()
            self._writer = None

    # -- internals -----------------------------------------------------------------------------

    def _measure(self) -> None:
        if self._meter is None:
            self._meter = GradientNormMeter(self.model, self.small, self.big)
        saved = [(v, np.array(v.numpy(), copy=True)) for v in _state_variables(self.model)]
        try:
            s, b = self._meter.pairs(self.sampler, self.pairs_per_measurement)
        finally:
            for v, value in saved:
                v.assign(value)
        self._measured_this_epoch = True
        self._small_sq = (self._small_sq + s.tolist())[-self.window:]
        self._big_sq = (self._big_sq + b.tolist())[-self.window:]
        if self._writer is not None:
            running = self._summarize(bootstrap=False)
            if math.isfinite(running["noise_scale"]):
                with self._writer.as_default():
                    _write_scalar("noise_scale_step", running["noise_scale"], self._step)

    def _summarize(self, *, bootstrap: bool) -> dict[str, float]:
        small, big = self._small_sq, self._big_sq
        if bootstrap and len(small) >= 2:
            est = estimate_from_pairs(small, big, self.small, self.big, seed=self.seed)
            return {"noise_scale": est.b_simple, "noise_scale_low": est.low,
                    "noise_scale_high": est.high, "grad_sq_norm": est.gradient_sq_norm,
                    "grad_trace": est.trace_sigma}
        g2, trace = pair_estimates(small, big, self.small, self.big)
        g2m, trm = float(np.mean(g2)), float(np.mean(trace))
        nan = float("nan")
        return {"noise_scale": noise_scale_of_means(g2m, trm), "noise_scale_low": nan,
                "noise_scale_high": nan, "grad_sq_norm": g2m, "grad_trace": trm}


__all__ = ["ExampleSampler", "GradientNormMeter", "NoiseScaleMonitor", "estimate_noise_scale"]
