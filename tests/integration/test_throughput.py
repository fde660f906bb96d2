"""profile_throughput on real tiny Keras models: warm-up excluded, steps adapted, model untouched.

A size that runs out of memory under a real allocator cap needs a capped child process: that
test is in tests/process/test_throughput_capped.py."""

from __future__ import annotations

import math
import statistics
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import batchfit
from batchfit.backend.tensorflow.probe import ModelState
from batchfit.core.throughput import knee
from batchfit.errors import InvalidInputError
from batchfit.examples.models import demo_model, seed_mlp
from batchfit.verbs.throughput import profile_throughput


@pytest.fixture(scope="module")
def mlp_run():
    # A small conv net (the seed's layers on top): its step time grows with the batch.
    model = demo_model(image_size=16, filters=8)
    state = ModelState(model)
    result = profile_throughput(model, [1, 4, 64, 256], window_seconds=0.15, windows=3,
                                max_windows=3)
    return model, state, result


def test_every_size_is_measured_with_windows(mlp_run) -> None:
    _, _, r = mlp_run
    assert [p.batch_size for p in r.points] == [1, 4, 64, 256]
    for p in r.points:
        assert p.outcome == "ok", p.detail
        assert len(p.window_seconds) == 3
        assert p.low <= p.samples_per_second <= p.high
        # the reported throughput is the median window's, not a mean including warm-up
        rates = sorted(p.batch_size * p.steps_per_window / t for t in p.window_seconds)
        assert p.samples_per_second == pytest.approx(rates[1])


def test_warm_up_and_tracing_are_excluded(mlp_run) -> None:
    _, _, r = mlp_run
    first = r.points[0]
    # the general step (None batch, as fit runs it) is traced before any size is timed ...
    assert r.trace_seconds > 5 * first.step_seconds
    assert r.trace_seconds < r.seconds
    # ... and each size's untimed warm-up pays for its own iterator's tracing
    assert first.warmup_seconds > 5 * first.step_seconds
    assert first.warmup_seconds >= first.first_step_seconds
    # ... none of that time is in the windows
    assert max(first.window_seconds) < first.warmup_seconds * first.steps_per_window + 1
    assert all(p.warmup_steps >= 2 for p in r.points)


def test_step_count_adapts_to_the_step_time(mlp_run) -> None:
    # How close each window comes to its target wall time depends on the machine's load: that
    # is a benchmark figure (bench/bench_tune.py), not asserted here.
    _, _, r = mlp_run
    small, large = r.points[0], r.points[-1]
    assert small.step_seconds < large.step_seconds
    assert small.steps_per_window > large.steps_per_window


def test_model_state_is_restored_exactly(mlp_run) -> None:
    _, state, _ = mlp_run
    assert state.equals_current()


def test_the_metric_totals_of_a_trained_model_are_restored() -> None:
    model = seed_mlp()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, *model.input_shape[1:])).astype("float32")
    y = rng.normal(size=(32, 1)).astype("float32")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)  # the loss tracker holds the totals
    state = ModelState(model)
    assert any(np.any(v.numpy()) for m in model.metrics for v in m.variables)
    profile_throughput(model, [4, 8], window_seconds=0.02, windows=2, max_windows=2)
    assert state.equals_current()   # every variable, metric totals included


def test_knee_and_cpu_gpu_note(mlp_run) -> None:
    _, _, r = mlp_run
    assert r.knee in [p.batch_size for p in r.points]
    best = max(p.samples_per_second for p in r.points)
    low, high = r.knee_range
    assert r.knee == low <= high
    sizes = [p.batch_size for p in r.points]
    rates = [p.samples_per_second for p in r.points]
    assert low <= knee(sizes, rates, tolerance=r.tolerance) <= high
    assert best > 0 and r.machine_drift is not None and -1 < r.machine_drift < math.inf
    assert r.gpu_metrics.startswith("not available")  # CPU: says so, does not guess
    assert all(p.gpu_utilization is None for p in r.points)


def test_windows_go_on_until_the_median_is_known_to_the_target() -> None:
    model = demo_model(image_size=8, filters=4)
    # An unreachable target: every size runs to the most windows allowed ...
    strict = profile_throughput(model, [2, 16], window_seconds=0.04, windows=2, max_windows=7,
                                target_error=1e-9)
    assert [len(p.window_seconds) for p in strict.points] == [7, 7]
    # ... a target any two windows meet: the fewest; the default allows three times as many.
    loose = profile_throughput(model, [2, 16], window_seconds=0.04, windows=3, target_error=10.0)
    assert [len(p.window_seconds) for p in loose.points] == [3, 3]
    for p in strict.points + loose.points:
        rates = [p.batch_size * p.steps_per_window / t for t in p.window_seconds]
        assert p.samples_per_second == pytest.approx(statistics.median(rates))
        assert 0 < p.median_error < 1


def test_default_grid_goes_up_to_the_largest_fit() -> None:
    r = profile_throughput(demo_model(image_size=8, filters=4), max_batch=20, window_seconds=0.05,
                           windows=2)
    assert [p.batch_size for p in r.points] == [1, 2, 4, 8, 16, 20]


def test_a_failing_size_is_reported_not_raised() -> None:
    from batchfit.examples.models import seed_memory_aware

    r = profile_throughput(seed_memory_aware(), [8, 256], window_seconds=0.05, windows=2)
    by = {p.batch_size: p for p in r.points}
    assert by[8].outcome == "ok"
    assert by[256].outcome == "failed" and by[256].detail


@pytest.mark.parametrize("kwargs, word", [
    ({"batch_sizes": [0, 4]}, "batch_sizes"),
    ({"batch_sizes": [4], "windows": 1}, "windows"),
    ({"batch_sizes": [4], "windows": 4, "max_windows": 3}, "max_windows"),
    ({"batch_sizes": [4], "target_error": 0}, "target_error"),
    ({"batch_sizes": [4], "window_seconds": 0}, "window_seconds"),
    ({"batch_sizes": [4], "tolerance": 1.5}, "tolerance"),
    ({"max_batch": 0}, "max_batch"),
    ({"max_batch": 5, "granularity": 8}, "max_batch must be an integer >= granularity"),
    ({"max_batch": 16, "granularity": 0}, "granularity"),
])
def test_bad_arguments_are_named(kwargs, word) -> None:
    with pytest.raises(InvalidInputError, match=word):
        profile_throughput(seed_mlp(), **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"target_error": 0}, "target_error must be a fraction > 0 (e.g. 0.02 for 2%), got 0"),
    ({"tolerance": 1.5}, "tolerance must be a fraction in [0, 1), e.g. 0.05, got 1.5"),
])
def test_timing_argument_messages_keep_their_words(kwargs, message) -> None:
    for verb in (lambda: profile_throughput(seed_mlp(), [4], **kwargs),
                 lambda: batchfit.tune(seed_mlp, memory="64MiB", **kwargs)):
        with pytest.raises(InvalidInputError) as err:
            verb()
        assert str(err.value) == message


def test_tune_target_message_keeps_its_words() -> None:
    with pytest.raises(InvalidInputError) as err:
        batchfit.tune(seed_mlp, memory="64MiB", target=0)
    assert str(err.value) == "target batch size must be an integer >= 1, got 0"


def test_numpy_numbers_are_taken_and_the_results_still_save() -> None:
    from batchfit.results import load_result

    fast = {"window_seconds": 0.02, "windows": np.int64(2), "max_windows": np.int64(2)}
    r = profile_throughput(seed_mlp(), max_batch=np.int64(8), granularity=np.int64(4),
                           warmup_steps=np.int64(1), **fast)
    assert [p.batch_size for p in r.points] == [4, 8]
    assert load_result(r.to_json()) == r
    t = batchfit.tune(seed_mlp(), memory="64MiB", isolate="none", upper=np.int64(16),
                      granularity=np.int64(4), target=np.int64(32), **fast)
    assert t.target is not None and t.target.target == 32
    assert load_result(t.to_json()) == t


def test_not_a_model_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="keras.Model"):
        profile_throughput(np.zeros(3), [4])


class _Sleep(keras.layers.Layer):
    """Makes every training step take at least ``seconds`` (a known step time)."""

    def __init__(self, seconds: float, **kwargs):
        super().__init__(**kwargs)
        self.seconds = seconds

    def call(self, x):
        def wait(v):
            time.sleep(self.seconds)
            return v

        y = tf.py_function(wait, [x], x.dtype)
        y.set_shape(x.shape)
        return y


def test_steps_per_execution_counts_every_step_a_call_runs() -> None:
    # With steps_per_execution=4 each call of the train function runs 4 steps (as in fit):
    # throughput and step time count steps, not calls.
    inp = keras.Input((4,))
    model = keras.Model(inp, keras.layers.Dense(1)(_Sleep(0.02)(inp)))
    model.compile("sgd", "mse", steps_per_execution=4)
    state = ModelState(model)
    r = profile_throughput(model, [8], window_seconds=0.2, windows=2, max_windows=2)
    p = r.points[0]
    assert p.outcome == "ok", p.detail
    assert 0.02 <= p.step_seconds < 0.05     # one step: 20 ms of sleep (not 4 x 20 ms)
    assert p.steps_per_window % 4 == 0       # whole calls of 4 steps each
    assert p.samples_per_second > 8 / 0.05
    rates = [p.batch_size * p.steps_per_window / t for t in p.window_seconds]
    assert p.samples_per_second == pytest.approx(statistics.median(rates))
    assert state.equals_current()


def test_a_model_with_lists_of_inputs_and_outputs() -> None:
    a, b = keras.Input((4,)), keras.Input((3,))
    h = keras.layers.Concatenate()([a, b])
    model = keras.Model([a, b], [keras.layers.Dense(1)(h),
                                 keras.layers.Dense(3, activation="softmax")(h)])
    model.compile("adam", ["mse", "sparse_categorical_crossentropy"])
    state = ModelState(model)
    rng = np.random.default_rng(0)
    x = [rng.normal(size=(64, 4)).astype("float32"), rng.normal(size=(64, 3)).astype("float32")]
    y = [rng.normal(size=(64, 1)).astype("float32"), rng.integers(0, 3, size=(64,))]
    for data in (None, (x, y)):   # synthesized, and the user's own arrays
        r = profile_throughput(model, [4, 16], data=data, window_seconds=0.02,
                               windows=2, max_windows=2)
        assert [(p.batch_size, p.outcome, p.detail) for p in r.points] == [
            (4, "ok", ""), (16, "ok", "")]
        assert r.knee in (4, 16)
    assert state.equals_current()
