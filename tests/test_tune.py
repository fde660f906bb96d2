"""batchfit.tune through the Python API, with the gradient noise scale measured on real data."""

from __future__ import annotations

import numpy as np
import pytest

from batchfit.errors import InvalidInputError
from batchfit.examples.models import seed_mlp
from batchfit.results import TuneResult, load_result
from batchfit.tf.tune import tune


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
