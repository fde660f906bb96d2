"""``batchfit.NoiseScaleMonitor`` on JAX: in Keras's own fit and in ``batchfit.fit``."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from jax_fit_models import data, model
from noise_fixtures import linear_data, linear_model

import batchfit
from batchfit.backend.jax.noise_monitor import NoiseScaleMonitor
from batchfit.backend.keras_common.sampler import ExampleSampler
from batchfit.errors import InvalidInputError


def test_the_public_name_is_the_jax_callback() -> None:
    assert batchfit.NoiseScaleMonitor is NoiseScaleMonitor


def test_the_monitor_measures_the_closed_form_pairs_at_the_current_weights() -> None:
    """With a learning rate of 0 the weights stay at w = 0, b = 0, where each example's mse
    gradient is ``-2 y_i [x_i, 1]``: every pair must be those numbers for the examples drawn."""
    x, y = linear_data(400)
    m = linear_model()
    m.compile(keras.optimizers.SGD(0.0), "mse")
    small, big = 4, 16
    monitor = NoiseScaleMonitor((x, y), small=small, big=big, every=3, window=100, seed=7)
    h = m.fit(x, y, batch_size=40, epochs=2, shuffle=False, callbacks=[monitor], verbose=0)
    # 10 steps an epoch, a measurement every 3 steps (steps 3, 6, 9 | 12, 15, 18)
    assert [r["pairs"] for r in monitor.records] == [3.0, 6.0]
    assert len(h.history["noise_scale"]) == 2 and all(v > 0 for v in h.history["noise_scale"])
    twin = ExampleSampler((x, y), seed=7)
    twin.draw(1)  # the meter draws one example to build with first
    want_small, want_big = [], []
    for _ in range(6):
        xs, ys = twin.draw(big)
        g = -2.0 * np.c_[xs.astype(float), np.ones(big)] * ys.astype(float)
        micro = g.reshape(big // small, small, -1).mean(axis=1)
        want_small.append(np.mean(np.sum(micro ** 2, axis=1)))
        want_big.append(np.sum(micro.mean(axis=0) ** 2))
    np.testing.assert_allclose(monitor._small_sq, want_small, rtol=1e-4)
    np.testing.assert_allclose(monitor._big_sq, want_big, rtol=1e-4)


def test_the_monitor_changes_nothing_of_the_training() -> None:
    x, y = linear_data(300)
    runs = []
    for callbacks in ([], [NoiseScaleMonitor((x, y), small=4, big=16, every=2)]):
        m = linear_model()
        m.fit(x, y, batch_size=30, epochs=2, shuffle=False, callbacks=callbacks, verbose=0)
        runs.append([np.array(v.value) for v in m.trainable_variables])
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


class _Weights(keras.callbacks.Callback):
    """The weights a callback reads at each batch's end (through ``self.model``)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[list[np.ndarray]] = []

    def on_train_batch_end(self, batch, logs=None) -> None:
        self.seen.append([np.array(v.value) for v in self.model.trainable_variables])


def test_callbacks_in_batchfit_fit_read_the_current_weights_as_in_keras_fit() -> None:
    """batchfit.fit offers its state as Keras's JAX fit does: a callback reading self.model
    mid-epoch sees the weights after that batch (not the epoch's start), so the monitor
    measures at the current weights there too."""
    x, y = data(64)
    ours, theirs = _Weights(), _Weights()
    monitor = NoiseScaleMonitor((x, y), small=4, big=16, every=2)
    h = batchfit.fit(model(), x, y, batch_size=16, epochs=2, shuffle=False, verbose=0,
                     callbacks=[ours, monitor])
    model().fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[theirs])
    assert len(ours.seen) == len(theirs.seen) == 8
    for got, want in zip(ours.seen, theirs.seen):
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
    assert len(h.history["noise_scale"]) == 2 and [r["pairs"] for r in monitor.records] == [
        2.0, 4.0]


def test_tensorboard_is_refused_on_jax() -> None:
    x, y = linear_data(50)
    with pytest.raises(InvalidInputError, match="log_dir"):
        NoiseScaleMonitor((x, y), small=4, big=16, log_dir="tb")
