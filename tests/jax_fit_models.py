"""A model whose step fails with a real JAX runtime error above a batch size (for tests/jax).

``OutOfMemoryAbove`` is a real Keras layer; inside the compiled step it calls back to the host
(``jax.pure_callback``), and the callback raises when the batch exceeds ``limit``. JAX then
raises a real ``JaxRuntimeError`` (``INTERNAL: CpuCallback error ... RESOURCE_EXHAUSTED: Out
of memory ...``) *while the step runs*, after its inputs were dispatched (and donated, in
Keras's own step): the situation of a GPU's allocator refusing mid-step. It is an **injected**
out-of-memory, not the allocator's: JAX on CPU has no allocator cap to exhaust. Labelled so
wherever it is used.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import keras
import numpy as np

FEATURES = 6


class OutOfMemoryAbove(keras.layers.Layer):
    """Identity, except that a batch above ``limit`` fails the running step (injected OOM).

    With ``mesh`` (a ``jax.sharding.Mesh`` with a ``"batch"`` axis) the limit is per device:
    the check runs on every device's shard (``jax.shard_map``), so every device fails together,
    as each replica's allocator would (a check on one device alone would leave the others
    waiting in the gradients' all-reduce).
    """

    def __init__(self, limit: int, mesh: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.limit = int(limit)
        self.mesh = mesh

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def call(self, x: Any) -> Any:
        limit = self.limit

        def host(a: np.ndarray) -> np.ndarray:
            if a.shape[0] > limit:
                raise MemoryError(
                    f"RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
                    f"{a.nbytes * 4096} bytes (injected by OutOfMemoryAbove above batch {limit})")
            return np.zeros((1,), np.float32)

        def check(a: Any) -> Any:
            return jax.pure_callback(host, jax.ShapeDtypeStruct((1,), jnp.float32), a,
                                     vmap_method="sequential")

        if self.mesh is not None and x.shape[0] and x.shape[0] % self.mesh.size == 0:
            from jax.sharding import PartitionSpec

            check = jax.shard_map(check, mesh=self.mesh, in_specs=PartitionSpec("batch"),
                                  out_specs=PartitionSpec("batch"))
        zero = jnp.sum(check(jax.lax.stop_gradient(x)))
        return x + zero


def model(limit: int = 1 << 30, seed: int = 0, mesh: Any = None,
          metrics: Any = None) -> keras.Model:
    """Dense -> OutOfMemoryAbove(limit) -> Dense, Adam, mse; same initial weights per seed
    (``mesh``: the limit per device, see :class:`OutOfMemoryAbove`)."""
    # Seeded initializers (keras.utils.set_random_seed would import TensorFlow if installed)
    init = keras.initializers.GlorotUniform
    inputs = keras.Input((FEATURES,))
    h = keras.layers.Dense(16, activation="tanh", kernel_initializer=init(seed))(inputs)
    h = OutOfMemoryAbove(limit, mesh)(h)
    out = keras.layers.Dense(1, kernel_initializer=init(seed + 1))(h)
    m = keras.Model(inputs, out, name="oom_above")
    m.compile(keras.optimizers.Adam(0.01), "mse", metrics=metrics)
    return m


def data(n: int = 64, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, FEATURES)).astype("float32")
    return x, (x @ rng.normal(size=(FEATURES, 1))).astype("float32")
