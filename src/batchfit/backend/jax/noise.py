"""Per-example (micro-batch) gradient norms on JAX, for the gradient noise scale.

Same measurement as :mod:`batchfit.backend.tensorflow.noise`: one pair draws ``big`` examples,
splits them into ``k = big / small`` micro-batches, takes the gradient of the model's compiled
loss (``model.stateless_call`` and ``model.stateless_compute_loss``, what Keras's JAX trainer
differentiates in ``compute_loss_and_updates``, without the optimizer's loss scaling;
regularization included, training mode) on each, and returns ``(mean_k |g_k|^2, |mean_k g_k|^2)``.

Where JAX makes it cheap, the ``k`` gradients are one compiled call: ``jax.vmap`` of
``jax.grad`` over the micro-batch axis. That is exact when a forward pass updates no state
(no ``BatchNormalization`` statistics, no dropout seed): every micro-batch sees the same
variables. A model with non-trainable state runs the micro-batches one after the other,
threading that state as training would (each dropout mask new). Either way the model's own
variables are never written: the functions are stateless.

Example:

>>> import numpy as np, keras
>>> from batchfit.backend.keras_common.sampler import ExampleSampler
>>> m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, kernel_initializer="zeros")])
>>> m.compile("sgd", "mse")
>>> s = ExampleSampler((np.ones((8, 2), "float32"), np.ones((8, 1), "float32")))
>>> small, big = gradient_norm_pairs(m, s, small=2, big=4, count=1)
>>> round(float(small[0]), 3), round(float(big[0]), 3)  # every example alike: equal norms
(12.0, 12.0)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...core.noise import check_pair_sizes
from ...errors import InvalidInputError
from .compiled import build_state


class JaxGradientNormMeter:
    """Pairs of squared gradient norms (small, big) on one model, writing nothing.

    Args:
        model: a compiled Keras model (JAX backend).
        small: examples per micro-batch.
        big: examples per pair (a multiple of ``small``).
        x1, y1: one example, to build the model's state before the first pair.
    """

    def __init__(self, model: Any, small: int, big: int, x1: Any, y1: Any) -> None:
        import jax

        check_pair_sizes(small, big)
        self.model, self.small, self.big = model, int(small), int(big)
        self.micro = self.big // self.small
        build_state(model, x1, y1)
        if not model.trainable_variables:
            raise InvalidInputError("The model has no trainable weights: it has no gradient.")
        #: Whether the micro-batches' gradients are one vmapped call (no state to thread).
        self.vectorized = not model.non_trainable_variables

        kwargs = {"training": True} if model._call_has_training_arg else {}

        def loss(trainable: Any, non_trainable: Any, metrics: Any, x: Any, y: Any) -> Any:
            # compute_loss_and_updates without the optimizer's loss scaling: the gradient of
            # the compiled loss itself (as on TensorFlow), regularization losses included.
            y_pred, new_non_trainable, losses = model.stateless_call(
                trainable, non_trainable, x, return_losses=True, **kwargs)
            if losses:
                model._losses_override.clear()
                model._losses_override = losses
            value, _ = model.stateless_compute_loss(
                trainable, new_non_trainable, metrics, x=x, y=y, y_pred=y_pred,
                sample_weight=None, training=True)
            if losses:
                model._losses_override.clear()
            return value, new_non_trainable

        grad = jax.grad(loss, has_aux=True)
        self._grad = jax.jit(grad)
        self._vgrad = jax.jit(jax.vmap(grad, in_axes=(None, None, None, 0, 0)))

    def _flat(self, grads: Any) -> Any:
        import jax
        import jax.numpy as jnp

        leaves = [jnp.reshape(g, (g.shape[0], -1)) if self.vectorized else jnp.ravel(g)
                  for g in jax.tree_util.tree_leaves(grads)]
        return jnp.concatenate(leaves, axis=-1).astype(jnp.float64 if jax.config.x64_enabled
                                                        else jnp.float32)

    def pair(self, sampler: Any, state: tuple[Any, Any, Any]) -> tuple[float, float, Any]:
        """One pair; returns ``(small_sq, big_sq, non_trainable state after)``."""
        import jax

        trainable, non_trainable, metrics = state
        x, y = sampler.draw(self.big)
        if self.vectorized:
            split = jax.tree_util.tree_map(
                lambda a: np.reshape(a, (self.micro, self.small, *np.shape(a)[1:])), (x, y))
            grads, _ = self._vgrad(trainable, non_trainable, metrics, *split)
            flat = np.asarray(self._flat(grads), dtype=np.float64)   # (micro, params)
        else:
            rows = []
            for k in range(self.micro):
                part = jax.tree_util.tree_map(
                    lambda a, k=k: a[k * self.small:(k + 1) * self.small], (x, y))
                grads, non_trainable = self._grad(trainable, non_trainable, metrics, *part)
                rows.append(np.asarray(self._flat(grads), dtype=np.float64))
            flat = np.stack(rows)
        small_sq = float(np.mean(np.sum(flat ** 2, axis=1)))
        big_sq = float(np.sum(flat.mean(axis=0) ** 2))
        return small_sq, big_sq, non_trainable


def gradient_norm_pairs(model: Any, sampler: Any, *, small: int, big: int,
                        count: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` pairs of squared gradient norms; the model's variables are never written."""
    x1, y1 = sampler.draw(1)
    meter = JaxGradientNormMeter(model, small, big, x1, y1)
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    metrics = [v.value for v in model.metrics_variables]
    smalls, bigs = [], []
    for _ in range(count):
        s, b, non_trainable = meter.pair(sampler, (trainable, non_trainable, metrics))
        smalls.append(s)
        bigs.append(b)
    return np.array(smalls), np.array(bigs)
