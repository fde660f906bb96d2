"""The gradient noise scale, statistical efficiency and goodput: pure NumPy, no TensorFlow.

The maths (McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch Training",
arXiv:1812.06162, section 2 and Appendix A):

- ``G`` is the true (full-data) gradient, ``Sigma`` the per-example gradient covariance. The
  gradient ``G_B`` of a batch of ``B`` examples drawn i.i.d. satisfies
  ``E|G_B|^2 = |G|^2 + tr(Sigma) / B``.
- Two batch sizes ``b_small < b_big`` give two equations, hence unbiased estimates of both
  unknowns from the squared norms ``s = |G_small|^2`` and ``l = |G_big|^2``::

      |G|^2      ~ (b_big * l - b_small * s) / (b_big - b_small)
      tr(Sigma)  ~ (s - l) / (1 / b_small - 1 / b_big)

- The simple noise scale is ``B_simple = tr(Sigma) / |G|^2``. Both estimates are noisy and the
  |G|^2 one can be negative, so ``B_simple`` is the *ratio of the averages* over many pairs
  (the ratio of two unbiased means is consistent; the average of per-pair ratios is not, and
  explodes whenever one pair's |G|^2 estimate is near zero).
- The critical batch size ``B_crit`` is close to ``B_simple``. Training at batch ``B`` needs
  about ``S_min (1 + B_noise / B)`` steps and ``E_min (1 + B / B_noise)`` examples: at
  ``B = B_noise`` twice the minimum of both; far above it, extra examples per step are wasted.

Statistical efficiency and goodput (Qiao et al. 2021, "Pollux: Co-adaptive Cluster Scheduling
for Goodput-Optimized Deep Learning", OSDI; AdaptDL's ``goodput.py``): relative to a base batch
``M0``, the examples needed to make the same progress grow by ``(1 + M / phi) / (1 + M0 / phi)``
with ``phi`` the noise scale, so one example at batch ``M`` is worth

    E(M) = (phi + M0) / (phi + M)          (1 at M = M0, falling towards 0 as M grows)

examples at ``M0``, and the useful progress per second is ``goodput(M) = throughput(M) * E(M)``.
``M0`` only scales goodput by a constant, so the goodput-optimal batch does not depend on it.
The model assumes the learning rate is re-tuned (scaled) with the batch: see
:func:`scale_learning_rate`.

Example:

>>> import numpy as np
>>> best = goodput_optimal_batch([32, 64, 128, 256], [1000.0, 1900.0, 3000.0, 3300.0],
...                              noise_scale=200.0)
>>> best.batch_size
128
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidInputError
from .validate import check_int

__all__ = [
    "MAX_EXAMPLES",
    "NEEDS_REAL_DATA",
    "GoodputChoice",
    "LearningRateSuggestion",
    "NoiseEstimate",
    "bootstrap_interval",
    "check_pair_sizes",
    "estimate_from_pairs",
    "goodput",
    "goodput_optimal_batch",
    "noise_scale_of_means",
    "pair_estimates",
    "scale_learning_rate",
    "statistical_efficiency",
]

#: Examples materialized from the user's data at most (``max_examples=``).
MAX_EXAMPLES = 50_000

#: Why the noise scale refuses to run without the user's data (the CLI and the API say it).
NEEDS_REAL_DATA = (
    "The gradient noise scale needs real data: it measures how much the gradients of your "
    "examples disagree with each other, and synthetic inputs (random arrays, what "
    "`batchfit max` probes with when given no data) have noise and signal unrelated to your "
    "task. Pass data=(x, y) or a tf.data.Dataset in Python, or --data path/file.py:function "
    "on the command line.")


# --------------------------------------------------------------------------------------------
# Estimators
# --------------------------------------------------------------------------------------------

def _check_batches(b_small: float, b_big: float) -> None:
    if not (np.isfinite(b_small) and np.isfinite(b_big)) or b_small <= 0 or b_big <= b_small:
        raise InvalidInputError(
            f"need 0 < b_small < b_big for the two-batch estimator; got b_small={b_small}, "
            f"b_big={b_big}")


def check_pair_sizes(small: int, big: int) -> tuple[int, int]:
    """``(small, big)`` as ints when the two-batch estimator can use them, else say which would.

    ``big`` is ``k`` micro-batches of ``small`` examples, so it must be a multiple of ``small``
    and larger.

    Raises:
        InvalidInputError: a size that is not a positive integer, or ``big`` that is not a
            larger multiple of ``small`` (the message suggests one).

    Example:

    >>> check_pair_sizes(32, 256)
    (32, 256)
    >>> check_pair_sizes(8, 20)
    Traceback (most recent call last):
    ...
    batchfit.errors.InvalidInputError: big must be a multiple of small and larger (the big batch is 3 micro-batches of small); got small=8, big=20: try big=24
    """
    small = int(check_int("small", small, minimum=1))  # type: ignore[arg-type]
    big = int(check_int("big", big, minimum=1))  # type: ignore[arg-type]
    if big <= small or big % small:
        k = max(2, -(-big // small))
        raise InvalidInputError(
            f"big must be a multiple of small and larger (the big batch is {k} micro-batches "
            f"of small); got small={small}, big={big}: try big={k * small}")
    return small, big


def pair_estimates(small_sq: Sequence[float] | np.ndarray, big_sq: Sequence[float] | np.ndarray,
                   b_small: float, b_big: float) -> tuple[np.ndarray, np.ndarray]:
    """Unbiased per-pair estimates of ``|G|^2`` and ``tr(Sigma)`` (McCandlish et al., App. A).

    Args:
        small_sq: squared gradient norms ``|G_small|^2`` measured at ``b_small``, one per pair
            (or the mean of several, which is still unbiased).
        big_sq: squared gradient norms ``|G_big|^2`` at ``b_big``, one per pair.
        b_small: the small batch size.
        b_big: the big batch size, ``> b_small``.

    Returns:
        ``(g2, trace)``: arrays with one unbiased estimate of ``|G|^2`` and of ``tr(Sigma)``
        per pair. Single values are noisy (``g2`` may be negative); average them.

    Raises:
        InvalidInputError: for batch sizes out of order or arrays of different lengths.

    Example:

    >>> g2, tr = pair_estimates([3.0], [1.5], 10, 40)   # |G|^2 = 1, tr = 20: exact values
    >>> round(float(g2[0]), 6), round(float(tr[0]), 6)
    (1.0, 20.0)
    """
    _check_batches(b_small, b_big)
    s = np.asarray(small_sq, dtype=np.float64).reshape(-1)
    big = np.asarray(big_sq, dtype=np.float64).reshape(-1)
    if s.shape != big.shape or s.size == 0:
        raise InvalidInputError(
            f"small_sq and big_sq need the same, non-zero length; got {s.size} and {big.size}")
    # E[s] = g2 + tr/b_small and E[l] = g2 + tr/b_big: solve the 2x2 linear system per pair.
    g2 = (b_big * big - b_small * s) / (b_big - b_small)
    trace = (s - big) / (1.0 / b_small - 1.0 / b_big)
    return g2, trace


def noise_scale_of_means(g2_mean: float, trace_mean: float) -> float:
    """``B_simple = tr(Sigma) / |G|^2`` from the averaged estimates; ``inf`` when ``|G|^2 <= 0``.

    A non-positive ``|G|^2`` estimate means the noise swamps the signal at the batch sizes
    measured: the noise scale is larger than they can resolve.

    Example:

    >>> noise_scale_of_means(2.0, 50.0), noise_scale_of_means(-0.1, 50.0)
    (25.0, inf)
    """
    if not (math.isfinite(g2_mean) and math.isfinite(trace_mean)):
        raise InvalidInputError(f"non-finite estimates: |G|^2={g2_mean}, tr(Sigma)={trace_mean}")
    if g2_mean <= 0:
        return math.inf
    return max(0.0, trace_mean) / g2_mean


def bootstrap_interval(g2: np.ndarray, trace: np.ndarray, *, confidence: float = 0.95,
                       resamples: int = 2000, seed: int | None = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``B_simple`` (ratio of averages), resampling pairs.

    The bootstrap works on ``1 / B_simple = mean(g2) / mean(trace)``, which stays finite when
    a resample's ``|G|^2`` mean is not positive, and maps the percentiles back (``1/x`` is
    monotone on the positive side; a non-positive bound means "unbounded above").

    Args:
        g2: per-pair ``|G|^2`` estimates (:func:`pair_estimates`).
        trace: per-pair ``tr(Sigma)`` estimates.
        confidence: the interval's nominal coverage, in (0, 1).
        resamples: bootstrap resamples.
        seed: random seed (``None``: fresh entropy).

    Returns:
        ``(low, high)``; ``high`` is ``inf`` when the data cannot bound the noise scale above.

    Raises:
        InvalidInputError: fewer than 2 pairs, a bad confidence or resample count.

    Example:

    >>> rng = np.random.default_rng(0)
    >>> lo, hi = bootstrap_interval(1 + rng.normal(0, .1, 50), 20 + rng.normal(0, 2, 50))
    >>> 15 < lo < 20 < hi < 25
    True
    """
    g2 = np.asarray(g2, dtype=np.float64).reshape(-1)
    trace = np.asarray(trace, dtype=np.float64).reshape(-1)
    n = g2.size
    if n < 2 or trace.size != n:
        raise InvalidInputError(f"the bootstrap needs at least 2 pairs of equal length; got "
                                f"{n} and {trace.size}")
    if not 0 < confidence < 1:
        raise InvalidInputError(f"confidence must be in (0, 1), got {confidence}")
    if resamples < 10:
        raise InvalidInputError(f"resamples must be >= 10, got {resamples}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    g2_means = g2[idx].mean(axis=1)
    tr_means = np.maximum(trace[idx].mean(axis=1), np.finfo(float).tiny)
    inverse = g2_means / tr_means  # 1 / B_simple, finite in every resample
    alpha = (1.0 - confidence) / 2.0
    inv_lo, inv_hi = np.quantile(inverse, [alpha, 1.0 - alpha])
    low = 1.0 / inv_hi if inv_hi > 0 else math.inf
    high = 1.0 / inv_lo if inv_lo > 0 else math.inf
    return float(low), float(high)


@dataclass(frozen=True)
class NoiseEstimate:
    """The noise scale estimated from many pairs of squared gradient norms.

    Args:
        b_simple: ``tr(Sigma) / |G|^2`` (ratio of averages); ``inf`` when the ``|G|^2``
            estimate is not positive.
        low: lower end of the bootstrap interval.
        high: upper end (``inf``: not bounded above by this data).
        confidence: the interval's nominal coverage.
        gradient_sq_norm: the average ``|G|^2`` estimate.
        trace_sigma: the average ``tr(Sigma)`` estimate (per-example gradient variance).
        pairs: how many pairs were averaged.
        b_small: the small batch size.
        b_big: the big batch size.
    """

    b_simple: float
    low: float
    high: float
    confidence: float
    gradient_sq_norm: float
    trace_sigma: float
    pairs: int
    b_small: float
    b_big: float

    @property
    def relative_halfwidth(self) -> float:
        """Half the interval's width over ``b_simple`` (``inf`` when unbounded)."""
        if not (math.isfinite(self.high) and math.isfinite(self.b_simple)) or self.b_simple == 0:
            return math.inf
        return (self.high - self.low) / 2.0 / self.b_simple


def estimate_from_pairs(small_sq: Sequence[float] | np.ndarray,
                        big_sq: Sequence[float] | np.ndarray, b_small: float, b_big: float, *,
                        confidence: float = 0.95, resamples: int = 2000,
                        seed: int | None = 0) -> NoiseEstimate:
    """Estimate ``B_simple`` and its interval from pairs of squared gradient norms.

    Args:
        small_sq: ``|G_small|^2`` per pair (at batch ``b_small``).
        big_sq: ``|G_big|^2`` per pair (at batch ``b_big``).
        b_small: the small batch size.
        b_big: the big batch size.
        confidence: coverage of the bootstrap interval (default 0.95).
        resamples: bootstrap resamples (default 2000).
        seed: seed of the bootstrap.

    Returns:
        A :class:`NoiseEstimate`.

    Raises:
        InvalidInputError: bad batch sizes, fewer than 2 pairs, non-finite norms.

    Example:

    >>> e = estimate_from_pairs([3.1, 2.9, 3.0], [1.6, 1.4, 1.5], 10, 40)
    >>> round(e.b_simple, 3)
    20.0
    """
    g2, trace = pair_estimates(small_sq, big_sq, b_small, b_big)
    if not (np.all(np.isfinite(g2)) and np.all(np.isfinite(trace))):
        raise InvalidInputError("non-finite squared gradient norms (NaN or inf): the loss or the "
                                "gradients overflow at these weights")
    g2_mean, tr_mean = float(g2.mean()), float(trace.mean())
    low, high = bootstrap_interval(g2, trace, confidence=confidence, resamples=resamples,
                                   seed=seed)
    return NoiseEstimate(b_simple=noise_scale_of_means(g2_mean, tr_mean), low=low, high=high,
                         confidence=confidence, gradient_sq_norm=g2_mean, trace_sigma=tr_mean,
                         pairs=int(g2.size), b_small=float(b_small), b_big=float(b_big))


# --------------------------------------------------------------------------------------------
# Efficiency and goodput
# --------------------------------------------------------------------------------------------

def _check_noise_scale(noise_scale: float) -> float:
    phi = float(noise_scale)
    if math.isnan(phi) or phi < 0:
        raise InvalidInputError(f"noise_scale must be >= 0 (inf allowed), got {noise_scale}")
    return phi


def statistical_efficiency(batch_sizes: Sequence[float] | np.ndarray | float, noise_scale: float,
                           base_batch: float) -> np.ndarray:
    """Pollux's statistical efficiency ``E(M) = (phi + M0) / (phi + M)``.

    The value of one example at batch ``M`` in examples at the base batch ``M0``, when the
    learning rate is scaled with the batch. In (0, 1] for ``M >= M0`` and falling with ``M``;
    above 1 for ``M < M0`` (smaller batches use examples better). ``phi = inf`` (noise
    dominates) gives 1 everywhere; ``phi = 0`` (no noise) gives ``M0 / M``.

    Args:
        batch_sizes: ``M``, one or many positive batch sizes.
        noise_scale: ``phi``, the gradient noise scale ``B_simple`` (>= 0, ``inf`` allowed).
        base_batch: ``M0``, the batch the efficiency is relative to (> 0).

    Returns:
        An array of efficiencies, the shape of ``batch_sizes``.

    Raises:
        InvalidInputError: non-positive batch sizes or a negative/NaN noise scale.

    Example:

    >>> statistical_efficiency([32, 64, 128], noise_scale=32.0, base_batch=32).tolist()
    [1.0, 0.6666666666666666, 0.4]
    """
    m = np.asarray(batch_sizes, dtype=np.float64)
    phi = _check_noise_scale(noise_scale)
    m0 = float(base_batch)
    if not np.all(m > 0) or not m0 > 0:
        raise InvalidInputError(f"batch sizes must be positive; got {batch_sizes!r} and "
                                f"base_batch={base_batch!r}")
    if math.isinf(phi):
        return np.ones_like(m)
    return (phi + m0) / (phi + m)


def goodput(batch_sizes: Sequence[float] | np.ndarray, throughputs: Sequence[float] | np.ndarray,
            noise_scale: float, base_batch: float) -> np.ndarray:
    """``goodput(M) = throughput(M) * E(M)``: examples per second, in examples at ``M0``.

    Args:
        batch_sizes: the batch sizes ``M``.
        throughputs: training examples per second measured at each batch size.
        noise_scale: ``B_simple`` (see :func:`statistical_efficiency`).
        base_batch: ``M0``.

    Returns:
        The goodput at each batch size.

    Example:

    >>> goodput([32, 64], [100.0, 180.0], noise_scale=32.0, base_batch=32).tolist()
    [100.0, 120.0]
    """
    t = np.asarray(throughputs, dtype=np.float64)
    m = np.asarray(batch_sizes, dtype=np.float64)
    if t.shape != m.shape:
        raise InvalidInputError(f"one throughput per batch size needed; got {t.size} "
                                f"throughputs for {m.size} batch sizes")
    if not np.all(np.isfinite(t)) or np.any(t < 0):
        raise InvalidInputError("throughputs must be finite and >= 0 (examples per second)")
    return t * statistical_efficiency(m, noise_scale, base_batch)


@dataclass(frozen=True)
class GoodputChoice:
    """The goodput-optimal batch among measured ones, with the curves that decided it.

    Args:
        batch_size: the batch with the highest goodput (the smallest such on ties).
        index: its position in ``batch_sizes``.
        batch_sizes: the candidate sizes, ascending.
        throughputs: examples per second at each size.
        efficiency: ``E(M)`` at each size.
        goodput: ``throughput * E`` at each size.
        noise_scale: the ``B_simple`` used.
        base_batch: the ``M0`` used.
        throughput_best: the batch with the highest raw throughput, for comparison.
    """

    batch_size: int
    index: int
    batch_sizes: tuple[int, ...]
    throughputs: tuple[float, ...]
    efficiency: tuple[float, ...]
    goodput: tuple[float, ...]
    noise_scale: float
    base_batch: float
    throughput_best: int


def goodput_optimal_batch(batch_sizes: Sequence[int] | np.ndarray,
                          throughputs: Sequence[float] | np.ndarray, noise_scale: float,
                          base_batch: float | None = None, *,
                          max_batch: int | None = None) -> GoodputChoice:
    """The batch size that maximizes goodput among the measured ones.

    Only measured sizes are candidates (no extrapolation of the throughput curve), so the
    answer lies between the smallest size given and the largest one ``<= max_batch``.

    Args:
        batch_sizes: batch sizes whose throughput was measured (any order, no duplicates).
        throughputs: training examples per second at each size.
        noise_scale: the gradient noise scale ``B_simple`` (>= 0; ``inf`` means noise
            dominates, so goodput is raw throughput).
        base_batch: ``M0`` of the efficiency; default the smallest batch size. It only scales
            the goodput; the choice does not depend on it.
        max_batch: drop candidates above this size (e.g. the largest that fits the memory).

    Returns:
        A :class:`GoodputChoice` (curves sorted by batch size).

    Raises:
        InvalidInputError: empty or mismatched inputs, duplicates, no candidate <= max_batch.

    Example:

    >>> c = goodput_optimal_batch([64, 128, 256], [2000.0, 3800.0, 4000.0], noise_scale=100.0)
    >>> c.batch_size, c.throughput_best
    (128, 256)
    """
    m = np.asarray(batch_sizes, dtype=np.float64).reshape(-1)
    t = np.asarray(throughputs, dtype=np.float64).reshape(-1)
    if m.size == 0 or m.size != t.size:
        raise InvalidInputError(f"need one throughput per batch size, at least one; got "
                                f"{m.size} sizes and {t.size} throughputs")
    if not np.all(np.isfinite(m)) or np.any(m < 1) or np.any(m != np.round(m)):
        raise InvalidInputError(f"batch sizes must be positive integers; got {list(batch_sizes)}")
    if np.unique(m).size != m.size:
        raise InvalidInputError(f"duplicate batch sizes in {list(batch_sizes)}")
    order = np.argsort(m)
    m, t = m[order], t[order]
    if max_batch is not None:
        keep = m <= max_batch
        if not keep.any():
            raise InvalidInputError(f"no measured batch size is <= max_batch={max_batch}")
        m, t = m[keep], t[keep]
    m0 = float(m[0]) if base_batch is None else float(base_batch)
    eff = statistical_efficiency(m, noise_scale, m0)
    good = t * eff
    if not np.all(np.isfinite(good)) or np.any(t < 0):
        raise InvalidInputError("throughputs must be finite and >= 0 (examples per second)")
    best = int(np.argmax(good))  # argmax returns the first maximum: the smallest size on ties
    return GoodputChoice(
        batch_size=int(m[best]), index=best, batch_sizes=tuple(int(v) for v in m),
        throughputs=tuple(float(v) for v in t), efficiency=tuple(float(v) for v in eff),
        goodput=tuple(float(v) for v in good), noise_scale=float(noise_scale), base_batch=m0,
        throughput_best=int(m[int(np.argmax(t))]))


# --------------------------------------------------------------------------------------------
# Learning rate when the batch changes
# --------------------------------------------------------------------------------------------

#: Optimizer names (lower case, Keras class names) scaled with the square-root rule.
ADAPTIVE_OPTIMIZERS = frozenset({
    "adam", "adamw", "adamax", "nadam", "adagrad", "adadelta", "adafactor", "rmsprop", "lamb",
    "lion", "ftrl", "muon"})
#: Optimizer names scaled with the linear rule.
SGD_OPTIMIZERS = frozenset({"sgd", "momentum", "nesterov", "lars"})

_LINEAR_SOURCE = ("Goyal et al. 2017, 'Accurate, Large Minibatch SGD: Training ImageNet in 1 "
                  "Hour' (arXiv:1706.02677): multiply the learning rate by k when the batch "
                  "grows k-fold, with a few epochs of warm-up")
_SQRT_SOURCE = ("Malladi et al. 2022, 'On the SDEs and Scaling Rules for Adaptive Gradient "
                "Algorithms' (NeurIPS, arXiv:2205.10287) derive it for Adam and RMSprop: "
                "multiply the learning rate by sqrt(k) when the batch grows k-fold (proposed "
                "earlier for SGD by Krizhevsky 2014, arXiv:1404.5997, and Hoffer et al. 2017, "
                "arXiv:1705.08741)")


@dataclass(frozen=True)
class LearningRateSuggestion:
    """A suggested learning rate for a new batch size, and where the rule comes from.

    Args:
        learning_rate: the suggested value.
        rule: ``"linear"`` or ``"sqrt"``.
        factor: ``learning_rate / old learning rate``.
        source: the publication the rule comes from.
        caveat: when the rule stops holding.
    """

    learning_rate: float
    rule: str
    factor: float
    source: str
    caveat: str


def scale_learning_rate(learning_rate: float, old_batch: int, new_batch: int,
                        optimizer: str = "sgd") -> LearningRateSuggestion:
    """Suggest a learning rate for ``new_batch`` from the one tuned at ``old_batch``.

    A suggestion, not a guarantee: re-check the loss curve. Linear for SGD (with momentum),
    square root for Adam-like (adaptive) optimizers. Both rules break down above the critical
    batch size (about ``B_simple``), where a larger batch stops shortening training.

    Args:
        learning_rate: the learning rate tuned at ``old_batch`` (> 0).
        old_batch: the batch it was tuned at.
        new_batch: the batch to train at.
        optimizer: the optimizer's name or Keras class name (``"SGD"``, ``"Adam"``,
            ``"AdamW"``...), or the rule itself: ``"linear"`` / ``"sqrt"``.

    Returns:
        A :class:`LearningRateSuggestion`.

    Raises:
        InvalidInputError: non-positive values or an optimizer with no known rule.

    Example:

    >>> scale_learning_rate(0.1, 256, 1024, "SGD").learning_rate
    0.4
    >>> scale_learning_rate(1e-3, 256, 1024, "Adam").learning_rate
    0.002
    """
    if not learning_rate > 0 or old_batch < 1 or new_batch < 1:
        raise InvalidInputError(f"need learning_rate > 0 and batches >= 1; got {learning_rate}, "
                                f"{old_batch}, {new_batch}")
    name = str(optimizer).lower().replace("_", "")
    k = new_batch / old_batch
    if name in ("linear", *SGD_OPTIMIZERS):
        rule, factor, source = "linear", k, _LINEAR_SOURCE
    elif name in ("sqrt", *ADAPTIVE_OPTIMIZERS):
        rule, factor, source = "sqrt", math.sqrt(k), _SQRT_SOURCE
    else:
        raise InvalidInputError(
            f"no learning-rate scaling rule known for optimizer {optimizer!r}; pass "
            f"optimizer='linear' (SGD-like) or 'sqrt' (Adam-like)")
    caveat = ("holds below the critical batch size (about B_simple); above it, larger batches "
              "no longer shorten training and the scaled rate can diverge")
    return LearningRateSuggestion(learning_rate=learning_rate * factor, rule=rule, factor=factor,
                                  source=source, caveat=caveat)
