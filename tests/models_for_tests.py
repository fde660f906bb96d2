"""Model factories used by the end-to-end tests (loaded by spec: 'tests/models_for_tests.py:NAME')."""

from __future__ import annotations

import os
import signal

import keras
import tensorflow as tf

from batchfit.examples.seed import MyCustomLayer, MyVariableBatchLayer


class KillerLayer(keras.layers.Layer):
    """Kills its own process (as the kernel's OOM killer would) when the batch exceeds ``limit``."""

    def __init__(self, limit: int = 48, **kwargs):
        super().__init__(**kwargs)
        self.limit = limit

    def call(self, x):
        if x.shape[0] is not None and x.shape[0] > self.limit:
            os.kill(os.getpid(), signal.SIGKILL)
        return x


def killer_model() -> keras.Model:
    """Dies (SIGKILL) above batch 48; runs eagerly so the Python check sees the real batch."""
    inp = keras.Input((8,))
    h = KillerLayer(48)(inp)
    out = keras.layers.Dense(1)(h)
    m = keras.Model(inp, out)
    m.compile("sgd", "mse", run_eagerly=True)
    return m


def seed_wide() -> keras.Model:
    """The seed's MyVariableBatchLayer and MyCustomLayer in a model with real per-sample memory."""
    inp = keras.Input((64, 32))
    h = keras.layers.Dense(256, activation="relu")(inp)
    h = keras.layers.Dense(256, activation="relu")(h)
    h = MyVariableBatchLayer()(h)           # mean over axis 1 -> (batch, 256)
    out = MyCustomLayer(256)(h)             # (batch, 1)
    m = keras.Model(inp, out)
    m.compile("adam", "mse")
    return m


def huge_model() -> keras.Model:
    """16 MiB of weights, 48 MiB with Adam's two slots, 64 MiB with gradients: no step fits 56 MiB."""
    inp = keras.Input((2048,))
    out = keras.layers.Dense(2048)(inp)
    m = keras.Model(inp, out)
    m.compile("adam", "mse")
    return m


def not_a_model():
    return tf.constant(1.0)


def raising_factory():
    raise RuntimeError("cannot reach the feature store")


def uncompiled_model() -> keras.Model:
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])


class ProcessLimitLayer(keras.layers.Layer):
    """Refuses batches above :meth:`limit`, which a subclass reads from its process: a device
    whose limit moves between processes, as near a capped allocator's limit."""

    def limit(self) -> int:
        raise NotImplementedError

    def call(self, x):
        limit = self.limit()
        if x.shape[0] is not None and x.shape[0] > limit:
            raise ValueError(f"batch {x.shape[0]} exceeds this process's limit {limit}")
        return x


class MarkerLimitLayer(ProcessLimitLayer):
    """Above 64, or above 56 once the file ``$BATCHFIT_TEST_MARKER`` exists."""

    def limit(self) -> int:
        return 56 if os.path.exists(os.environ.get("BATCHFIT_TEST_MARKER", "")) else 64


class SettingsLimitLayer(ProcessLimitLayer):
    """Above 64 in a process set up as a probe worker (one inter-op thread), above 40 under
    TensorFlow's default settings: a model that needs more room there."""

    def limit(self) -> int:
        return 64 if tf.config.threading.get_inter_op_parallelism_threads() == 1 else 40


def _eagerly_limited(layer: keras.layers.Layer) -> keras.Model:
    """A model with ``layer``; runs eagerly so the layer sees the real batch."""
    inp = keras.Input((8,))
    m = keras.Model(inp, keras.layers.Dense(1)(layer(inp)))
    m.compile("sgd", "mse", run_eagerly=True)
    return m


def marker_limited() -> keras.Model:
    """A model with :class:`MarkerLimitLayer`."""
    return _eagerly_limited(MarkerLimitLayer())


def settings_limited() -> keras.Model:
    """A model with :class:`SettingsLimitLayer`."""
    return _eagerly_limited(SettingsLimitLayer())


def jit_mlp() -> keras.Model:
    """A small MLP whose training step Keras XLA-compiles (``jit_compile=True``)."""
    inp = keras.Input((64,))
    h = keras.layers.Dense(256, activation="relu")(inp)
    h = keras.layers.Dense(256, activation="relu")(h)
    out = keras.layers.Dense(1)(h)
    m = keras.Model(inp, out)
    m.compile("adam", "mse", jit_compile=True)
    return m


@keras.saving.register_keras_serializable(package="batchfit_tests")
class PyFunctionLayer(keras.layers.Layer):
    """An identity through ``tf.py_function``, which XLA cannot compile."""

    def call(self, x):
        out = tf.py_function(lambda t: t, [x], x.dtype)
        out.set_shape(x.shape)
        return out

    def compute_output_shape(self, shape):
        return shape


def py_function_mlp() -> keras.Model:
    """A small MLP with a ``tf.py_function`` layer named 'pyfn' (jit_compile left off)."""
    inp = keras.Input((64,))
    h = keras.layers.Dense(128, activation="relu")(inp)
    h = PyFunctionLayer(name="pyfn")(h)
    out = keras.layers.Dense(1)(h)
    m = keras.Model(inp, out)
    m.compile("sgd", "mse")
    return m
