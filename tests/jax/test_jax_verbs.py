"""Every verb but fit on Keras's JAX backend, on CPU, with real Keras models: check, max (from
compile-time memory: no allocator cap on CPU JAX), tune (block_until_ready, compile time
excluded) and noise (vmap of grad, against the closed form)."""

from __future__ import annotations

import numpy as np
import pytest
from noise_fixtures import linear_data, linear_model, stateful_model, true_noise_scale

import batchfit
from batchfit.backend import get_backend
from batchfit.backend.jax.noise import gradient_norm_pairs
from batchfit.backend.keras_common.sampler import ExampleSampler
from batchfit.core.settle import LIMIT_MARGIN
from batchfit.examples import models

NA = "skipped: not applicable on the jax backend"


def _values(model):
    return [np.array(v.value, copy=True) for v in model.variables]


def _unchanged(model, before) -> bool:
    return all(np.array_equal(a, np.array(v.value), equal_nan=True)
               for a, v in zip(before, model.variables))


def test_check_runs_the_neutral_checks_and_says_what_is_tensorflow_only() -> None:
    r = batchfit.check("batchfit.examples.models:seed_mlp")
    (layer,) = r.layers
    assert layer.class_name.endswith("portable.MyCustomLayer")
    for name in ("dynamic_batch", "partial_batch", "static_shape", "sample_mixing",
                 "batch_limit"):
        assert layer.statuses[name] == "ok", (name, layer.statuses, r.findings)
    assert layer.statuses["export"] == NA and layer.statuses["retracing"] == NA
    # JAX's retracing: the partial last batch compiled programs of their own, reported
    assert "one program per batch shape" in layer.details["partial_batch"]
    assert r.environment["backend"] == "jax"
    from rich.console import Console

    from batchfit.report.check import render_check

    console = Console(record=True, width=200, color_system=None)
    render_check(r, console)
    text = console.export_text()
    assert "fit traced the layer" in text and "measured with Keras on jax" in text


def test_check_finds_the_memory_aware_layers_limit() -> None:
    r = batchfit.check(models.seed_memory_aware(limit=24))
    (layer,) = r.layers
    assert layer.details["batch_limit"].startswith("24"), layer.details


def test_max_on_cpu_is_the_largest_batch_whose_compiled_step_fits() -> None:
    budget = 4 << 20
    r = batchfit.find_max_batch_size(models.seed_sequence, memory=budget, isolate="none")
    backend, model = get_backend(), models.seed_sequence()
    limit = (1 - LIMIT_MARGIN) * budget  # the runner's margin: a peak that close is no fit
    at = backend.compiled_step_memory(model, r.max_batch_size).total_bytes
    above = backend.compiled_step_memory(model, r.max_batch_size + 1).total_bytes
    assert at < limit <= above, (r.max_batch_size, at, above)
    assert all("no step ran under the budget" in p.detail for p in r.probes), r.probes
    assert "no step ran under the budget" in r.environment["memory_source"]
    assert r.environment["backend"] == "jax" and 0 < r.safe_batch_size <= r.max_batch_size


def test_tune_times_the_step_with_compile_time_excluded_and_leaves_the_model() -> None:
    model = models.seed_mlp()
    before = _values(model)
    r = batchfit.profile_throughput(model, [8, 64], window_seconds=0.05, windows=3,
                                    max_windows=3)
    assert [p.outcome for p in r.points] == ["ok", "ok"], r.points
    for p in r.points:
        assert p.first_step_seconds > 0 and "excluded" in p.detail
        assert p.samples_per_second > 0 and len(p.window_seconds) >= 3
    # the compile time is reported apart: it is the sum of the sizes' compiles
    assert r.trace_seconds == pytest.approx(sum(p.first_step_seconds for p in r.points),
                                            rel=0.5)
    assert _unchanged(model, before)


def test_gradient_norms_are_the_closed_form_of_the_same_draws() -> None:
    """Per micro-batch, the gradient of mse at w = 0, b = 0 is the mean of the examples'
    ``-2 y_i [x_i, 1]``: the pairs must be those numbers for the very examples drawn."""
    x, y = linear_data(500)
    small, big, count = 4, 16, 3
    got_small, got_big = gradient_norm_pairs(linear_model(), ExampleSampler((x, y), seed=5),
                                             small=small, big=big, count=count)
    twin = ExampleSampler((x, y), seed=5)
    twin.draw(1)  # the meter draws one example to build with first
    want_small, want_big = [], []
    for _ in range(count):
        xs, ys = twin.draw(big)
        g = -2.0 * np.c_[xs.astype(float), np.ones(big)] * ys.astype(float)
        micro = g.reshape(big // small, small, -1).mean(axis=1)
        want_small.append(np.mean(np.sum(micro ** 2, axis=1)))
        want_big.append(np.sum(micro.mean(axis=0) ** 2))
    np.testing.assert_allclose(got_small, want_small, rtol=1e-4)
    np.testing.assert_allclose(got_big, want_big, rtol=1e-4)


def test_noise_scale_matches_the_closed_form() -> None:
    x, y = linear_data()
    truth = true_noise_scale(x, y)
    r = batchfit.estimate_noise_scale(linear_model(), (x, y), small=4, big=32, steps=128)
    assert r.b_simple == pytest.approx(truth, rel=0.15)
    assert r.low <= truth <= r.high
    from rich.console import Console

    from batchfit.report.noise import render_noise

    console = Console(record=True, width=120, color_system=None)
    render_noise(r, console)
    assert "measured with Keras on jax" in console.export_text()  # the report says so


def test_noise_leaves_a_stateful_model_unchanged() -> None:
    """BatchNorm statistics and the dropout seed are threaded micro-batch to micro-batch (no
    vmap there), and never written back to the model."""
    model = stateful_model()
    x, y = linear_data(2000)
    model.fit(x, y, batch_size=64, epochs=1, verbose=0)
    before = _values(model)
    r = batchfit.estimate_noise_scale(model, (x, y), small=8, big=32, steps=4)
    assert _unchanged(model, before)
    assert np.isfinite(r.b_simple) and any("BatchNormalization" in n for n in r.notes)


def test_the_gpu_probe_path_restores_the_donated_state_even_after_a_failed_step() -> None:
    """The GPU probe (run here on CPU, where it reads no peak) donates the model's own state
    to the step, as Keras's training does; a step that fails while running (out-of-memory
    injected by a real layer, tests/jax_fit_models.py) deletes those buffers, and the probe
    puts the model back from its host copy."""
    from jax_fit_models import data, model

    from batchfit.backend.jax.probe import JaxProbeRunner

    m = model(limit=8)
    x, y = data(16)
    before = _values(m)
    runner = JaxProbeRunner(m, lambda b: (x[:b], y[:b]), steps=2, device="CPU:0",
                            budget_bytes=None)
    runner.kind = "gpu"  # the measured path
    ok, oom = runner.run(8), runner.run(16)
    assert ok.outcome == "fits" and ok.step_seconds is not None and ok.peak_bytes is None
    assert oom.outcome == "oom" and "RESOURCE_EXHAUSTED" in oom.detail
    assert _unchanged(m, before)  # readable (not deleted) and bitwise as before


def _sequence_model():
    import keras

    m = keras.Sequential([keras.Input((None, 4)), keras.layers.Dense(32),
                          keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(1)])
    m.compile("adam", "mse")
    return m


def test_max_on_cpu_compiles_for_the_users_data_when_given() -> None:
    """With data=, the compiled batch takes the data's shapes (a sequence length the model
    leaves open) and dtypes as JAX receives them (float64 arrives as float32)."""
    rng = np.random.default_rng(0)
    results = {}
    for steps, dtype in ((10, "float32"), (40, "float32"), (40, "float64")):
        x = rng.normal(size=(64, steps, 4)).astype(dtype)
        y = rng.normal(size=(64, 1)).astype(dtype)
        results[steps, dtype] = batchfit.find_max_batch_size(
            _sequence_model, memory=1 << 20, isolate="none", data=(x, y)).max_batch_size
    assert results[40, "float32"] < results[10, "float32"]     # longer sequences: fewer
    assert results[40, "float64"] == results[40, "float32"]   # float64 is float32 on JAX


def test_a_compiled_probe_judges_its_predicted_peak_by_the_shared_rule() -> None:
    """On CPU the probe's peak is the compile-time prediction; near or over the budget it is
    judged by ``core.settle.limit_outcome`` and says it was predicted, not measured."""
    from batchfit.backend.jax.probe import JaxProbeRunner
    from batchfit.core.settle import limit_outcome

    model = models.seed_mlp()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64,) + tuple(model.input_shape[1:])).astype("float32")
    y = rng.normal(size=(64,) + tuple(model.output_shape[1:])).astype("float32")
    peak = get_backend().compiled_step_memory(model, 32).total_bytes
    for budget, expected in ((peak - 1, "over_budget"), (int(peak / 0.99), "at_limit"),
                             (2 * peak, "fits")):
        runner = JaxProbeRunner(model, lambda b: (x[:b], y[:b]), device="CPU:0",
                                budget_bytes=budget)
        probe = runner.run(32)
        assert probe.peak_bytes == peak
        assert probe.outcome == expected == limit_outcome(peak, budget), probe
        assert ("predicted peak" in probe.detail) == (expected != "fits"), probe.detail
