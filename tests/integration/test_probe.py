"""In-process probes: real training steps, real allocator peaks, the caller's model untouched."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from batchfit.backend.tensorflow.probe import (
    ModelState,
    ProbeRunner,
    StepPeaks,
    metric_variable_groups,
    repeated_batches,
    state_bytes,
    train_like_fit,
)


def _model() -> keras.Model:
    keras.utils.set_random_seed(0)
    inp = keras.Input((32,))
    h = keras.layers.Dense(64, activation="relu")(inp)
    h = keras.layers.BatchNormalization()(h)  # moving statistics: non-trainable state
    h = keras.layers.Dropout(0.3)(h)          # seed-generator state
    out = keras.layers.Dense(4, activation="softmax")(h)
    m = keras.Model(inp, out)
    m.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy",
              metrics=["accuracy"])
    return m


def _batch(b: int):
    rng = np.random.default_rng(b)
    return rng.normal(size=(b, 32)).astype("float32"), rng.integers(0, 4, size=(b,))


def test_probe_leaves_every_variable_exactly_as_it_was() -> None:
    m = _model()
    m.train_on_batch(*_batch(8))  # a model that has trained already: optimizer built, iterations 1
    before = [np.array(v.numpy(), copy=True) for v in m.variables + m.optimizer.variables]
    iterations = int(m.optimizer.iterations.numpy())
    runner = ProbeRunner(m, _batch, steps=3)
    for b in (4, 64, 16):
        assert runner.run(b).fits
    after = [np.asarray(v.numpy()) for v in m.variables + m.optimizer.variables]
    assert all(np.array_equal(x, y) for x, y in zip(before, after))
    assert int(m.optimizer.iterations.numpy()) == iterations
    # and the model still trains afterwards, as it would have without probing
    ref = _model()
    ref.train_on_batch(*_batch(8))
    la = m.train_on_batch(*_batch(5))
    lb = ref.train_on_batch(*_batch(5))
    np.testing.assert_allclose(la, lb, rtol=1e-6)


def test_probe_leaves_the_metric_totals_of_a_trained_model_as_they_were() -> None:
    m = _model()
    m.fit(*_batch(32), batch_size=8, epochs=1, verbose=0)  # metrics now hold the epoch's totals
    totals = [np.array(v.numpy(), copy=True) for g in metric_variable_groups(m) for v in g]
    assert any(np.any(t) for t in totals)
    runner = ProbeRunner(m, _batch, steps=2)
    runner.warm_up()
    assert runner.run(16).fits
    after = [np.asarray(v.numpy()) for g in metric_variable_groups(m) for v in g]
    assert all(np.array_equal(x, y) for x, y in zip(totals, after))


def test_probe_on_a_fresh_model_builds_optimizer_with_initial_values() -> None:
    m = _model()
    assert not m.optimizer.built
    ProbeRunner(m, _batch, steps=2).run(16)
    assert int(m.optimizer.iterations.numpy()) == 0
    assert all(not np.any(v.numpy()) for v in m.optimizer.variables
               if "iteration" not in v.path and "learning_rate" not in v.path)


def test_peak_grows_with_batch_and_is_reported() -> None:
    m = _model()
    runner = ProbeRunner(m, _batch, steps=2)
    small, big = runner.run(8), runner.run(4096)
    assert small.peak_bytes is not None and big.peak_bytes is not None
    assert big.peak_bytes > small.peak_bytes
    assert big.step_seconds is not None and big.step_seconds > 0
    assert state_bytes(m) > 0


def test_budget_checked_against_measured_peak() -> None:
    m = _model()
    runner = ProbeRunner(m, _batch, steps=2, budget_bytes=1)
    p = runner.run(8)
    assert not p.fits and p.outcome == "over_budget"


def test_model_error_becomes_refused_outcome_and_state_is_restored() -> None:
    m = _model()
    snap = ModelState(m)

    def bad_batch(b: int):
        x, y = _batch(b)
        return x[:, :7], y  # wrong feature count: the model itself raises

    p = ProbeRunner(m, bad_batch, steps=1).run(8)
    assert not p.fits and p.outcome == "refused"
    assert "ValueError" in p.detail or "Error" in p.detail
    assert snap.equals_current()


def test_steps_must_be_positive() -> None:
    with pytest.raises(ValueError, match="steps"):
        ProbeRunner(_model(), _batch, steps=0)


def _record_calls(m: keras.Model) -> list[tuple[str, type]]:
    """``("T", iterator type)`` for each call of ``m.train_function``, ``("V", ...)`` of
    ``m.test_function``, in order, however often a probe builds them anew (each probe does)."""
    calls: list[tuple[str, type]] = []
    for kind, name in (("T", "train"), ("V", "test")):
        build = getattr(m, f"make_{name}_function")

        def make_recording(force: bool = False, build=build, kind=kind, name=name) -> None:
            build(force=force)
            compiled = getattr(m, f"{name}_function")

            def recording(iterator):
                calls.append((kind, type(iterator)))
                return compiled(iterator)

            setattr(m, f"{name}_function", recording)

        setattr(m, f"make_{name}_function", make_recording)
    return calls


def _train_calls(calls: list[tuple[str, type]]) -> list[type]:
    return [t for kind, t in calls if kind == "T"]


def _kinds(calls: list[tuple[str, type]]) -> str:
    """The calls' kinds in order: ``"TTTV..."``."""
    return "".join(kind for kind, _ in calls)


def test_probe_runs_fits_compiled_function_over_an_iterator_per_steps_per_execution() -> None:
    import tensorflow as tf

    m = _model()
    m.compile(optimizer="adam", loss="sparse_categorical_crossentropy", steps_per_execution=2)
    runner = ProbeRunner(m, _batch, steps=4, settle_epochs=1)
    runner.warm_up()
    recorded = _record_calls(m)
    assert runner.run(16).fits
    calls = _train_calls(recorded)
    # 4 steps, 2 per execution: two calls of the function fit calls, each with fit's iterator
    # (a generator is what train_on_batch passes instead).
    assert len(calls) == 2
    assert all(issubclass(c, (tf.data.Iterator, tf.distribute.DistributedIterator))
               for c in calls)


class _RefusesLargeValidationBatches(keras.layers.Layer):
    """Trains at any size; in inference (validation) refuses batches over 10."""

    def call(self, x, training=None):
        if training:
            return x
        import tensorflow as tf

        with tf.control_dependencies([tf.debugging.assert_less(tf.shape(x)[0], 11)]):
            return tf.identity(x)


def _refusing_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    inp = keras.Input((32,))
    h = _RefusesLargeValidationBatches()(keras.layers.Dense(8)(inp))
    m = keras.Model(inp, keras.layers.Dense(4, activation="softmax")(h))
    m.compile("adam", "sparse_categorical_crossentropy")
    return m


def test_probe_ends_with_a_validation_step_at_the_same_batch_size() -> None:
    m = _refusing_model()
    runner = ProbeRunner(m, _batch, steps=2)
    assert runner.warm_up() is None
    assert runner.run(8).fits
    p = runner.run(16)
    assert p.outcome == "refused" and p.detail.startswith("in the validation step")


def test_warm_up_traces_training_and_validation_once_each_in_the_general_form() -> None:
    # Half the tracing of two warm-up sizes (static 1, then None, for each function): fit's
    # own dataset re-batched with a None batch dimension is traced once per function.
    traces: list[tuple] = []

    class Count(keras.layers.Layer):
        def call(self, x, training=None):
            traces.append((tuple(x.shape), bool(training)))
            return x

    inp = keras.Input((32,))
    m = keras.Model(inp, keras.layers.Dense(4)(Count()(inp)))
    m.compile("adam", "mse", steps_per_execution=2)
    runner = ProbeRunner(m, lambda b: (_batch(b)[0], np.ones((b, 4), "float32")), steps=3)
    traces.clear()
    assert runner.warm_up() is None
    assert all(shape[0] is None for shape, _ in traces), traces
    assert traces.count(((None, 32), True)) == 1 and traces.count(((None, 32), False)) == 1
    assert runner.state.equals_current()


def test_each_probe_runs_the_graph_traced_for_its_own_batch_shape() -> None:
    # A process's first fit at batch b traces a graph specialized to b (fit's batches over
    # arrays have a static shape); the warm-up's None-batch graph may need less memory (the
    # Transformer: it fitted at 141 under 64 MiB where the user's fit at 141 did not). So
    # each probe's train and test steps are traced for its own size, never the None graph.
    traces: list[tuple] = []

    class Count(keras.layers.Layer):
        def call(self, x, training=None):
            traces.append((x.shape[0], bool(training)))
            return x

    inp = keras.Input((32,))
    m = keras.Model(inp, keras.layers.Dense(4)(Count()(inp)))
    m.compile("adam", "mse")
    runner = ProbeRunner(m, lambda b: (_batch(b)[0], np.ones((b, 4), "float32")), steps=2)
    assert runner.warm_up() is None
    assert (None, True) in traces and (None, False) in traces  # the warm-up's general graphs
    for b in (16, 48):
        traces.clear()
        assert runner.run(b).fits
        assert sorted(set(traces)) == [(b, False), (b, True)], traces


def test_a_restored_state_leaves_the_next_probe_measuring_what_the_first_did() -> None:
    # The state is restored after each probe. Restored by slices (as it once was, for
    # variables over 1 MiB), a variable stays in TensorFlow's copy-on-read mode and every
    # later step copies it on each read: this model's probe at 8 went from 32 MiB to 52 MiB
    # after the first restore (ResNet50's by 145 MiB), so a reused worker refused sizes the
    # user's own fit in a fresh process trains.
    keras.utils.set_random_seed(0)
    inp = keras.Input((1024,))
    h = keras.layers.Dense(1024)(keras.layers.Dense(1024)(inp))  # two 4 MiB kernels
    m = keras.Model(inp, keras.layers.Dense(1)(h))
    m.compile("adam", "mse")
    runner = ProbeRunner(m, lambda b: (np.ones((b, 1024), "float32"),
                                       np.ones((b, 1), "float32")), steps=2)
    peaks = [runner.run(8).peak_bytes for _ in range(3)]
    assert None not in peaks, peaks
    # Alone: 40.2 MiB three times (slices: 40 -> 56). Late in the whole suite, in a process that
    # ran hundreds of tests: 54.2, 58.0, 58.0 once (cause not found; not copy-on-read, which
    # adds 40%, nor uncollected garbage: the same with the collector off).
    assert max(peaks) - peaks[0] < 0.1 * peaks[0], [p / 2**20 for p in peaks]
    assert runner.state.equals_current()


def test_a_probe_runs_epochs_over_its_batches_until_the_peak_settles() -> None:
    # fit's own path, epoch after epoch through one epoch iterator: at least 1 + 2 quiet
    # epochs, at most settle_epochs, each of `steps` steps; the state restored after all.
    m = _model()
    runner = ProbeRunner(m, _batch, steps=3, settle_epochs=5)
    recorded = _record_calls(m)
    p = runner.run(16)
    calls = _train_calls(recorded)
    assert p.fits and p.peak_bytes is not None
    assert len(calls) % 3 == 0 and 9 <= len(calls) <= 15, len(calls)
    assert runner.state.equals_current()


def test_a_probe_far_under_its_budget_ends_after_two_epochs_and_says_how_many() -> None:
    # A peak a thousand times under the budget cannot reach it in the epochs left, whatever
    # the allocator's creep: two epochs (a validation pass between them), not the quiet three.
    m = _model()
    runner = ProbeRunner(m, _batch, steps=3, device="CPU:0", budget_bytes=64 << 30,
                         settle_epochs=5)
    recorded = _record_calls(m)
    p = runner.run(16)
    assert p.fits and p.epochs == 2
    assert _kinds(recorded) == "TTTVTTTV"
    # Without a budget nothing is clear of it: at least 1 + 2 quiet epochs, counted
    assert ProbeRunner(m, _batch, steps=3, settle_epochs=5).run(16).epochs >= 3
    assert runner.state.equals_current()


def test_a_probe_validates_after_every_epoch_as_fit_does() -> None:
    # fit's next epoch starts on the heap its validation pass left: the probe's epochs are
    # each followed by one validation batch, not one validation after all of them.
    m = _model()
    runner = ProbeRunner(m, _batch, steps=3, settle_epochs=5)
    calls = _record_calls(m)
    assert runner.run(16).fits
    epochs = _kinds(calls).split("V")
    assert epochs[-1] == "" and len(epochs) - 1 >= 3, calls  # ends with validation; >= 3 epochs
    assert set(epochs[:-1]) == {"TTT"}, calls
    assert runner.state.equals_current()


def test_a_validation_pass_that_fails_ends_the_probe_and_says_so() -> None:
    m = _refusing_model()
    calls = _record_calls(m)
    p = ProbeRunner(m, _batch, steps=2).run(16)
    assert p.outcome == "refused" and p.detail.startswith("in the validation step")
    assert _kinds(calls) == "TTV"  # the first epoch's validation refused: nothing after it


def test_the_probes_docstring_examples_run() -> None:
    import doctest

    from batchfit.backend.tensorflow import probe

    result = doctest.testmod(probe, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_a_probe_reads_the_peak_of_every_training_step() -> None:
    m = _model()
    runner = ProbeRunner(m, _batch, steps=4, device="CPU:0", budget_bytes=1 << 30,
                         settle_epochs=1)
    probe = runner.run(64)
    assert probe.fits and probe.peak_bytes is not None
    if probe.typical_peak_bytes is not None:  # the largest peak was a training step's
        assert 0 < probe.typical_peak_bytes <= probe.peak_bytes
    peaks = StepPeaks("CPU:0")
    train_like_fit(m, *repeated_batches(_batch, 64, 4), 64, step_peaks=peaks)
    assert len(peaks.steps) == 4 and all(p > 0 for p in peaks.steps)
    assert peaks.total() >= max(peaks.steps)


def _peaks(steps: list[int], outside: int = 0) -> StepPeaks:
    peaks = StepPeaks("CPU:0")
    peaks.steps, peaks.outside = steps, outside
    return peaks


def test_a_peak_near_the_budget_in_one_step_of_five_fits_and_says_so() -> None:
    runner = ProbeRunner(_model(), _batch, device="CPU:0", budget_bytes=1000)
    few = _peaks([700, 710, 990, 720, 705])
    probe = runner._outcome(8, {"loss": 1.0}, 990, 300, [0.1] * 5, 0.0, few)
    assert probe.fits and probe.typical_peak_bytes == 710
    assert "some training steps only" in probe.detail and "71%" in probe.detail
    most = _peaks([975, 980, 990, 985, 700])
    probe = runner._outcome(8, {"loss": 1.0}, 990, 300, [0.1] * 5, 0.0, most)
    assert probe.outcome == "at_limit" and not probe.fits


def test_a_peak_near_the_budget_outside_the_steps_or_in_validation_is_at_limit() -> None:
    runner = ProbeRunner(_model(), _batch, device="CPU:0", budget_bytes=1000)
    outside = _peaks([700, 710, 720], outside=990)
    assert runner._outcome(8, {}, 990, 300, [0.1] * 3, 0.0, outside).outcome == "at_limit"
    steps = _peaks([700, 710, 720])
    probe = runner._outcome(8, {}, 990, 990, [0.1] * 3, 0.0, steps)
    assert probe.outcome == "at_limit" and "validation" in probe.detail
    assert probe.typical_peak_bytes is None


class _RefusesBatchesOver(keras.layers.Layer):
    """Refuses, when traced, a static batch dimension over ``limit`` (a shape check in Python)."""

    def __init__(self, limit: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.limit = limit

    def call(self, x):
        if x.shape[0] is not None and x.shape[0] > self.limit:
            raise ValueError(f"batch {x.shape[0]} is over {self.limit}")
        return x


def _counting_model(traces: list[tuple], limit: int = 10**6) -> keras.Model:
    class Count(keras.layers.Layer):
        def call(self, x, training=None):
            traces.append((x.shape[0], bool(training)))
            return x

    keras.utils.set_random_seed(0)
    inp = keras.Input((32,))
    h = _RefusesBatchesOver(limit)(Count()(inp))
    m = keras.Model(inp, keras.layers.Dense(4, activation="softmax")(h))
    m.compile("adam", "sparse_categorical_crossentropy", steps_per_execution=2)
    traces.clear()  # (building the functional model called the layer once)
    return m


def test_a_prepared_probe_runs_the_graphs_traced_ahead_for_its_size_and_traces_nothing() -> None:
    # A process started ahead of a confirmation traces its step for the known size while the
    # current probe runs; the probe then starts at its first step. It must run the same
    # graphs a plain probe at that size runs (specialized to the size, training and
    # validation), and leave the model as it was.
    traces: list[tuple] = []
    m = _counting_model(traces)
    runner = ProbeRunner(m, _batch, steps=4, own_model=True)
    runner.prepare(16)
    assert sorted(set(traces)) == [(16, False), (16, True)], traces  # traced before any step
    traced = len(traces)
    p = runner.run(16)
    assert runner.ran_prepared and p.fits and p.peak_bytes and p.epochs >= 2
    assert len(traces) == traced, traces[traced:]  # the steps ran the prepared graphs
    before = [np.array(v) for v in m.trainable_variables]
    plain = runner.run(16)  # the same size from scratch: traced again, fits the same way
    assert not runner.ran_prepared and plain.fits and len(traces) > traced
    assert all(np.array_equal(a, np.array(v)) for a, v in zip(before, m.trainable_variables))


def test_a_probe_at_another_size_than_prepared_starts_from_scratch() -> None:
    traces: list[tuple] = []
    m = _counting_model(traces)
    runner = ProbeRunner(m, _batch, steps=2)
    runner.prepare(16)
    traces.clear()
    p = runner.run(8)
    assert not runner.ran_prepared and p.fits
    assert sorted(set(traces)) == [(8, False), (8, True)], traces
    assert runner.state.equals_current()


def test_a_failure_while_preparing_is_the_probes_outcome_and_the_next_probe_runs() -> None:
    # What fails while preparing (here the model refuses the size when its step is traced)
    # is what the probe at that size would have met: it is reported as that probe's outcome.
    m = _counting_model([], limit=10)
    snap = ModelState(m)
    runner = ProbeRunner(m, _batch, steps=2)
    runner.prepare(16)
    p = runner.run(16)
    assert runner.ran_prepared and p.outcome == "refused" and not p.fits
    assert "_RefusesBatchesOver" in p.detail
    plain = ProbeRunner(_counting_model([], limit=10), _batch, steps=2).run(16)
    assert (plain.outcome, plain.detail) == (p.outcome, p.detail)
    assert snap.equals_current()
    assert runner.run(8).fits
