"""batchfit.tune through the Python API, with the gradient noise scale measured on real data."""

from __future__ import annotations

import numpy as np
import pytest

from batchfit.errors import InvalidInputError
from batchfit.examples.models import seed_mlp
from batchfit.results import TuneResult, load_result
from batchfit.verbs.tune import tune


def regression_data(n: int = 2048, features: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, features)).astype("float32")
    w = rng.standard_normal((features, 1)).astype("float32")
    y = x @ w + 0.5 * rng.standard_normal((n, 1)).astype("float32")
    return x, y


@pytest.mark.slow
def test_tune_weighs_the_noise_scale_measured_on_real_data() -> None:
    r = tune(seed_mlp, memory="64MiB", data=regression_data(), upper=256,
             noise_scale="estimate", window_seconds=0.05, windows=2)
    assert isinstance(r, TuneResult)
    assert r.noise is not None and r.noise.b_simple is not None and r.noise_scale is not None
    assert r.recommendation.decided_by in ("goodput", "memory")
    assert {v.criterion for v in r.recommendation.verdicts} >= {"memory", "throughput", "goodput"}
    assert 1 <= r.batch_size <= r.max_batch.max_batch_size
    assert len(r.goodput) == len(r.throughput.measured())
    again = load_result(r.to_json())
    assert again == r


def test_estimating_the_noise_scale_needs_real_data() -> None:
    with pytest.raises(InvalidInputError, match="real data"):
        tune(seed_mlp, memory="64MiB", noise_scale="estimate")


def test_bad_noise_scale_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="noise_scale"):
        tune(seed_mlp, memory="64MiB", noise_scale="lots")


@pytest.mark.parametrize("kwargs, words", [
    ({"noise_scale": -3.0}, "noise_scale must be a positive number"),
    ({"noise_scale": True}, "noise_scale must be a positive number"),
    ({"windows": 1}, "windows must be an integer >= 2"),
    ({"window_seconds": 0}, "window_seconds must be > 0"),
    ({"max_windows": 3, "windows": 5}, "max_windows must be an integer >= windows"),
    ({"target_error": -0.1}, "target_error"),
    ({"batch_sizes": [32, 0]}, "batch_sizes must be positive integers"),
])
def test_bad_input_is_refused_before_any_probe(kwargs, words) -> None:
    probes: list = []
    with pytest.raises(InvalidInputError, match=words):
        tune(seed_mlp, memory="64MiB", on_probe=probes.append, **kwargs)
    assert probes == []  # refused up front, not after the memory search


def test_batch_sizes_above_the_largest_fit_are_no_candidates() -> None:
    # Unsorted, duplicated, and two sizes that do not fit (upper=32 caps the search): the
    # knee, the recommendation and the target's cost are judged among sizes that fit.
    r = tune(seed_mlp, memory="64MiB", upper=32, batch_sizes=[16, 4096, 8, 32, 16, 64],
             target=64, window_seconds=0.02, windows=2, max_windows=2)
    largest = r.max_batch.max_batch_size
    assert largest == 32
    assert [p.batch_size for p in r.throughput.points] == [8, 16, 32]
    assert any("64, 4096" in n and "above the largest batch that fits" in n for n in r.notes)
    assert r.batch_size <= largest
    rates = {p.batch_size: p.samples_per_second for p in r.throughput.points}
    assert r.target is not None and not r.target.fits
    # the split is judged against the safe size among the sizes that fit (seed_mlp's peaks are
    # flat, so its safe size may be 10% below 32 (no memory model): then 16 x 4, else 32 x 2)
    micro, steps = r.target.micro_batch, r.target.accumulation_steps
    assert micro in rates and micro * steps == 64 and micro <= r.max_batch.safe_batch_size
    assert (micro, steps) == ((32, 2) if r.max_batch.safe_batch_size >= 32 else (16, 4))
    assert r.target.relative_to_best == pytest.approx(rates[micro] / max(rates.values()))


def test_batch_sizes_may_be_any_iterable_of_integers() -> None:
    # a generator is read once (checked up front, then timed); numpy integers are integers
    r = tune(seed_mlp, memory="64MiB", upper=16, batch_sizes=(b for b in np.array([16, 4])),
             window_seconds=0.02, windows=2, max_windows=2)
    assert [p.batch_size for p in r.throughput.points] == [4, 16]
    assert all(type(p.batch_size) is int for p in r.throughput.points)
