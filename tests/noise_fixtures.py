"""Models and data for the noise-scale tests (loaded by spec: 'tests/noise_fixtures.py:NAME')."""

from __future__ import annotations

import keras
import numpy as np

D, N = 4, 20_000
W_STAR = np.full(D, 0.5)


def linear_data(n: int = N, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``y = x . w* + eps`` with Gaussian ``x`` and unit noise (float32)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D)).astype("float32")
    y = (x @ W_STAR + rng.normal(size=n)).astype("float32")[:, None]
    return x, y


def linear_model() -> keras.Model:
    """A linear model at w = 0, b = 0 with the squared loss."""
    m = keras.Sequential([keras.Input((D,)), keras.layers.Dense(1, kernel_initializer="zeros")],
                         name="linear")
    m.compile(keras.optimizers.SGD(0.01), "mse")
    return m


def true_noise_scale(x: np.ndarray, y: np.ndarray) -> float:
    """``tr(Sigma) / |G|^2`` of the empirical distribution, from exact per-example gradients
    of ``(x . w + b - y)^2`` at ``w = 0, b = 0`` (what sampling with replacement estimates)."""
    z = np.c_[x.astype(float), np.ones(len(x))]
    g = 2.0 * z * (-y.astype(float))
    mean = g.mean(axis=0)
    return float(((g - mean) ** 2).sum(axis=1).mean() / (mean @ mean))


def stateful_model() -> keras.Model:
    """BatchNorm, Dropout and Adam: everything a training-mode pass can change."""
    inp = keras.Input((D,))
    h = keras.layers.Dense(16, activation="relu")(inp)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.Dropout(0.3)(h)
    out = keras.layers.Dense(1)(h)
    m = keras.Model(inp, out, name="stateful")
    m.compile(keras.optimizers.Adam(1e-3), "mse", metrics=["mae"])
    return m


def digits_like(n: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A small 3-class classification problem (for the callback test)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=n)
    x = (rng.normal(size=(n, D)) + y[:, None]).astype("float32")
    return x, y


def classifier() -> keras.Model:
    m = keras.Sequential([keras.Input((D,)), keras.layers.Dense(16, activation="relu"),
                          keras.layers.Dense(3, activation="softmax")], name="clf")
    m.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy")
    return m
