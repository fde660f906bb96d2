"""The resilient fit on JAX. Out-of-memory inside a running step is injected by a real layer
(``tests/jax_fit_models.py``: a host callback raising RESOURCE_EXHAUSTED above a batch size,
a real JaxRuntimeError after dispatch); JAX on CPU cannot run out of memory for real."""

from __future__ import annotations

import numpy as np
import pytest
from jax_fit_models import data, model

import batchfit
from batchfit.core.shrink import HalvingShrink
from batchfit.errors import InvalidInputError


def _weights(m) -> list[np.ndarray]:
    return [np.array(v.value) for v in m.trainable_variables]


def test_keras_own_step_loses_the_weights_when_it_fails_while_running() -> None:
    """Why batchfit's loop never donates: Keras's JAX step gives the state's buffers to the
    step, and a failure inside it leaves every weight deleted (Keras 3.15.1, JAX 0.10.2)."""
    m = model(limit=8)
    x, y = data(16)
    m.train_on_batch(x[:8], y[:8])
    with pytest.raises(Exception, match="RESOURCE_EXHAUSTED"):
        m.train_on_batch(x, y)
    with pytest.raises(RuntimeError, match="deleted"):
        m.trainable_variables[0].numpy()


def test_an_oom_inside_the_step_is_replayed_as_micro_batches_with_every_update_kept() -> None:
    x, y = data(64)
    m = model(limit=8)
    h = batchfit.fit(m, x, y, batch_size=32, epochs=2, shuffle=False, verbose=0,
                     shrink_policy=HalvingShrink())
    assert [(a.from_micro_batch, a.to_micro_batch) for a in h.adjustments] == [(32, 16), (16, 8)]
    assert h.micro_batch_size == 8 and h.accumulation_steps == 4
    assert len(h.history["loss"]) == 2 and all(np.isfinite(h.history["loss"]))
    # One update per batch of 32 (the effective batch kept), none lost to the failed steps:
    assert int(m.optimizer.iterations.numpy()) == 4
    # ... and the weights are those of plain training at 32 (no layer limit, no failure): a
    # failed step that had lost (donated) the state would crash the replay or change them.
    ref = model()
    batchfit.fit(ref, x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    for got, want in zip(_weights(m), _weights(ref)):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)


def test_without_keeping_the_effective_batch_each_micro_batch_updates() -> None:
    x, y = data(32)
    m = model(limit=8)
    with pytest.warns(UserWarning, match="effective batch size shrinks"):
        batchfit.fit(m, x, y, batch_size=32, epochs=1, shuffle=False, verbose=0,
                     keep_effective_batch=False, shrink_policy=HalvingShrink())
    assert int(m.optimizer.iterations.numpy()) == 4  # 32 as 4 micro-batches of 8


def test_validation_history_and_callbacks() -> None:
    import keras

    x, y = data(48)
    seen = []
    cb = keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: seen.append(sorted(logs)))
    h = batchfit.fit(model(), x, y, batch_size=16, epochs=2, verbose=0, callbacks=[cb],
                     validation_data=(x[:16], y[:16]))
    assert seen == [["loss", "val_loss"]] * 2 and len(h.history["val_loss"]) == 2


@pytest.mark.parametrize("kwargs, words", [
    ({"class_weight": {0: 1.0}}, "does not support class_weight"),
    ({"batch_size": None}, "needs batch_size"),
])
def test_what_the_jax_loop_does_not_take_is_refused(kwargs, words) -> None:
    x, y = data(16)
    args = {"batch_size": 8, **kwargs}
    with pytest.raises(InvalidInputError, match=words):
        batchfit.fit(model(), x, y, **args)


def _batches_of(x, y, size):
    import keras

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return len(x) // size

        def __getitem__(self, i):
            return x[i * size:(i + 1) * size], y[i * size:(i + 1) * size]

    return Batches()


def _keras_own(x, y, epochs):
    """Keras's own fit (no limit, no failure) at 32, unshuffled: what batchfit must match."""
    ref = model(metrics=["mae"])
    h = ref.fit(x, y, batch_size=32, epochs=epochs, shuffle=False, verbose=0)
    return ref, h.history


@pytest.mark.parametrize("kind", ["pydataset", "generator"])
def test_datasets_train_their_own_batches_with_compiled_metrics(kind) -> None:
    x, y = data(64)
    ref, want = _keras_own(x, y, epochs=2)
    m = model(limit=8, metrics=["mae"])
    if kind == "pydataset":
        h = batchfit.fit(m, _batches_of(x, y, 32), epochs=2, verbose=0,
                         shrink_policy=HalvingShrink())
    else:
        def forever():
            while True:
                for i in range(0, 64, 32):
                    yield x[i:i + 32], y[i:i + 32]
        h = batchfit.fit(m, forever(), steps_per_epoch=2, epochs=2, verbose=0,
                         shrink_policy=HalvingShrink())
    assert [(a.from_micro_batch, a.to_micro_batch) for a in h.adjustments] == [(32, 16), (16, 8)]
    assert int(m.optimizer.iterations.numpy()) == 4 and h.per_replica_batch_size == 32
    # The compiled metric is in History, with Keras's own values for the same training:
    assert sorted(h.history) == ["loss", "mae"]
    for key in ("loss", "mae"):
        np.testing.assert_allclose(h.history[key], want[key], rtol=2e-4)
    for got, ref_w in zip(_weights(m), _weights(ref)):
        np.testing.assert_allclose(got, ref_w, rtol=2e-4, atol=1e-6)


def test_a_dataset_with_batch_size_or_a_generator_that_runs_out_is_refused() -> None:
    x, y = data(32)
    with pytest.raises(InvalidInputError, match="batch_size=None"):
        batchfit.fit(model(), _batches_of(x, y, 16), batch_size=16)
    with pytest.raises(InvalidInputError, match="steps_per_epoch"):
        batchfit.fit(model(), iter([(x, y)]), epochs=2, verbose=0)


def test_early_stopping_ends_the_fit() -> None:
    import keras

    x, y = data(32)
    stop = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda e, logs: setattr(m, "stop_training", e >= 1))
    m = model()
    h = batchfit.fit(m, x, y, batch_size=16, epochs=5, verbose=0, callbacks=[stop])
    assert len(h.history["loss"]) == 2


def test_an_oom_in_evaluation_shrinks_the_evaluation_micro_batch_only() -> None:
    x, y = data(64)
    m = model(limit=8, metrics=["mae"])
    h = batchfit.fit(m, x, y, batch_size=32, micro_batch_size=8, epochs=2, shuffle=False,
                     verbose=0, validation_data=(x[:32], y[:32]),
                     shrink_policy=HalvingShrink())
    assert [(a.phase, a.from_micro_batch, a.to_micro_batch) for a in h.adjustments] == [
        ("eval", 32, 16), ("eval", 16, 8)]
    assert h.micro_batch_size == 8 and int(m.optimizer.iterations.numpy()) == 4
    # The validation metrics are those of the trained model on the same examples:
    want = m.evaluate(x[:32], y[:32], batch_size=8, verbose=0, return_dict=True)
    assert sorted(h.history) == ["loss", "mae", "val_loss", "val_mae"]
    for key in ("loss", "mae"):
        assert h.history[f"val_{key}"][-1] == pytest.approx(want[key], rel=1e-5)


def test_data_parallel_over_this_hosts_single_device_trains_as_without() -> None:
    x, y = data(64)
    m = model(limit=8)
    h = batchfit.fit(m, x, y, batch_size=32, epochs=2, shuffle=False, verbose=0,
                     shrink_policy=HalvingShrink(), distribute="data_parallel")
    assert h.replicas == 1 and h.per_replica_micro_batch_size == 8
    assert [(a.from_micro_batch, a.to_micro_batch) for a in h.adjustments] == [(32, 16), (16, 8)]
    ref = model()
    batchfit.fit(ref, x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    for got, want in zip(_weights(m), _weights(ref)):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)
