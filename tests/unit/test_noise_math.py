"""The noise-scale estimators, efficiency and goodput: pure NumPy, against a closed-form truth.

Ground truth: linear regression ``y = x . w* + eps`` with ``x ~ N(0, I_d)``, ``eps ~ N(0, s^2)``
and the squared loss ``l = (x . w - y)^2 / 2``. With ``delta = w - w*`` the per-example gradient
is ``g = x (x . delta - eps)``, so (Gaussian fourth moments, ``E[x x^T (x.d)^2] = |d|^2 I +
2 d d^T``):

    G = delta,   Sigma = (|delta|^2 + s^2) I + delta delta^T,
    B_simple = tr(Sigma) / |G|^2 = (d (|delta|^2 + s^2) + |delta|^2) / |delta|^2.

The per-example gradients are computed exactly in NumPy; a pair is ``k`` micro-batches of
``b_small`` fresh examples (the small norms averaged, the big gradient their mean), exactly as
:mod:`batchfit.verbs.noise` measures a model.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchfit.core.noise import (
    bootstrap_interval,
    estimate_from_pairs,
    goodput,
    goodput_optimal_batch,
    noise_scale_of_means,
    pair_estimates,
    scale_learning_rate,
    statistical_efficiency,
)
from batchfit.errors import InvalidInputError

D, SIGMA2, DELTA2 = 16, 1.0, 1.0
TRUE_B = (D * (DELTA2 + SIGMA2) + DELTA2) / DELTA2  # 33
B_SMALL, MICRO = 8, 8
B_BIG = B_SMALL * MICRO
PAIRS = 200  # the stated number of pairs for the 10% claim


def linreg_pairs(rng: np.random.Generator, pairs: int) -> tuple[np.ndarray, np.ndarray]:
    delta = np.full(D, math.sqrt(DELTA2 / D))
    x = rng.normal(size=(pairs, MICRO, B_SMALL, D))
    eps = rng.normal(scale=math.sqrt(SIGMA2), size=(pairs, MICRO, B_SMALL))
    per_example = x * (x @ delta - eps)[..., None]          # exact per-example gradients
    micro = per_example.mean(axis=2)                         # (pairs, MICRO, D)
    small_sq = (micro ** 2).sum(-1).mean(-1)
    big_sq = (micro.mean(axis=1) ** 2).sum(-1)
    return small_sq, big_sq


def test_closed_form_of_the_ground_truth_matches_a_monte_carlo_check() -> None:
    rng = np.random.default_rng(0)
    delta = np.full(D, math.sqrt(DELTA2 / D))
    x = rng.normal(size=(400_000, D))
    g = x * (x @ delta - rng.normal(size=400_000))[:, None]
    tr = g.var(axis=0).sum()
    assert tr / (g.mean(0) @ g.mean(0)) == pytest.approx(TRUE_B, rel=0.05)


def test_estimate_within_10_percent_of_the_truth_with_200_pairs() -> None:
    for seed in range(20):
        small_sq, big_sq = linreg_pairs(np.random.default_rng(seed), PAIRS)
        est = estimate_from_pairs(small_sq, big_sq, B_SMALL, B_BIG, seed=seed, resamples=500)
        assert est.b_simple == pytest.approx(TRUE_B, rel=0.10), seed
        assert est.gradient_sq_norm == pytest.approx(DELTA2, rel=0.15)
        assert est.trace_sigma == pytest.approx(D * (DELTA2 + SIGMA2) + DELTA2, rel=0.10)


def test_interval_covers_the_truth_in_at_least_90_percent_of_seeds() -> None:
    seeds, covered = 200, 0
    for seed in range(seeds):
        small_sq, big_sq = linreg_pairs(np.random.default_rng(1000 + seed), PAIRS)
        est = estimate_from_pairs(small_sq, big_sq, B_SMALL, B_BIG, seed=seed, resamples=1000)
        covered += est.low <= TRUE_B <= est.high
    assert covered / seeds >= 0.90, covered


def test_pair_estimates_are_exact_on_expected_values() -> None:
    # E|G_B|^2 = |G|^2 + tr/B with |G|^2 = 2, tr = 64
    g2, tr = pair_estimates([2 + 64 / 8], [2 + 64 / 32], 8, 32)
    assert g2[0] == pytest.approx(2.0) and tr[0] == pytest.approx(64.0)


def test_ratio_of_averages_not_average_of_ratios() -> None:
    g2 = np.array([1.0, 0.01])
    tr = np.array([10.0, 10.0])
    assert noise_scale_of_means(g2.mean(), tr.mean()) == pytest.approx(10 / 0.505)


def test_unresolvable_noise_is_infinite_and_unbounded() -> None:
    assert noise_scale_of_means(-1.0, 5.0) == math.inf
    rng = np.random.default_rng(0)
    lo, hi = bootstrap_interval(rng.normal(0, 1, 30), 5 + rng.normal(0, 0.1, 30))
    assert hi == math.inf and lo > 0


@pytest.mark.parametrize("call", [
    lambda: pair_estimates([1.0], [1.0], 8, 8),
    lambda: pair_estimates([1.0, 2.0], [1.0], 8, 16),
    lambda: bootstrap_interval(np.ones(1), np.ones(1)),
    lambda: bootstrap_interval(np.ones(5), np.ones(5), confidence=1.5),
    lambda: estimate_from_pairs([np.nan, 1.0], [1.0, 1.0], 8, 16),
    lambda: statistical_efficiency([0, 8], 10.0, 8),
    lambda: statistical_efficiency([8], -1.0, 8),
    lambda: goodput([8, 16], [1.0], 10.0, 8),
    lambda: goodput_optimal_batch([], [], 10.0),
    lambda: goodput_optimal_batch([8, 8], [1.0, 2.0], 10.0),
    lambda: goodput_optimal_batch([8, 16], [1.0, 2.0], 10.0, max_batch=4),
    lambda: scale_learning_rate(0.1, 32, 64, "mystery"),
])
def test_bad_input_raises_invalid_input_error(call) -> None:
    with pytest.raises(InvalidInputError):
        call()


# -- property tests -----------------------------------------------------------------------------

sizes = st.lists(st.integers(1, 1 << 16), min_size=1, max_size=12, unique=True)
phis = st.one_of(st.floats(0, 1e7, allow_nan=False), st.just(math.inf))


@settings(max_examples=300, deadline=None)
@given(sizes, phis, st.integers(1, 1 << 16))
def test_efficiency_in_0_1_and_decreasing_above_the_base(batches, phi, base) -> None:
    m = np.sort(np.array(batches + [base], dtype=float))
    m = m[m >= base]
    eff = statistical_efficiency(m, phi, base)
    assert np.all(eff > 0) and np.all(eff <= 1.0 + 1e-12)
    assert np.all(np.diff(eff) <= 1e-12)
    assert eff[0] == pytest.approx(1.0)


@settings(max_examples=300, deadline=None)
@given(sizes, st.data(), phis)
def test_goodput_optimal_batch_between_smallest_probed_and_largest_fitting(batches, data, phi):
    thr = data.draw(st.lists(st.floats(0, 1e6, allow_nan=False), min_size=len(batches),
                             max_size=len(batches)))
    largest_fitting = data.draw(st.sampled_from(sorted(batches)))
    c = goodput_optimal_batch(batches, thr, phi, max_batch=largest_fitting)
    assert min(batches) <= c.batch_size <= largest_fitting
    assert c.batch_size in batches
    assert max(c.goodput) == c.goodput[c.index]


@settings(max_examples=100, deadline=None)
@given(sizes, st.data(), st.floats(0.1, 1e6), st.integers(1, 1 << 16))
def test_choice_does_not_depend_on_the_base_batch(batches, data, phi, base) -> None:
    thr = data.draw(st.lists(st.floats(1, 1e6), min_size=len(batches), max_size=len(batches)))
    a = goodput_optimal_batch(batches, thr, phi)
    b = goodput_optimal_batch(batches, thr, phi, base_batch=base)
    assert a.batch_size == b.batch_size or math.isclose(
        a.goodput[a.index] / a.goodput[b.index], 1.0, rel_tol=1e-9)


def test_goodput_limits() -> None:
    batches, thr = [32, 64, 128, 256], [1000.0, 1900.0, 3000.0, 3300.0]
    assert goodput_optimal_batch(batches, thr, math.inf).batch_size == 256  # raw throughput
    assert goodput_optimal_batch(batches, thr, 0.0).batch_size == 32         # steps/s only
    assert goodput_optimal_batch(batches, thr, 200.0).batch_size == 128
    c = goodput_optimal_batch(batches, thr, 200.0)
    assert c.efficiency[0] == 1.0 and c.goodput[0] == 1000.0


def test_learning_rate_rules_and_sources() -> None:
    sgd = scale_learning_rate(0.1, 128, 512, "SGD")
    assert sgd.rule == "linear" and sgd.learning_rate == pytest.approx(0.4)
    assert "Goyal" in sgd.source
    adam = scale_learning_rate(1e-3, 128, 512, "AdamW")
    assert adam.rule == "sqrt" and adam.learning_rate == pytest.approx(2e-3)
    assert "Malladi" in adam.source
    assert scale_learning_rate(1.0, 64, 16, "sqrt").factor == pytest.approx(0.5)


def test_result_round_trip_and_render_without_tensorflow() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from rich.console import Console\n"
        "from batchfit.results import NoiseScaleResult, NoisePair, load_result\n"
        "from batchfit.report import render\n"
        "r = NoiseScaleResult(b_simple=float('inf'), low=10.0, high=float('inf'),\n"
        "    confidence=0.95, gradient_sq_norm=-0.1, trace_sigma=3.0, small_batch=8,\n"
        "    big_batch=64, pairs=[NoisePair(1.0, 0.5, 0.4, 4.0)])\n"
        "back = load_result(r.to_json())\n"
        "assert back.b_simple is None and back.high is None and back.pairs == r.pairs\n"
        "render(back, Console(width=100, color_system=None))\n"
        "assert 'tensorflow' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "too large to resolve" in proc.stdout
