"""Measure the gradient noise scale of a Keras model on the user's data, without training it.

How (the estimator's maths is in :mod:`batchfit.core.noise`): one *pair* draws ``big`` examples
at random (with replacement, i.i.d. from the user's examples, as the formula assumes), splits
them into ``k = big / small`` micro-batches of ``small`` examples and computes the gradient of
the model's own compiled loss (``model.compute_loss``, regularization losses included) on
each, in training mode. The mean of the ``k`` squared micro-batch norms estimates
``E|G_small|^2``; the squared norm of the micro-batch gradients' mean is ``|G_big|^2``, the
gradient of the whole big batch for a loss that averages over examples (Keras' default
``"sum_over_batch_size"`` reduction). So a pair costs one forward and backward pass over
``big`` examples, with the memory of ``small`` examples, and no optimizer update.

The model is left exactly as it was: training-mode calls update BatchNorm statistics and
random-seed states, so every variable is snapshot before and assigned back after
(:meth:`batchfit.backend.Backend.gradient_norm_pairs`, on TensorFlow in
:mod:`batchfit.backend.tensorflow.noise`, with the training-time monitor
``batchfit.NoiseScaleMonitor``).

Caveats: layers that mix examples (BatchNorm in training) make a micro-batch's gradient depend
on its batch mates, which the formula ignores; a loss that sums instead of averaging scales
the gradients with the batch and breaks the big-batch identity; the noise scale of the raw
gradient is the one McCandlish et al. call ``B_simple`` (no Hessian or optimizer
preconditioning), and it grows as training progresses, so a value measured at initialization
is a lower bound for later training.
"""

from __future__ import annotations

import math
import time
from typing import Any

from ..backend import get_backend
from ..core.noise import (
    MAX_EXAMPLES,
    NEEDS_REAL_DATA,
    check_pair_sizes,
    estimate_from_pairs,
    pair_estimates,
)
from ..core.validate import check_int
from ..errors import InvalidInputError
from ..results import NoisePair, NoiseScaleResult
from .resolve import resolve


def estimate_noise_scale(model: Any, data: Any, *, small: int = 32, big: int = 256,
                         steps: int = 32, confidence: float = 0.95, seed: int = 0,
                         max_examples: int = MAX_EXAMPLES) -> NoiseScaleResult:
    """Measure the gradient noise scale ``B_simple`` of a model on your data.

    Computes gradients of the model's compiled loss on random batches of your examples at two
    batch sizes and estimates ``B_simple = tr(Sigma) / |G|^2`` (McCandlish et al. 2018), the
    batch size above which larger batches stop paying for themselves (about the critical
    batch). The model's weights, optimizer and every other variable are left unchanged.

    Cost: ``steps`` forward and backward passes over ``big`` examples (``steps * big``
    examples), with the memory of ``small`` examples and no optimizer update.

    Args:
        model: a compiled ``keras.Model``, a zero-argument function returning one, or a model
            spec (``path/file.py:factory``, ``package.module:factory``, ``model.keras``).
        data: your real data: ``(x, y)`` arrays, a ``tf.data.Dataset``, a
            ``keras.utils.PyDataset``, or a data spec (``path/file.py:function``). Required:
            synthetic data says nothing about your task's noise scale.
        small: the small batch size, one micro-batch (default 32).
        big: the big batch size, a multiple of ``small`` (default 256).
        steps: how many pairs to measure (default 32); the interval narrows as
            ``1/sqrt(steps)``.
        confidence: coverage of the bootstrap interval (default 0.95).
        seed: seed of the example draws and the bootstrap.
        max_examples: how many examples of the data to read at most (default 50000).

    Returns:
        A :class:`batchfit.results.NoiseScaleResult`.

    Raises:
        InvalidInputError: no data, a model that is not compiled, bad sizes, fewer than 2
            steps, non-finite gradients.

    Example:

    >>> import keras, numpy as np
    >>> import batchfit
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    >>> model.compile("sgd", "mse")
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(512, 4)); y = x.sum(1, keepdims=True) + rng.normal(size=(512, 1))
    >>> r = batchfit.estimate_noise_scale(model, (x, y), small=8, big=64, steps=8)
    >>> r.b_simple > 0
    True
    """
    t0 = time.perf_counter()
    if data is None:
        raise InvalidInputError(NEEDS_REAL_DATA)
    backend = get_backend()
    model = resolve(model, build=True).model
    small, big = check_pair_sizes(small, big)
    steps = int(check_int("steps (pairs)", steps, minimum=2,  # type: ignore[arg-type]
                          hint="the interval needs several pairs: 32 or more is good"))
    sampler = backend.example_sampler(data, max_examples=max_examples, seed=seed)
    notes = list(sampler.notes)
    if sampler.num_examples < big:
        notes.append(f"only {sampler.num_examples} examples for a big batch of {big}: "
                     "examples repeat within a batch (the estimate is for this sample)")
    small_sq, big_sq = backend.gradient_norm_pairs(model, sampler, small=small, big=big,
                                                   count=steps)
    est = estimate_from_pairs(small_sq, big_sq, small, big, confidence=confidence, seed=seed)
    g2, trace = pair_estimates(small_sq, big_sq, small, big)
    notes += _estimate_notes(est, backend.mixes_examples(model))
    pairs = [NoisePair(small_sq_norm=float(s), big_sq_norm=float(b), gradient_sq_norm=float(g),
                       trace_sigma=float(t)) for s, b, g, t in zip(small_sq, big_sq, g2, trace)]

    def finite(v: float) -> float | None:  # inf is saved as null; keep memory and JSON alike
        return v if math.isfinite(v) else None

    return NoiseScaleResult(
        b_simple=finite(est.b_simple), low=finite(est.low), high=finite(est.high),
        confidence=confidence,
        gradient_sq_norm=est.gradient_sq_norm, trace_sigma=est.trace_sigma,
        small_batch=int(small), big_batch=int(big), pairs=pairs,
        seconds=time.perf_counter() - t0, examples=sampler.num_examples,
        model_name=str(getattr(model, "name", "")),
        optimizer=type(getattr(model, "optimizer", None)).__name__, notes=notes,
        environment=backend.environment_info())


def _estimate_notes(est: Any, mixes_examples: bool) -> list[str]:
    """What the user should know about an estimate: a wide interval, BatchNorm, no variance."""
    notes = []
    if est.high == math.inf or est.relative_halfwidth > 0.5:
        notes.append("the interval is wide: measure more pairs (steps=) or a larger big batch")
    if mixes_examples:
        notes.append("the model has BatchNormalization: a micro-batch's gradient depends on "
                     "its batch mates, which the noise-scale formula ignores")
    if est.trace_sigma <= 1e-12 * max(abs(est.gradient_sq_norm), 1e-30):
        notes.append("the examples' gradients barely differ (tr(Sigma) ~ 0): are these real, "
                     "varied examples, or copies of one?")
    return notes


__all__ = ["MAX_EXAMPLES", "estimate_noise_scale"]
