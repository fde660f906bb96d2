"""batchfit.fit and @adaptive_batch_size in this process: no cap, out-of-memory simulated where needed.

The same under a real capped allocator, in a child process: tests/process/test_fit_capped.py.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import batchfit
from batchfit.backend.tensorflow.fitting import rebatch as _rebatch


# --- in-process: no cap, simulated OOM where needed --------------------------------------
def _small(seed: int = 0, lr=0.05, optimizer=None, run_eagerly=False, layer=None):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((6,))
    h = keras.layers.Dense(8, activation="tanh")(inp)
    if layer is not None:
        h = layer(h)
    out = keras.layers.Dense(1)(h)
    m = keras.Model(inp, out)
    m.compile(optimizer or keras.optimizers.SGD(lr), "mse", metrics=["mae"],
              run_eagerly=run_eagerly)
    return m


def _xy(n: int = 96, seed: int = 3):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 6)).astype("float32"), rng.normal(size=(n, 1)).astype("float32")


class FakeOOM(keras.layers.Layer):
    """Raises a ResourceExhaustedError for batches over ``limit`` (run eagerly: sees the batch)."""

    def __init__(self, limit: int, **kwargs):
        super().__init__(**kwargs)
        self.limit = limit
        self.raised = 0

    def call(self, x, training=None):
        if training and x.shape[0] is not None and x.shape[0] > self.limit:
            self.raised += 1
            raise tf.errors.ResourceExhaustedError(
                None, None, f"OOM when allocating tensor with shape[{x.shape[0]},8] (simulated)")
        return x


def test_without_oom_it_is_model_fit() -> None:
    x, y = _xy()
    m, ref = _small(), _small()
    h = batchfit.fit(m, x, y, batch_size=32, epochs=3, verbose=0, shuffle=False,
                     validation_data=(x[:32], y[:32]))
    hr = ref.fit(x, y, batch_size=32, epochs=3, verbose=0, shuffle=False,
                 validation_data=(x[:32], y[:32]))
    assert h.history == hr.history and h.adjustments == []
    assert all(np.array_equal(a, b) for a, b in zip(m.get_weights(), ref.get_weights()))
    assert m.train_function is None and "apply" not in vars(m.optimizer)  # nothing left behind


def test_micro_batches_with_accumulation_equal_the_full_batch_with_a_schedule() -> None:
    x, y = _xy()
    sched = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=1, decay_rate=0.5)
    m = _small(optimizer=keras.optimizers.Adam(sched))
    ref = _small(optimizer=keras.optimizers.Adam(
        keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=1, decay_rate=0.5)))
    h = batchfit.fit(m, x, y, batch_size=32, micro_batch_size=8, epochs=2, verbose=0,
                     shuffle=False)
    hr = ref.fit(x, y, batch_size=32, epochs=2, verbose=0, shuffle=False)
    assert h.accumulation_steps == 4 and h.micro_batch_size == 8
    assert int(m.optimizer.iterations.numpy()) == int(ref.optimizer.iterations.numpy()) == 6
    # the schedule saw update counts, not micro-steps (else its rate would be 0.5**24 early)
    for a, b in zip(m.get_weights(), ref.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h.history["loss"], hr.history["loss"], rtol=1e-5)
    assert m.optimizer.gradient_accumulation_steps is None


def test_non_oom_error_propagates_unchanged() -> None:
    class Broken(keras.layers.Layer):
        def call(self, x):
            tf.debugging.assert_less(tf.reduce_max(tf.abs(x)), 0.0, message="broken on purpose")
            return x

    x, y = _xy(32)
    m = _small(layer=Broken())
    with pytest.raises(tf.errors.InvalidArgumentError, match="broken on purpose") as info:
        batchfit.fit(m, x, y, batch_size=16, epochs=1, verbose=0)
    assert not batchfit.is_oom_error(info.value)
    assert m.train_function is None and "apply" not in vars(m.optimizer)


def test_simulated_oom_with_keep_effective_batch_false_warns_and_updates_per_micro_batch() -> None:
    x, y = _xy(64)
    fake = FakeOOM(16)
    m = _small(layer=fake, run_eagerly=True)
    with pytest.warns(UserWarning, match="effective batch size shrinks"):
        h = batchfit.fit(m, x, y, batch_size=32, epochs=1, verbose=0, shuffle=False,
                         keep_effective_batch=False)
    assert [(a.from_micro_batch, a.to_micro_batch) for a in h.adjustments] == [(32, 16)]
    assert int(m.optimizer.iterations.numpy()) == 4   # 2 batches x 2 updates each
    assert fake.raised == 1


class Counter(keras.layers.Layer):
    """Counts the examples of completed training steps (non-trainable state, restored on OOM)."""

    def build(self, input_shape):
        self.seen = self.add_weight(shape=(), initializer="zeros", trainable=False, name="seen")

    def call(self, x, training=None):
        if training:
            self.seen.assign_add(keras.ops.cast(keras.ops.shape(x)[0], "float32"))
        return x


class OOMAtCall(keras.layers.Layer):
    """Raises a simulated ResourceExhaustedError at the given training calls (1-based)."""

    def __init__(self, fail_at, **kwargs):
        super().__init__(**kwargs)
        self.fail_at = set(fail_at)
        self.calls = 0

    def _tick(self) -> None:
        self.calls += 1
        if self.calls in self.fail_at:
            raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating (sim)")

    def call(self, x, training=None):
        if training:
            self._tick()
        return x


def test_without_accumulation_an_oom_mid_batch_resumes_without_repeating_updates() -> None:
    x, y = _xy(64)
    counter = Counter()

    class Both(keras.layers.Layer):
        def __init__(self):
            super().__init__()
            self.counter, self.oom = counter, OOMAtCall({2})

        def call(self, x, training=None):
            return self.oom(self.counter(x, training=training), training=training)

    m = _small(layer=Both(), run_eagerly=True)
    with pytest.warns(UserWarning, match="effective batch size shrinks"):
        h = batchfit.fit(m, x, y, batch_size=32, micro_batch_size=16, epochs=1, verbose=0,
                         shuffle=False, keep_effective_batch=False)
    # batch 1: 16 (done) + OOM at the second 16 -> 8 + 8; batch 2: 4 x 8
    assert int(m.optimizer.iterations.numpy()) == 1 + 2 + 4
    assert float(counter.seen.numpy()) == 64
    assert [(a.from_micro_batch, a.to_micro_batch) for a in h.adjustments] == [(16, 8)]


class PyFunctionOOM(keras.layers.Layer):
    """A compiled layer whose py_function runs out of memory above ``limit`` examples.

    TensorFlow re-raises it out of the compiled step as an ``UnknownError`` that carries the
    ResourceExhaustedError only as text: the wrapped form the OOM predicate must know.
    """

    def __init__(self, limit: int, **kwargs):
        super().__init__(**kwargs)
        self.limit = limit

    def call(self, x, training=None):
        if not training:
            return x

        def check(x):
            if x.shape[0] > self.limit:
                raise tf.errors.ResourceExhaustedError(
                    None, None, f"OOM when allocating tensor with shape[{x.shape[0]},8]")
            return x

        y = tf.py_function(check, [x], x.dtype)
        y.set_shape(x.shape)
        return y


def test_wrapped_oom_in_a_compiled_step_is_recovered_with_callbacks_running(tmp_path) -> None:
    x, y = _xy(96)

    class Both(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.counter, self.oom = Counter(), PyFunctionOOM(16)

        def call(self, x, training=None):
            return self.oom(self.counter(x, training=training), training=training)

    both = Both()
    counter = both.counter
    m = _small(layer=both)
    w0 = m.get_weights()
    batches = []
    seen_by_callback = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: batches.append(batch))
    ckpt = keras.callbacks.ModelCheckpoint(str(tmp_path / "m.keras"))
    stop = keras.callbacks.EarlyStopping(monitor="loss", patience=5)
    h = batchfit.fit(m, x, y, batch_size=32, epochs=2, verbose=0, shuffle=False,
                     callbacks=[seen_by_callback, ckpt, stop])
    assert [(a.from_micro_batch, a.to_micro_batch, a.accumulation_steps)
            for a in h.adjustments] == [(32, 16, 2)]
    assert "UnknownError" in h.adjustments[0].detail or "OOM" in h.adjustments[0].detail
    assert batches == [0, 1, 2] * 2                  # callbacks saw 3 steps per epoch
    assert float(counter.seen.numpy()) == 2 * 96     # the failed step's count was undone
    assert int(m.optimizer.iterations.numpy()) == 6
    # the same updates as plain Keras at batch 32 (no OOM layer, same initial weights)
    ref = _small(layer=Counter())
    ref.set_weights(w0)
    hr = ref.fit(x, y, batch_size=32, epochs=2, verbose=0, shuffle=False)
    for a, b in zip(m.get_weights(), ref.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h.history["loss"], hr.history["loss"], rtol=1e-5)
    # the epoch-end checkpoint holds the user's optimizer: no accumulation, its own state
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = keras.models.load_model(tmp_path / "m.keras",
                                         custom_objects={"Both": Both, "Counter": Counter})
    assert not [w for w in caught if "Skipping variable loading" in str(w.message)]
    assert loaded.optimizer.gradient_accumulation_steps is None
    assert int(loaded.optimizer.iterations.numpy()) == 6
    assert len(loaded.optimizer.variables) == len(ref.optimizer.variables)


def test_steps_per_execution_is_honoured() -> None:
    x, y = _xy(96)
    m = _small()
    m.compile(keras.optimizers.SGD(0.05), "mse", steps_per_execution=2)
    ref = _small()
    ref.compile(keras.optimizers.SGD(0.05), "mse", steps_per_execution=2)
    h = batchfit.fit(m, x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    hr = ref.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    assert int(m.optimizer.iterations.numpy()) == 6
    np.testing.assert_allclose(h.history["loss"], hr.history["loss"], rtol=1e-6)


def test_grow_after_clean_epochs_and_never_by_default() -> None:
    x, y = _xy(64)

    class OnceOOM(keras.layers.Layer):
        """Runs out of memory once, at the first batch over 16."""

        def __init__(self):
            super().__init__()
            self.fired = False

        def call(self, x, training=None):
            if training and not self.fired and x.shape[0] is not None and x.shape[0] > 16:
                self.fired = True
                raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating (sim)")
            return x

    m = _small(layer=OnceOOM(), run_eagerly=True)
    h = batchfit.fit(m, x, y, batch_size=32, epochs=3, verbose=0, grow_after_epochs=1,
                     shuffle=False)
    assert [(a.reason, a.to_micro_batch) for a in h.adjustments] == [("oom", 16), ("grow", 32)]
    assert h.adjustments[1].epoch == 1 and h.micro_batch_size == 32
    assert int(m.optimizer.iterations.numpy()) == 3 * 2

    m = _small(layer=OnceOOM(), run_eagerly=True)
    h = batchfit.fit(m, x, y, batch_size=32, epochs=3, verbose=0, shuffle=False)
    assert [a.reason for a in h.adjustments] == ["oom"] and h.micro_batch_size == 16


def test_a_dataset_of_its_own_batches_reports_the_accumulation_it_trains_with() -> None:
    x, y = _xy(64)
    m = _small(layer=FakeOOM(16), run_eagerly=True)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)   # no batch_size= to fit
    h = batchfit.fit(m, ds, epochs=1, verbose=0, shuffle=False)
    assert [(a.from_micro_batch, a.to_micro_batch) for a in h.adjustments] == [(32, 16)]
    assert int(m.optimizer.iterations.numpy()) == 2               # one update per batch of 32
    assert (h.micro_batch_size, h.accumulation_steps) == (16, 2)
    assert h.per_replica_batch_size == 32


class _HalveToOne:
    """A user's shrink policy that never gives up: halves, but not below 1."""

    def next_size(self, failed, observations):
        return max(1, failed // 2)


def test_a_policy_that_answers_one_after_one_failed_ends_with_the_clear_error() -> None:
    x, y = _xy(8)
    m = _small(layer=FakeOOM(0), run_eagerly=True)   # not even one example fits
    with pytest.raises(batchfit.TrainingOutOfMemoryError, match="micro-batch of 1 example"):
        batchfit.fit(m, x, y, batch_size=4, epochs=1, verbose=0, shrink_policy=_HalveToOne())

    sizes = []

    @batchfit.adaptive_batch_size(start=2, policy=_HalveToOne())
    def train(batch_size):
        sizes.append(batch_size)
        raise _oom(batch_size)

    with pytest.raises(batchfit.TrainingOutOfMemoryError, match="batch size 1"):
        train()
    assert sizes == [2, 1]   # never called with a batch of 0


def test_rebatched_dataset_keeps_its_cardinality() -> None:
    x, y = _xy(96)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(12, drop_remainder=True)
    out = _rebatch(ds, 32)
    assert int(out.cardinality().numpy()) == 3
    m = _small()
    batchfit.fit(m, ds, batch_size=32, epochs=2, verbose=0, shuffle=False)
    assert int(m.optimizer.iterations.numpy()) == 6
    with pytest.raises(batchfit.InvalidInputError, match="unknown size"):
        _rebatch(tf.data.Dataset.from_tensor_slices((x, y)).batch(12), 32)


def test_bad_setups_are_refused() -> None:
    x, y = _xy(16)
    with pytest.raises(batchfit.InvalidInputError, match="batch_size"):
        batchfit.fit(_small(), x, y, epochs=1, verbose=0)
    with pytest.raises(batchfit.InvalidInputError, match="gradient_accumulation_steps"):
        batchfit.fit(_small(optimizer=keras.optimizers.SGD(gradient_accumulation_steps=2)),
                     x, y, batch_size=8, verbose=0)
    with pytest.raises(batchfit.InvalidInputError, match="grow_after_epochs"):
        batchfit.fit(_small(), x, y, batch_size=8, grow_after_epochs=0)


def test_numpy_integer_sizes_are_reported_as_python_integers() -> None:
    """NumPy integers are accepted as sizes; what fit and fit_multiworker report is plain int
    (a MultiWorkerHistory's to_dict stays JSON-ready)."""
    import json

    from batchfit.verbs.multiworker_fit import fit_multiworker

    x, y = _xy(32)
    h = batchfit.fit(_small(), x, y, batch_size=np.int64(16), micro_batch_size=np.int64(8),
                     epochs=1, verbose=0)
    sizes = (h.micro_batch_size, h.accumulation_steps, h.per_replica_batch_size,
             h.per_replica_micro_batch_size)
    assert sizes == (8, 2, 16, 8) and all(type(v) is int for v in sizes)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8, drop_remainder=True)
    h = batchfit.fit(_small(), ds, batch_size=np.int32(16), epochs=1, verbose=0, shuffle=False)
    assert (h.micro_batch_size, h.per_replica_batch_size) == (16, 16)
    assert type(h.per_replica_batch_size) is int

    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    with strategy.scope():
        m = _small()
    mw = fit_multiworker(m, x, y, batch_size=np.int64(16), micro_batch_size=np.int64(8),
                         epochs=np.int64(1), strategy=strategy, engine="batchfit", verbose=0)
    d = mw.to_dict()
    assert (d["batch_size"], d["per_replica_batch_size"], d["micro_batch_size"]) == (16, 16, 8)
    assert all(type(d[k]) is int for k in ("batch_size", "per_replica_batch_size",
                                             "micro_batch_size", "accumulation_steps"))
    json.dumps(d)


# --- the decorator ---------------------------------------------------------------------------
def _oom(size: int):
    return tf.errors.ResourceExhaustedError(None, None, f"OOM when allocating [{size}]")


def test_decorator_with_arguments_passes_everything_through_and_keeps_state() -> None:
    calls = []

    @batchfit.adaptive_batch_size(start=64)
    def train(batch_size, a, b=0, *, c):
        calls.append((batch_size, a, b, c))
        if batch_size > 20:
            raise _oom(batch_size)
        return batch_size * 100 + a + b + c

    assert train(1, b=2, c=3) == 1606
    assert calls == [(64, 1, 2, 3), (32, 1, 2, 3), (16, 1, 2, 3)]
    assert train.state.batch_size == 16
    assert [(s, ok) for s, ok, _ in train.state.attempts] == [(64, False), (32, False), (16, True)]
    assert train(5, c=0) == 1605 and calls[-1] == (16, 5, 0, 0)   # starts where it left off
    train.state.reset()
    assert train.state.batch_size == 64 and train.state.attempts == []
    assert train.__name__ == "train"


def test_bare_decorator_passes_everything_through() -> None:
    @batchfit.adaptive_batch_size
    def train(batch_size, *args, **kwargs):
        if batch_size > 100:
            raise RuntimeError("wrapped") from _oom(batch_size)
        return batch_size, args, kwargs

    assert train(1, 2, k="v") == (64, (1, 2), {"k": "v"})
    assert train.state.start == 128


def test_decorator_lets_other_errors_through_and_gives_up_below_one() -> None:
    @batchfit.adaptive_batch_size(start=4)
    def broken(batch_size):
        raise KeyError("tokens")

    with pytest.raises(KeyError, match="tokens"):
        broken()
    assert broken.state.attempts == []

    @batchfit.adaptive_batch_size(start=2)
    def never(batch_size):
        raise _oom(batch_size)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(batchfit.TrainingOutOfMemoryError, match="batch size 1"):
            never()
    assert [s for s, _, _ in never.state.attempts] == [2, 1]
    with pytest.raises(batchfit.InvalidInputError, match="start"):
        batchfit.adaptive_batch_size(start=0)
    with pytest.raises(batchfit.InvalidInputError, match="batch_size"):
        never(batch_size=3)


def test_decorator_retries_an_oom_whose_message_is_empty() -> None:
    # `raise MyError() from oom` (or an OOM with no text) has an empty message: still an OOM.
    @batchfit.adaptive_batch_size(start=8)
    def train(batch_size):
        if batch_size > 2:
            raise RuntimeError() from _oom(batch_size)
        if batch_size > 1:
            raise tf.errors.ResourceExhaustedError(None, None, "")
        return batch_size

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert train() == 1
    assert [(s, ok) for s, ok, _ in train.state.attempts] == [
        (8, False), (4, False), (2, False), (1, True)]
    assert train.state.attempts[0][2] == "RuntimeError: "


# --- the batch read inside the compiled step (no eager read per step) ----------------------
class CompiledOOMAtCall(OOMAtCall):
    """:class:`OOMAtCall` in a compiled step: its py_function counts the calls."""

    def call(self, x, training=None):
        if not training:
            return x

        def check(x):
            self._tick()
            return x

        y = tf.py_function(check, [x], x.dtype)
        y.set_shape(x.shape)
        return y


def _spy_take_back(monkeypatch) -> list:
    """Record what ``Replay.take_back`` hands back (the batches replayed from the step)."""
    from batchfit.backend.tensorflow.fit_state import Replay

    taken: list = []
    orig = Replay.take_back

    def spy(self):
        out = orig(self)
        taken.append(None if out is None else int(tf.nest.flatten(out)[0].shape[0]))
        return out

    monkeypatch.setattr(Replay, "take_back", spy)
    return taken


def test_an_oom_after_the_first_batch_replays_the_batch_the_step_read(monkeypatch) -> None:
    x, y = _xy(96)
    taken = _spy_take_back(monkeypatch)

    class Both(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.counter, self.oom = Counter(), CompiledOOMAtCall({3})

        def call(self, x, training=None):
            return self.oom(self.counter(x, training=training), training=training)

    both = Both()
    m = _small(layer=both)
    w0 = m.get_weights()
    h = batchfit.fit(m, x, y, batch_size=32, epochs=2, verbose=0, shuffle=False)
    # call 3 is the third batch: read inside the compiled step, taken back, replayed as 2 x 16
    assert taken == [32]
    assert [(a.epoch, a.step, a.from_micro_batch, a.to_micro_batch, a.accumulation_steps)
            for a in h.adjustments] == [(0, 2, 32, 16, 2)]
    assert float(both.counter.seen.numpy()) == 2 * 96     # none lost, none counted twice
    assert int(m.optimizer.iterations.numpy()) == 6
    ref = _small(layer=Counter())
    ref.set_weights(w0)
    hr = ref.fit(x, y, batch_size=32, epochs=2, verbose=0, shuffle=False)
    for a, b in zip(m.get_weights(), ref.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h.history["loss"], hr.history["loss"], rtol=1e-5)


def _growing_batches(x, y):
    """Batches of 8, then 16 (x5), then 8: a dataset whose first batch is not its largest."""
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    return ds.take(8).batch(8).concatenate(ds.skip(8).batch(16))


def test_batches_larger_than_the_first_run_whole_until_an_oom() -> None:
    x, y = _xy(96)
    m, ref = _small(layer=Counter()), _small(layer=Counter())
    ref.set_weights(m.get_weights())
    h = batchfit.fit(m, _growing_batches(x, y), epochs=2, verbose=0, shuffle=False)
    ref.fit(_growing_batches(x, y), epochs=2, verbose=0, shuffle=False)
    assert h.adjustments == [] and h.micro_batch_size == 16 and h.accumulation_steps == 1
    assert int(m.optimizer.iterations.numpy()) == int(ref.optimizer.iterations.numpy()) == 14
    for a, b in zip(m.get_weights(), ref.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_batch_over_the_micro_batch_is_taken_back_and_split(monkeypatch) -> None:
    x, y = _xy(96)
    taken = _spy_take_back(monkeypatch)
    m, ref = _small(layer=Counter()), _small(layer=Counter())
    ref.set_weights(m.get_weights())
    batchfit.fit(m, _growing_batches(x, y), micro_batch_size=8, epochs=1, verbose=0,
                 shuffle=False)
    ref.fit(_growing_batches(x, y), epochs=1, verbose=0, shuffle=False)
    # batch 2 (16) fails the step's size check before anything ran, comes back, runs as 2 x 8
    assert taken == [16]
    assert float(m.get_layer(index=2).seen.numpy()) == 96
    assert int(m.optimizer.iterations.numpy()) == 7       # one update per batch
    for a, b in zip(m.get_weights(), ref.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_an_oom_in_the_input_pipeline_before_the_step_held_the_batch_is_a_clear_error() -> None:
    x, y = _xy(96)

    def load(i, batch):
        xb, yb = batch

        def check(i):
            if int(i) == 2:   # the third batch: read by the compiled step, not by Python
                raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating (sim)")
            return i

        with tf.control_dependencies([tf.py_function(check, [i], tf.int64)]):
            return tf.identity(xb), tf.identity(yb)

    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(32).enumerate().map(load)
    m = _small()
    with pytest.raises(batchfit.TrainingOutOfMemoryError, match="input pipeline"):
        batchfit.fit(m, ds, epochs=1, verbose=0)
    assert int(m.optimizer.iterations.numpy()) == 2       # the two batches before it trained


def test_a_model_compiled_to_run_eagerly_stays_eager() -> None:
    calls: list[int] = []

    class Eager(keras.layers.Layer):
        def call(self, x, training=None):
            if training:
                calls.append(int(x.shape[0]))   # Python, once per step only when eager
            return x

    x, y = _xy(96)
    m = _small(layer=Eager(), run_eagerly=True)
    batchfit.fit(m, x, y, batch_size=32, epochs=2, verbose=0, shuffle=False)
    assert calls == [32] * 6


# --- model.fit's inputs and arguments ------------------------------------------------------
def test_a_generator_trains_without_batch_size_as_model_fit_takes_it() -> None:
    x, y = _xy(96)

    def batches():
        while True:
            for i in range(0, 96, 32):
                yield x[i:i + 32], y[i:i + 32]

    m, ref = _small(), _small()
    h = batchfit.fit(m, batches(), steps_per_epoch=3, epochs=2, verbose=0, shuffle=False)
    hr = ref.fit(batches(), steps_per_epoch=3, epochs=2, verbose=0, shuffle=False)
    assert h.history == hr.history and int(m.optimizer.iterations.numpy()) == 6
    for a, b in zip(m.get_weights(), ref.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_a_single_callback_is_taken_as_model_fit_takes_it() -> None:
    x, y = _xy(32)
    epochs = []
    cb = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: epochs.append(epoch))
    batchfit.fit(_small(), x, y, batch_size=16, epochs=2, verbose=0, callbacks=cb)
    assert epochs == [0, 1]


class FailsAtCall(keras.layers.Layer):
    """Raises an error that is not out-of-memory at the given training call (1-based)."""

    def __init__(self, at: int, **kwargs):
        super().__init__(**kwargs)
        self.at, self.calls = at, 0

    def call(self, x, training=None):
        if training:
            self.calls += 1
            if self.calls == self.at:
                raise ValueError("bad batch (not memory)")
        return x


def test_a_fit_stopped_inside_an_accumulated_batch_leaves_no_partial_gradients() -> None:
    x, y = _xy(64)
    m = _small(layer=FailsAtCall(2), run_eagerly=True)
    ref = _small(layer=FailsAtCall(0), run_eagerly=True)
    ref.set_weights(m.get_weights())
    # the second micro-batch of the first batch fails: its first one was already accumulated
    with pytest.raises(ValueError, match="bad batch"):
        batchfit.fit(m, x, y, batch_size=32, micro_batch_size=16, epochs=1, verbose=0,
                     shuffle=False)
    assert int(m.optimizer.iterations.numpy()) == 0
    # started again, it trains as a fit that never failed (no stale partial sums)
    batchfit.fit(m, x, y, batch_size=32, micro_batch_size=16, epochs=1, verbose=0, shuffle=False)
    batchfit.fit(ref, x, y, batch_size=32, micro_batch_size=16, epochs=1, verbose=0,
                 shuffle=False)
    for a, b in zip(m.get_weights(), ref.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


class EvalOOM(keras.layers.Layer):
    """Raises a simulated ResourceExhaustedError in inference for batches over ``limit``."""

    def __init__(self, limit: int, **kwargs):
        super().__init__(**kwargs)
        self.limit = limit

    def call(self, x, training=None):
        if not training and x.shape[0] is not None and x.shape[0] > self.limit:
            raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating (sim)")
        return x


def test_an_evaluation_shrink_reports_the_evaluation_batch() -> None:
    x, y = _xy(96)
    m = _small(layer=EvalOOM(8), run_eagerly=True)
    ref = _small(layer=EvalOOM(10**9), run_eagerly=True)
    ref.set_weights(m.get_weights())
    kw = {"epochs": 1, "verbose": 0, "shuffle": False, "validation_data": (x[:40], y[:40]),
          "validation_batch_size": 20}
    h = batchfit.fit(m, x, y, batch_size=32, **kw)
    hr = ref.fit(x, y, batch_size=32, **kw)
    # batches of 20 (not fit's 32): 20 -> 10 is 2 parts, 10 -> 5 is 4
    assert [(a.phase, a.batch_size, a.to_micro_batch, a.accumulation_steps)
            for a in h.adjustments] == [("eval", 20, 10, 2), ("eval", 20, 5, 4)]
    assert "each batch of 20 in 2 parts" in h.adjustments[0].describe()
    np.testing.assert_allclose(h.history["val_loss"], hr.history["val_loss"], rtol=1e-5)
