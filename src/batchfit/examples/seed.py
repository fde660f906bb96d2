"""The three custom layers of batchfit's origin document, reproduced faithfully.

Source: "How do I determine the batch size in a TensorFlow custom layer?" (2025-01-30, id
``how-do-i-determine-the-batch-size-in``; kept as ``shared/seed/000_ba20b8ad4f4e98d8.txt``). Its
advice, "start from a guess, halve the batch on ``ResourceExhaustedError``", is what batchfit
replaces with measurements. The layers are kept exactly as published, quirks included, because
batchfit's tests, benchmarks and demo use them as examples of real users' custom layers:

- :class:`MyCustomLayer` creates its weight in ``__init__`` (Keras 3 allows it), reads the batch
  size with ``tf.shape(inputs)[0]`` (which works for any batch size) and multiplies the inputs by
  a ``(units, 1)`` column: the input's last dimension must equal ``units``, the output is
  ``(batch, 1)``.
- :class:`MyVariableBatchLayer` says "mean along batch dimension" in a comment, but reduces
  ``axis=1``: it averages over the *first non-batch* axis (time steps of a sequence), so it is
  in fact independent of the batch size and mixes no samples. The comment is wrong, the code is
  right.
- :class:`MemoryAwareLayer` raises ``ValueError`` when the batch exceeds ``max_batch_size``,
  using a Python ``if`` on a tensor. Verified with TensorFlow 2.21 / Keras 3.15: that ``if``
  only works eagerly. In graph mode (Keras's default compiled train step, ``run_eagerly=False``)
  the first step raises ``OperatorNotAllowedInGraphError`` ("Using a symbolic `tf.Tensor` as a
  Python `bool` is not allowed") at trace time, whatever the batch size. Worse, building a
  functional or Sequential model with it fails the same way even with ``run_eagerly=True``,
  because Keras infers the layer's output shape by tracing ``call()`` symbolically. It works
  in a subclassed ``keras.Model`` compiled with ``run_eagerly=True`` (see
  :func:`batchfit.examples.models.seed_memory_aware`): then a batch above the limit raises
  ``ValueError: Batch size 16 exceeds maximum allowed 8`` out of ``train_on_batch``.

None of them has a ``get_config`` that matches its ``__init__`` (they call
``super().__init__()`` without ``**kwargs``), so a model using them cannot be reloaded from a
``.keras`` file; use them through factories (``batchfit.examples.models:seed_mlp``).

Example:

>>> import numpy as np
>>> from batchfit.examples.seed import MyVariableBatchLayer
>>> MyVariableBatchLayer()(np.ones((2, 5, 3), "float32")).shape
TensorShape([2, 3])
"""

# The code below is the origin document's, unchanged but for this file's docstrings.

from __future__ import annotations

import tensorflow as tf


class MyCustomLayer(tf.keras.layers.Layer):
    """Example 1 of the seed document: ``inputs @ w[:, None]`` with ``w`` of shape ``(units,)``.

    Args:
        units: size of the weight vector; must equal the input's last dimension.

    Returns (when called):
        A ``(batch, 1)`` tensor.
    """

    def __init__(self, units):
        super(MyCustomLayer, self).__init__()
        self.units = units
        self.w = self.add_weight(shape=(units,), initializer='random_normal', trainable=True)

    def call(self, inputs):
        batch_size = tf.shape(inputs)[0] # Explicitly get the batch size
        #print(f"Batch size in MyCustomLayer: {batch_size}") # Useful for debugging
        output = tf.matmul(inputs, tf.expand_dims(self.w, axis=1))
        return output


class MyVariableBatchLayer(tf.keras.layers.Layer):
    """Example 2 of the seed document: ``reduce_mean(inputs, axis=1)``.

    Despite its comment ("mean along batch dimension"), it averages axis 1, the first axis after
    the batch: ``(batch, T, F) -> (batch, F)``.
    """

    def __init__(self):
        super(MyVariableBatchLayer, self).__init__()

    def call(self, inputs):
        #This layer does not rely on a fixed batch size
        # Processing logic can handle any incoming batch size without modification
        output = tf.math.reduce_mean(inputs, axis = 1) #Example: Calculate mean along batch dimension
        return output


class MemoryAwareLayer(tf.keras.layers.Layer):
    """Example 3 of the seed document: identity that raises ``ValueError`` above a batch size.

    The check is a Python ``if`` on a tensor: it only works eagerly (``run_eagerly=True`` in a
    subclassed model); in graph mode it raises ``OperatorNotAllowedInGraphError``.

    Args:
        max_batch_size: the largest batch accepted.
    """

    def __init__(self, max_batch_size=128):
        super(MemoryAwareLayer, self).__init__()
        self.max_batch_size = max_batch_size

    def call(self, inputs):
        batch_size = tf.shape(inputs)[0]
        if batch_size > self.max_batch_size:
            raise ValueError(f"Batch size {batch_size} exceeds maximum allowed {self.max_batch_size}")
        # ...layer processing...
        return inputs
