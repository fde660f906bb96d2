"""The seed's layers rewritten with ``keras.ops``: any Keras 3 backend.

:mod:`batchfit.examples.seed` keeps the origin document's layers verbatim, ``tf.*`` calls
included, so they only run on TensorFlow. This module is the same layers for JAX (and any Keras
backend): each ``tf.*`` call replaced by its ``keras.ops`` equivalent, nothing else changed but
what the rewrite needs. :mod:`batchfit.examples.models` builds its factories from these layers
on any backend but TensorFlow, so every example model (the built-in demo too) builds there:

- :class:`MyCustomLayer`: ``tf.shape(inputs)[0]`` -> ``ops.shape(inputs)[0]``,
  ``tf.matmul``/``tf.expand_dims`` -> ``ops.matmul``/``ops.expand_dims``.
- :class:`MyVariableBatchLayer`: ``tf.math.reduce_mean(axis=1)`` -> ``ops.mean(axis=1)``
  (still the first non-batch axis, as in the seed).
- :class:`MemoryAwareLayer`: ``ops.shape(inputs)[0]`` is a Python ``int`` on JAX even inside a
  compiled step (shapes are static there), so the seed's Python ``if`` works in a jitted
  step as well; it is ``None`` while Keras builds a functional model symbolically, when the
  check is skipped (the seed's ``if`` would fail there).
- :class:`MultiHeadSelfAttention` and :func:`transformer`: batchfit's attention layer and
  transformer without ``tf.shape`` (``-1`` in the reshapes; positions from an ``Embedding`` of
  ``arange``).

Importing this module imports ``keras`` only: set ``KERAS_BACKEND`` first to choose the backend.

Example:

>>> import numpy as np
>>> from batchfit.examples.portable import MyVariableBatchLayer
>>> tuple(MyVariableBatchLayer()(np.ones((2, 5, 3), "float32")).shape)
(2, 3)
"""

from __future__ import annotations

import math
from typing import Any

import keras
from keras import ops

__all__ = ["MemoryAwareLayer", "MultiHeadSelfAttention", "MyCustomLayer",
           "MyVariableBatchLayer", "transformer"]


class MyCustomLayer(keras.layers.Layer):
    """The seed's Example 1 with ``keras.ops``: ``inputs @ w[:, None]``, ``w`` of shape
    ``(units,)``; the input's last dimension must equal ``units``; output ``(batch, 1)``."""

    def __init__(self, units: int) -> None:
        super().__init__()
        self.units = units
        self.w = self.add_weight(shape=(units,), initializer="random_normal", trainable=True)

    def call(self, inputs: Any) -> Any:
        batch_size = ops.shape(inputs)[0]  # noqa: F841 - the seed reads it (for debugging)
        return ops.matmul(inputs, ops.expand_dims(self.w, axis=1))


class MyVariableBatchLayer(keras.layers.Layer):
    """The seed's Example 2 with ``keras.ops``: the mean over axis 1 (the first axis after the
    batch, as in the seed, whatever its comment says): ``(batch, T, F) -> (batch, F)``."""

    def __init__(self) -> None:
        super().__init__()

    def call(self, inputs: Any) -> Any:
        return ops.mean(inputs, axis=1)


class MemoryAwareLayer(keras.layers.Layer):
    """The seed's Example 3 with ``keras.ops``: identity that raises ``ValueError`` when the
    batch exceeds ``max_batch_size`` (checked whenever the batch size is known)."""

    def __init__(self, max_batch_size: int = 128) -> None:
        super().__init__()
        self.max_batch_size = max_batch_size

    def call(self, inputs: Any) -> Any:
        batch_size = ops.shape(inputs)[0]
        if batch_size is not None and batch_size > self.max_batch_size:
            raise ValueError(f"Batch size {batch_size} exceeds maximum allowed "
                             f"{self.max_batch_size}")
        return inputs


class MultiHeadSelfAttention(keras.layers.Layer):
    """:class:`batchfit.examples.models.MultiHeadSelfAttention` with ``ops.shape`` for the
    batch and time steps (``-1`` in the reshapes, so ``None`` dimensions trace)."""

    def __init__(self, num_heads: int, key_dim: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_heads = int(num_heads)
        self.key_dim = int(key_dim)

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        d = int(input_shape[-1])
        inner = self.num_heads * self.key_dim
        self.qkv_kernel = self.add_weight(name="qkv_kernel", shape=(d, 3 * inner),
                                          initializer="glorot_uniform")
        self.qkv_bias = self.add_weight(name="qkv_bias", shape=(3 * inner,), initializer="zeros")
        self.out_kernel = self.add_weight(name="out_kernel", shape=(inner, d),
                                          initializer="glorot_uniform")
        self.out_bias = self.add_weight(name="out_bias", shape=(d,), initializer="zeros")

    def call(self, x: Any) -> Any:
        steps = ops.shape(x)[1]
        h, k = self.num_heads, self.key_dim
        qkv = ops.matmul(x, self.qkv_kernel) + self.qkv_bias
        qkv = ops.reshape(qkv, (-1, steps, 3, h, k))
        qkv = ops.transpose(qkv, (2, 0, 3, 1, 4))
        q, key, v = qkv[0], qkv[1], qkv[2]
        scores = ops.matmul(q, ops.transpose(key, (0, 1, 3, 2))) / math.sqrt(k)
        out = ops.matmul(ops.softmax(scores, axis=-1), v)
        out = ops.reshape(ops.transpose(out, (0, 2, 1, 3)), (-1, steps, h * k))
        return ops.matmul(out, self.out_kernel) + self.out_bias

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return tuple(input_shape)


def transformer(vocab_size: int = 1000, max_length: int = 64, dim: int = 64,
                num_heads: int = 4, num_classes: int = 2) -> keras.Model:
    """:func:`batchfit.examples.models.transformer` with the ``keras.ops`` attention layer
    and Keras's position embedding (an ``Embedding`` of ``arange``)."""
    tokens = keras.Input((max_length,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(vocab_size, dim)(tokens)
    positions = keras.layers.Embedding(max_length, dim)(ops.arange(max_length)[None])
    x = x + positions
    h = keras.layers.LayerNormalization()(x)
    x = x + MultiHeadSelfAttention(num_heads, dim // num_heads)(h)
    h = keras.layers.LayerNormalization()(x)
    h = keras.layers.Dense(2 * dim, activation="gelu")(h)
    x = x + keras.layers.Dense(dim)(h)
    x = keras.layers.GlobalAveragePooling1D()(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax")(x)
    model = keras.Model(tokens, outputs, name="transformer")
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return model
