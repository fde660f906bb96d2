"""Small compiled example models: factories for batchfit's tests, benchmarks and demo.

Every factory can be called with no argument and returns a compiled ``keras.Model``, so each is
also a CLI spec, e.g. ``batchfit max batchfit.examples.models:demo_model``. The ``seed_*``
models and :func:`demo_model` use the origin document's layers (:mod:`batchfit.examples.seed`);
:func:`transformer` uses batchfit's own :class:`MultiHeadSelfAttention`, a custom layer that
reads the batch size with ``tf.shape(x)[0]`` as the seed document recommends. Each model trains
one step at batch 32 in well under 100 ms on a 2-core CPU. On another Keras backend (JAX) the
factories build with :mod:`batchfit.examples.portable`'s layers, the seed's with the ``tf.*``
calls rewritten with ``keras.ops`` (and the transformer is the portable one).

Example:

>>> from batchfit.examples.models import seed_mlp
>>> from batchfit.backend.tensorflow.synth import synthesize_batch
>>> model = seed_mlp()
>>> x, y = synthesize_batch(model, 32)
>>> loss = model.train_on_batch(x, y)
"""

from __future__ import annotations

import math
from typing import Any

import keras
from keras import ops

if keras.config.backend() == "tensorflow":
    import tensorflow as tf

    from .seed import MemoryAwareLayer, MyCustomLayer, MyVariableBatchLayer
else:  # another Keras backend (JAX): the seed's layers rewritten with keras.ops
    from .portable import MemoryAwareLayer, MyCustomLayer, MyVariableBatchLayer

__all__ = ["MultiHeadSelfAttention", "PositionEmbedding", "SeedMemoryAwareModel", "cnn",
           "demo_model", "lstm", "seed_memory_aware", "seed_mlp", "seed_sequence",
           "transformer"]


# --------------------------------------------------------------------------------------------
# batchfit's own (serializable) layers
# --------------------------------------------------------------------------------------------

@keras.saving.register_keras_serializable(package="batchfit")
class MultiHeadSelfAttention(keras.layers.Layer):
    """Multi-head self-attention written with ``keras.ops`` and ``tf.shape``.

    Shapes are read at run time (``tf.shape(x)[0]`` for the batch, ``tf.shape(x)[1]`` for the
    time steps), so the layer works for any batch size and sequence length, including ``None``
    dimensions in a traced step.

    Args:
        num_heads: number of attention heads.
        key_dim: size of each head's queries, keys and values.
        **kwargs: standard ``keras.layers.Layer`` arguments (``name``, ``dtype``...).

    Returns (when called on ``(batch, T, D)``):
        A ``(batch, T, D)`` tensor.

    Example:

    >>> import numpy as np
    >>> MultiHeadSelfAttention(2, 4)(np.ones((3, 5, 8), "float32")).shape
    TensorShape([3, 5, 8])
    """

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
        batch = tf.shape(x)[0]
        steps = tf.shape(x)[1]
        h, k = self.num_heads, self.key_dim
        qkv = ops.matmul(x, self.qkv_kernel) + self.qkv_bias                # (B, T, 3*h*k)
        qkv = tf.reshape(qkv, tf.stack([batch, steps, 3, h, k]))
        qkv = ops.transpose(qkv, (2, 0, 3, 1, 4))                             # (3, B, h, T, k)
        q, key, v = qkv[0], qkv[1], qkv[2]
        scores = ops.matmul(q, ops.transpose(key, (0, 1, 3, 2))) / math.sqrt(k)  # (B, h, T, T)
        weights = ops.softmax(scores, axis=-1)
        out = ops.matmul(weights, v)                                          # (B, h, T, k)
        out = ops.transpose(out, (0, 2, 1, 3))                                # (B, T, h, k)
        out = tf.reshape(out, tf.stack([batch, steps, h * k]))
        return ops.matmul(out, self.out_kernel) + self.out_bias

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return tuple(input_shape)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(num_heads=self.num_heads, key_dim=self.key_dim)
        return config


@keras.saving.register_keras_serializable(package="batchfit")
class PositionEmbedding(keras.layers.Layer):
    """Adds a learned position embedding to a ``(batch, T, D)`` sequence (``T <= max_length``).

    Args:
        max_length: the longest sequence accepted.
        **kwargs: standard ``keras.layers.Layer`` arguments.

    Returns (when called):
        The inputs plus the embedding of positions ``0..T-1``, same shape.

    Example:

    >>> import numpy as np
    >>> PositionEmbedding(10)(np.zeros((2, 4, 3), "float32")).shape
    TensorShape([2, 4, 3])
    """

    def __init__(self, max_length: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_length = int(max_length)

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        self.positions = self.add_weight(name="positions",
                                         shape=(self.max_length, int(input_shape[-1])),
                                         initializer="random_normal")

    def call(self, x: Any) -> Any:
        steps = tf.shape(x)[1]
        return x + ops.cast(self.positions[:steps], x.dtype)[None]

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return tuple(input_shape)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(max_length=self.max_length)
        return config


@keras.saving.register_keras_serializable(package="batchfit")
class SeedMemoryAwareModel(keras.Model):
    """Dense -> seed ``MemoryAwareLayer`` -> Dense regression, as a subclassed model.

    The seed layer's Python ``if`` on a tensor cannot be traced: building a functional or
    Sequential model with it fails (Keras traces ``call()`` to infer shapes), and so does a
    graph-mode train step. A subclassed model compiled with ``run_eagerly=True`` runs it
    eagerly, where the check works: above ``limit`` samples a step raises ``ValueError``.

    Args:
        limit: the ``max_batch_size`` of the ``MemoryAwareLayer``.
        features: size of one input example.
        **kwargs: standard ``keras.Model`` arguments.
    """

    def __init__(self, limit: int = 64, features: int = 16, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.limit = int(limit)
        self.features = int(features)
        self.hidden = keras.layers.Dense(32, activation="relu")
        self.guard = MemoryAwareLayer(max_batch_size=self.limit)
        self.head = keras.layers.Dense(1)

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        # Built explicitly: Keras cannot build it by tracing call() (the seed layer's Python
        # `if`), and an explicit build records the input shape batchfit synthesizes from.
        self.hidden.build(input_shape)
        self.head.build((*tuple(input_shape)[:-1], 32))

    def call(self, inputs: Any) -> Any:
        return self.head(self.guard(self.hidden(inputs)))

    def get_config(self) -> dict[str, Any]:
        return {"limit": self.limit, "features": self.features, "name": self.name}


# --------------------------------------------------------------------------------------------
# Factories
# --------------------------------------------------------------------------------------------

def seed_mlp(features: int = 16, hidden: int = 64) -> keras.Model:
    """An MLP regression head ending in the seed's ``MyCustomLayer`` (mse loss).

    ``Input(features) -> Dense(hidden) -> Dense(hidden) -> MyCustomLayer(hidden) -> (batch, 1)``.

    Args:
        features: size of one input example.
        hidden: width of the hidden layers (and ``units`` of ``MyCustomLayer``).

    Returns:
        A compiled ``keras.Model`` (Adam, mean squared error).

    Example:

    >>> seed_mlp().output_shape
    (None, 1)
    """
    inputs = keras.Input((features,), name="features")
    x = keras.layers.Dense(hidden, activation="relu")(inputs)
    x = keras.layers.Dense(hidden, activation="relu")(x)
    outputs = MyCustomLayer(hidden)(x)
    model = keras.Model(inputs, outputs, name="seed_mlp")
    model.compile(optimizer="adam", loss="mse")
    return model


def seed_sequence(timesteps: int = 32, features: int = 16, num_classes: int = 5) -> keras.Model:
    """A sequence classifier pooling time with the seed's ``MyVariableBatchLayer``.

    ``Input(timesteps, features) -> Dense(32) per step -> MyVariableBatchLayer (mean over
    time, axis 1) -> Dense(num_classes, softmax)``, sparse categorical crossentropy.

    Args:
        timesteps: sequence length.
        features: features per time step.
        num_classes: number of classes.

    Returns:
        A compiled ``keras.Model``.

    Example:

    >>> seed_sequence().output_shape
    (None, 5)
    """
    inputs = keras.Input((timesteps, features), name="sequence")
    x = keras.layers.Dense(32, activation="relu")(inputs)
    x = MyVariableBatchLayer()(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax")(x)
    model = keras.Model(inputs, outputs, name="seed_sequence")
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return model


def seed_memory_aware(limit: int = 64, features: int = 16) -> keras.Model:
    """A model with the seed's ``MemoryAwareLayer``: batches above ``limit`` raise ValueError.

    Compiled with ``run_eagerly=True`` on TensorFlow because the layer's Python ``if`` on a
    tensor only runs eagerly there (in a graph-mode step it raises
    ``OperatorNotAllowedInGraphError`` at trace time, for every batch size); on JAX the batch
    size is a Python ``int`` inside the compiled step and the model compiles as usual. It is a subclassed model (:class:`SeedMemoryAwareModel`) because
    functional construction also traces the layer. It is built for ``(None, features)`` so that
    its input shape is known.

    Args:
        limit: the largest batch the model accepts.
        features: size of one input example.

    Returns:
        A compiled, built ``keras.Model`` (Adam, mse, eager).

    Example:

    >>> import numpy as np
    >>> m = seed_memory_aware(limit=4)
    >>> m.train_on_batch(np.zeros((8, 16)), np.zeros((8, 1)))
    Traceback (most recent call last):
    ...
    ValueError: ...Batch size 8 exceeds maximum allowed 4...
    """
    model = SeedMemoryAwareModel(limit=limit, features=features, name="seed_memory_aware")
    model.build((None, features))
    # On JAX the batch size is a Python int inside the compiled step: no eager run needed.
    model.compile(optimizer="adam", loss="mse",
                  run_eagerly=keras.config.backend() == "tensorflow")
    return model


def demo_model(image_size: int = 32, filters: int = 16) -> keras.Model:
    """batchfit's built-in demo: a small conv net regressing one value, with the seed layers.

    ``Input(image_size, image_size, 3) -> Conv2D(filters, 3x3) -> Conv2D(filters, 1x1) ->
    Reshape(H*W, filters) -> MyVariableBatchLayer (mean over positions) -> Dense(64) ->
    MyCustomLayer(64) -> (batch, 1)``, mse. Its activations (two ``32x32x16`` feature maps per
    example) make memory per example matter, about 200 KiB, so a 64-256 MiB budget holds
    batches in the hundreds to about a thousand, while the 1x1 second convolution keeps a step
    at batch 64 at a few tens of milliseconds on a 2-core CPU.

    Args:
        image_size: height and width of the input images.
        filters: channels of the two convolutions.

    Returns:
        A compiled ``keras.Model`` (Adam, mse).

    Example:

    >>> demo_model().input_shape
    (None, 32, 32, 3)
    """
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.Conv2D(filters, 1, activation="relu")(x)
    x = keras.layers.Reshape((image_size * image_size, filters))(x)
    x = MyVariableBatchLayer()(x)
    x = keras.layers.Dense(64, activation="relu")(x)
    outputs = MyCustomLayer(64)(x)
    model = keras.Model(inputs, outputs, name="demo_model")
    model.compile(optimizer="adam", loss="mse")
    return model


def cnn(num_classes: int = 10) -> keras.Model:
    """A small CNN classifier for 32x32x3 images (sparse categorical crossentropy).

    Args:
        num_classes: number of classes.

    Returns:
        A compiled ``keras.Model``.

    Example:

    >>> cnn().output_shape
    (None, 10)
    """
    inputs = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(64, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(64, activation="relu")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax")(x)
    model = keras.Model(inputs, outputs, name="cnn")
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return model


def transformer(vocab_size: int = 1000, max_length: int = 64, dim: int = 64,
                num_heads: int = 4, num_classes: int = 2) -> keras.Model:
    """A one-block transformer text classifier with a custom attention layer.

    ``tokens (max_length,) int32 -> Embedding -> PositionEmbedding -> [LayerNorm ->
    MultiHeadSelfAttention -> residual -> LayerNorm -> MLP -> residual] -> mean pool ->
    Dense(num_classes)``, sparse categorical crossentropy (softmax outputs). The attention
    layer reads the batch size with ``tf.shape(x)[0]``.

    Args:
        vocab_size: vocabulary size (``input_dim`` of the Embedding).
        max_length: tokens per example.
        dim: model width.
        num_heads: attention heads (each of size ``dim // num_heads``).
        num_classes: number of classes.

    Returns:
        A compiled ``keras.Model``.

    Example:

    >>> transformer().input_shape
    (None, 64)
    """
    tokens = keras.Input((max_length,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(vocab_size, dim)(tokens)
    x = PositionEmbedding(max_length)(x)
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


def lstm(vocab_size: int = 1000, max_length: int = 40, units: int = 32,
         num_classes: int = 2) -> keras.Model:
    """An Embedding + LSTM text classifier (sparse categorical crossentropy).

    Args:
        vocab_size: vocabulary size.
        max_length: tokens per example.
        units: LSTM units (also the embedding size).
        num_classes: number of classes.

    Returns:
        A compiled ``keras.Model``.

    Example:

    >>> lstm().output_shape
    (None, 2)
    """
    tokens = keras.Input((max_length,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(vocab_size, units)(tokens)
    x = keras.layers.LSTM(units)(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax")(x)
    model = keras.Model(tokens, outputs, name="lstm")
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return model


if keras.config.backend() != "tensorflow":
    # On JAX (any backend but TensorFlow) the factories above build with the keras.ops rewrite
    # of the seed's layers (imported at the top); the transformer's own layers use tf.shape, so
    # its portable version replaces it.
    from .portable import transformer
