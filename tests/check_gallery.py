"""A gallery of custom layers written as users write them, for ``batchfit check`` tests.

Good layers: the seed document's (:mod:`batchfit.examples.seed`) and one that reads the batch
the recommended way. Broken layers, each with one batch-contract bug that one check is meant to
catch:

- :class:`StaticBatchFlatten` reads ``x.shape[0]`` (dynamic_batch, with static_shape pointing
  at the line);
- :class:`BatchCentering` subtracts the batch mean (sample_mixing);
- :class:`PythonIntRetracing` passes the batch size as a Python int to a ``tf.function``
  (retracing);
- :class:`UntrackedTableLayer` keeps a lookup table in a plain helper object (export);
- :class:`SeedCommentVariable` is the seed's ``MyVariableBatchLayer`` as its comment says
  ("mean along batch dimension", ``axis=0``) rather than as its code does (``axis=1``).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from batchfit.examples.seed import MemoryAwareLayer, MyCustomLayer, MyVariableBatchLayer

__all__ = ["BatchCentering", "GraphSafeLimit", "MemoryAwareLayer", "MyCustomLayer",
           "MyVariableBatchLayer", "PythonIntRetracing", "SeedCommentVariable",
           "StaticBatchFlatten", "UntrackedTableLayer", "gallery_model"]


class StaticBatchFlatten(keras.layers.Layer):
    """Flattens each example, reading the batch size from the static shape (the bug)."""

    def call(self, x):
        batch = x.shape[0]
        return tf.reshape(x, (batch, -1))


class BatchCentering(keras.layers.Layer):
    """Centres the features on the batch mean: each output depends on the whole batch."""

    def call(self, x):
        return x - tf.reduce_mean(x, axis=0, keepdims=True)


@tf.function
def _scale_by_count(x, count):
    return x / tf.cast(count, x.dtype)


class PythonIntRetracing(keras.layers.Layer):
    """Divides by the batch size with a compiled helper, passing the size as a Python value."""

    def call(self, x):
        count = keras.ops.shape(x)[0]  # a Python int when eager: one trace per batch size
        return _scale_by_count(x, count) * 2.0


class _Vocabulary:
    """A plain helper object: TensorFlow does not track what it holds."""

    def __init__(self):
        keys = tf.constant([0, 1], tf.int64)
        values = tf.constant([0.5, 2.0])
        self.table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(keys, values), default_value=1.0)


class UntrackedTableLayer(keras.layers.Layer):
    """Weights each value by a table lookup (positive -> 2, else 0.5), the table untracked."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.vocab = _Vocabulary()

    def call(self, x):
        keys = tf.cast(x > 0, tf.int64)
        return x * self.vocab.table.lookup(keys)


class SeedCommentVariable(keras.layers.Layer):
    """The seed's MyVariableBatchLayer as its comment describes it: mean over the batch axis."""

    def call(self, inputs):
        return tf.math.reduce_mean(inputs, axis=0)  # mean along batch dimension


class GraphSafeLimit(keras.layers.Layer):
    """Refuses batches above ``limit`` in graph mode too (the fix of the seed's third layer)."""

    def __init__(self, limit=32, **kwargs):
        super().__init__(**kwargs)
        self.limit = limit

    def call(self, x):
        tf.debugging.assert_less_equal(
            tf.shape(x)[0], self.limit,
            message=f"batch size exceeds the maximum allowed {self.limit}")
        return x * 1.0


def gallery_model() -> keras.Model:
    """A model with a few custom layers: the seed's two good layers and one batch-centering bug."""
    inputs = keras.Input((12, 16), name="sequence")
    x = keras.layers.Dense(16, activation="relu")(inputs)
    x = MyVariableBatchLayer()(x)            # (batch, 16)
    x = BatchCentering()(x)
    x = keras.layers.Dense(16, activation="relu")(x)
    outputs = MyCustomLayer(16)(x)           # (batch, 1)
    model = keras.Model(inputs, outputs, name="gallery_model")
    model.compile(optimizer="adam", loss="mse")
    return model


# Factories for the CLI tests (a spec may name a layer; pass --input-shape with it).

def static_batch_layer() -> keras.layers.Layer:
    """A layer with an error finding: ``batchfit check`` exits 1 on it."""
    return StaticBatchFlatten()


def mismatched_layer() -> keras.layers.Layer:
    """The seed's MyCustomLayer(64): fails on 16 features for its own reasons (exit 2)."""
    return MyCustomLayer(64)
