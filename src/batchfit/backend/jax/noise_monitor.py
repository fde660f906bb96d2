"""``batchfit.NoiseScaleMonitor`` on JAX: the noise scale tracked while a model trains.

The same callback as TensorFlow's (:class:`batchfit.backend.tensorflow.noise.NoiseScaleMonitor`,
whose docstring describes the arguments, the cost and the logged values): every ``every``
training steps one or more pairs of squared gradient norms at the current weights, pooled over
the last ``window`` pairs, written into ``logs`` (and ``History``) at each epoch's end. The
pairs are :class:`~batchfit.backend.jax.noise.JaxGradientNormMeter`'s: ``jax.vmap`` of
``jax.grad`` of the model's compiled loss, stateless, so nothing of the model is written and
nothing needs restoring. The current weights: Keras's JAX ``fit`` keeps its state apart from
the model's variables during an epoch and syncs them when a callback reads ``self.model``
(``jax_state_sync``); ``batchfit.fit`` on JAX offers its state the same way.

``log_dir`` (TensorBoard) is refused: its event files are written by TensorFlow's summary ops,
and a JAX install has no TensorFlow; the values are in ``History`` and :attr:`records`.

Example:

>>> import keras, numpy as np
>>> x = np.random.default_rng(0).normal(size=(256, 4)).astype("float32")
>>> y = x.sum(1, keepdims=True)
>>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
>>> model.compile("sgd", "mse")
>>> import batchfit
>>> monitor = batchfit.NoiseScaleMonitor((x, y), small=8, big=32, every=4)
>>> history = model.fit(x, y, batch_size=32, epochs=2, callbacks=[monitor], verbose=0)
>>> len(history.history["noise_scale"]), [r["pairs"] for r in monitor.records]
(2, [2.0, 4.0])
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...core.noise import MAX_EXAMPLES
from ...errors import InvalidInputError
from ..keras_common.noise_monitor import MonitorBase
from .noise import JaxGradientNormMeter

__all__ = ["NoiseScaleMonitor"]  # noqa: F822 - defined on first use (__getattr__)


def __getattr__(name: str) -> Any:
    """``NoiseScaleMonitor``, defined on first use (importing this module loads no framework)."""
    if name == "NoiseScaleMonitor":
        cls = _define()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _define() -> type:
    import keras

    class NoiseScaleMonitor(MonitorBase, keras.callbacks.Callback):
        """Callback that tracks the gradient noise scale while a model trains (JAX backend).

        Args:
            data: the examples to draw from: ``(x, y)`` arrays or a ``keras.utils.PyDataset``.
            small: micro-batch size (default 16).
            big: examples per pair, a multiple of ``small`` (default 128).
            every: measure every this many training steps (default 50); also once at the end of
                any epoch that had no measurement.
            pairs_per_measurement: pairs per measurement (default 1).
            window: how many of the most recent pairs the estimate pools (default 16).
            log_dir: must be ``None`` on JAX (TensorBoard's event files need TensorFlow).
            seed: seed of the example draws.
            max_examples: how many examples of ``data`` to keep at most.

        Raises:
            InvalidInputError: ``log_dir`` given, or bad sizes.
        """

        def __init__(self, data: Any, *, small: int = 16, big: int = 128, every: int = 50,
                     pairs_per_measurement: int = 1, window: int = 16,
                     log_dir: str | None = None, seed: int = 0,
                     max_examples: int = MAX_EXAMPLES) -> None:
            if log_dir is not None:
                raise InvalidInputError(
                    "NoiseScaleMonitor(log_dir=...) writes TensorBoard event files with "
                    "TensorFlow's summary ops, which a JAX install lacks: leave log_dir out (the "
                    "values are in History and monitor.records) or train with "
                    "KERAS_BACKEND=tensorflow")
            super().__init__(data, small=small, big=big, every=every,
                             pairs_per_measurement=pairs_per_measurement, window=window,
                             log_dir=None, seed=seed, max_examples=max_examples)
            self._meter: JaxGradientNormMeter | None = None

        def _pairs(self) -> tuple[np.ndarray, np.ndarray]:
            model = self.model  # Keras syncs the trainer's state into the variables here
            if self._meter is None:
                x1, y1 = self.sampler.draw(1)
                self._meter = JaxGradientNormMeter(model, self.small, self.big, x1, y1)
            trainable = [v.value for v in model.trainable_variables]
            non_trainable = [v.value for v in model.non_trainable_variables]
            metrics = [v.value for v in model.metrics_variables]
            small, big = [], []
            for _ in range(self.pairs_per_measurement):
                s, b, non_trainable = self._meter.pair(self.sampler,
                                                       (trainable, non_trainable, metrics))
                small.append(s)
                big.append(b)
            return np.array(small), np.array(big)

    return NoiseScaleMonitor
