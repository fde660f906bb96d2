"""``estimate_noise_scale``, ``NoiseScaleMonitor`` and ``batchfit noise`` on tiny real models."""

from __future__ import annotations

import os
from pathlib import Path

import keras
import numpy as np
import pytest
from noise_fixtures import (
    classifier,
    digits_like,
    linear_data,
    linear_model,
    stateful_model,
    true_noise_scale,
)

import batchfit
from batchfit.backend.tensorflow.probe import ModelState
from batchfit.errors import InvalidInputError
from batchfit.results import NoiseScaleResult

ROOT = Path(__file__).resolve().parents[2]
FIX = "tests/noise_fixtures.py"


def test_linear_model_matches_the_closed_form() -> None:
    x, y = linear_data()
    truth = true_noise_scale(x, y)  # about 11 = ((d+1)(|w*|^2+1)+|w*|^2)/|w*|^2
    r = batchfit.estimate_noise_scale(linear_model(), (x, y), small=4, big=32, steps=128)
    assert isinstance(r, NoiseScaleResult)
    assert r.b_simple == pytest.approx(truth, rel=0.15)
    assert r.low <= truth <= r.high
    assert len(r.pairs) == 128 and r.seconds > 0 and r.examples == len(x)
    assert r.small_batch == 4 and r.big_batch == 32 and r.optimizer == "SGD"


def test_a_factory_and_a_spec_are_taken_as_the_other_verbs_take_them() -> None:
    """The one resolver: a factory and a spec give the same estimate as the model object."""
    x, y = linear_data(400)
    kwargs = {"small": 4, "big": 16, "steps": 8, "seed": 3}
    by_object = batchfit.estimate_noise_scale(linear_model(), (x, y), **kwargs)
    by_factory = batchfit.estimate_noise_scale(linear_model, (x, y), **kwargs)
    by_spec = batchfit.estimate_noise_scale(f"{FIX}:linear_model", (x, y), **kwargs)
    assert by_factory.b_simple == pytest.approx(by_object.b_simple, rel=1e-6)
    assert by_spec.b_simple == pytest.approx(by_object.b_simple, rel=1e-6)
    with pytest.raises(InvalidInputError, match="compiled keras.Model, a function"):
        batchfit.estimate_noise_scale(42, (x, y), **kwargs)


def test_a_layer_is_refused_with_how_to_wrap_it_not_called_as_a_factory() -> None:
    """A Keras layer is callable but no factory: it gets the wrap hint, as before factories."""
    x, y = linear_data(100)
    with pytest.raises(InvalidInputError, match="a Layer, not a Model. Wrap it"):
        batchfit.estimate_noise_scale(keras.layers.Dense(1), (x, y), small=4, big=16, steps=2)


def test_weights_optimizer_and_state_unchanged() -> None:
    model = stateful_model()
    x, y = linear_data(2000)
    model.fit(x, y, batch_size=64, epochs=1, verbose=0)   # non-trivial optimizer state
    before = ModelState(model)
    r = batchfit.estimate_noise_scale(model, (x, y), small=8, big=32, steps=4)
    assert before.equals_current()                        # bitwise, every variable
    assert any("BatchNormalization" in n for n in r.notes)


@pytest.mark.parametrize("kwargs, words", [
    ({"data": None}, ["real data"]),
    ({"small": 8, "big": 20}, ["multiple", "big=24"]),
    ({"steps": 1}, ["steps"]),
])
def test_clear_errors(kwargs, words) -> None:
    args = {"data": linear_data(100), "small": 4, "big": 16, "steps": 4}
    args.update(kwargs)
    with pytest.raises(InvalidInputError) as info:
        batchfit.estimate_noise_scale(linear_model(), **args)
    for w in words:
        assert w in str(info.value)


def test_monitor_logs_into_history_and_tensorboard(tmp_path) -> None:
    x, y = digits_like()
    model = classifier()
    monitor = batchfit.NoiseScaleMonitor((x, y), small=8, big=32, every=5, window=12,
                                         log_dir=str(tmp_path / "tb"))
    before = [w.copy() for w in model.get_weights()]
    hist = model.fit(x, y, batch_size=30, epochs=3, callbacks=[monitor], verbose=0)
    for key in ("noise_scale", "noise_scale_low", "noise_scale_high", "grad_sq_norm",
                "grad_trace"):
        assert len(hist.history[key]) == 3, key
    assert all(v > 0 for v in hist.history["noise_scale"])
    assert [r["pairs"] for r in monitor.records] == [4.0, 8.0, 12.0]  # 20 steps / every 5
    import tensorflow as tf

    tags = {v.tag for f in (tmp_path / "tb").iterdir()
            for e in tf.compat.v1.train.summary_iterator(str(f)) for v in e.summary.value}
    assert {"noise_scale", "noise_scale_step", "grad_trace"} <= tags
    assert not all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    # The event file is closed when training ends (no descriptor left open on it), and the
    # same monitor logs the next fit again.
    def open_in_log_dir() -> list[str]:
        fds = Path("/proc/self/fd")
        if not fds.is_dir():
            return []
        names = []
        for fd in fds.iterdir():
            try:
                names.append(os.readlink(fd))
            except OSError:
                continue
        return [n for n in names if n.startswith(str(tmp_path / "tb"))]

    assert open_in_log_dir() == []
    model.fit(x, y, batch_size=30, epochs=1, callbacks=[monitor], verbose=0)
    assert open_in_log_dir() == [] and len(monitor.records) == 4
    assert len(list((tmp_path / "tb").iterdir())) >= 2


def test_monitor_does_not_change_training() -> None:
    """The extra gradients update nothing: same losses as training without the monitor."""
    x, y = digits_like()
    losses = []
    for callbacks in ([], [batchfit.NoiseScaleMonitor((x, y), small=8, big=16, every=3)]):
        keras.utils.set_random_seed(1)
        model = classifier()
        hist = model.fit(x, y, batch_size=30, epochs=2, shuffle=False, callbacks=callbacks,
                         verbose=0)
        losses.append(hist.history["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)

