"""batchfit.estimate_memory on a small real Keras model: nothing runs, the line, bad input."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import batchfit
from batchfit.errors import InvalidInputError, NothingFitsError
from batchfit.results import load_result


def _model() -> keras.Model:
    model = keras.Sequential([keras.Input((32,)), keras.layers.Dense(256, activation="relu"),
                              keras.layers.Dense(256, activation="relu"),
                              keras.layers.Dense(3, activation="softmax")], name="tiny")
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return model


@pytest.fixture(scope="module")
def estimated():
    model = _model()
    before = [np.array(v.numpy()) for v in model.variables]
    result = batchfit.estimate_memory(model, batch_sizes=(64, 128, 256), memory="8MiB")
    return model, before, result


def test_nothing_is_executed(estimated):
    model, before, _ = estimated
    assert int(model.optimizer.iterations.numpy()) == 0
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(before, model.variables))


def test_line_is_linear_and_per_sample_positive(estimated):
    _, _, r = estimated
    assert [m.batch_size for m in r.sizes] == [64, 128, 256]
    assert r.fit.per_sample_bytes > 2 * 256 * 4  # two hidden activations of 256 floats
    assert r.fit.r_squared > 0.99 and r.fit.max_residual_fraction < 0.05
    # the largest batch for 8 MiB is where the line crosses it
    assert r.fit.predict(r.max_batch_size) <= 8 << 20 < r.fit.predict(r.max_batch_size + 1)
    assert r.max_batch_size > 256
    # and the result says it is an upper bound on what trains under a capped allocator
    assert any(n.startswith(f"{r.max_batch_size} is where the step's peak reaches the budget")
               for n in r.notes)
    assert [c.name for c in r.cards][-1] == "141 GB"
    assert r.step_jit is False and any("not XLA-compiled" in n for n in r.notes)
    assert load_result(r.to_json()) == r


def test_a_budget_below_the_fixed_cost_is_nothing_fits():
    with pytest.raises(NothingFitsError, match="fixed cost") as info:
        batchfit.estimate_memory(_model(), batch_sizes=(8, 16), memory="64KiB")
    assert info.value.result is not None and info.value.result.fit.fixed_bytes > 64 << 10


@pytest.mark.parametrize("sizes", [(0, 8), (8, -1), "8,x", (2.5,)])
def test_sizes_must_be_positive_integers(sizes):
    with pytest.raises(InvalidInputError, match="positive integers"):
        batchfit.estimate_memory(_model(), batch_sizes=sizes)


def test_a_model_not_compiled_is_refused():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(InvalidInputError, match="compile"):
        batchfit.estimate_memory(model, batch_sizes=(4,))


def test_dynamic_dimensions_ask_for_input_shape():
    inp = keras.Input((None,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(50, 8)(inp)
    out = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling1D()(x))
    model = keras.Model(inp, out)
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(InvalidInputError, match="--input-shape tokens="):
        batchfit.estimate_memory(model, batch_sizes=(4,))
    r = batchfit.estimate_memory(model, batch_sizes=(4, 8), input_shapes={"tokens": (16,)})
    assert r.sizes[0].inputs == 4 * 16 * 4 + 4 * 2 * 4
