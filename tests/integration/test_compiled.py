"""The XLA-compiled step's memory read without running it (backend/tensorflow/compiled.py)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from batchfit.backend import get_backend
from batchfit.errors import InvalidInputError


def _mlp(jit: bool | str = False) -> keras.Model:
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dense(4, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"], jit_compile=jit)
    return model


def test_compiles_without_running_a_step():
    model = _mlp()
    before = [np.array(v.numpy()) for v in model.variables]
    m = get_backend().compiled_step_memory(model, 8)
    assert int(model.optimizer.iterations.numpy()) == 0
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(before, model.variables))
    # Adam: two slots per trainable weight, plus its counter and learning rate.
    weights = sum(v.numpy().nbytes for v in model.variables)
    assert m.weights == weights
    assert 2 * weights <= m.optimizer_state <= 2 * weights + 64
    assert m.inputs == 8 * 16 * 4 + 8 * 4  # float32 x, int32 labels
    assert m.temporaries > 0 and m.total_bytes > m.state_bytes + m.inputs
    assert m.device == "CPU:0" and m.compile_seconds > 0


def test_temporaries_grow_linearly_with_the_batch():
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(512, activation="relu"),
                              keras.layers.Dense(512, activation="relu"), keras.layers.Dense(4)])
    model.compile(optimizer="adam", loss="mse")
    a, b, c = (get_backend().compiled_step_memory(model, n) for n in (64, 128, 256))
    slope1 = (b.total_bytes - a.total_bytes) / 64
    slope2 = (c.total_bytes - b.total_bytes) / 128
    assert slope1 > 2 * 512 * 4  # at least two activations of 512 floats per sample
    assert abs(slope1 - slope2) <= 0.05 * slope1
    assert a.state_bytes == c.state_bytes


def test_a_layer_that_refuses_xla_is_named():
    class NoJit(keras.layers.Layer):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.supports_jit = False

        def call(self, x):
            return x

    model = keras.Sequential([keras.Input((4,)), NoJit(name="nojit"), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(InvalidInputError, match="'nojit'.*supports_jit=False"):
        get_backend().compiled_step_memory(model, 4)


def test_a_py_function_gets_a_clear_message():
    class PyFn(keras.layers.Layer):
        def call(self, x):
            out = tf.py_function(lambda t: t, [x], tf.float32)
            out.set_shape(x.shape)
            return out

        def compute_output_shape(self, s):
            return s

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), PyFn(name="pyfn"),
                              keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(InvalidInputError, match="XLA cannot compile.*py_function"):
        get_backend().compiled_step_memory(model, 4)


def test_step_jit_setting_is_read():
    backend = get_backend()
    assert backend.step_jit_compiled(_mlp(jit=True)) is True
    assert backend.step_jit_compiled(_mlp(jit=False)) is False
    # "auto" on a CPU-only machine: Keras leaves XLA off.
    assert backend.step_jit_compiled(_mlp(jit="auto")) is bool(
        tf.config.list_physical_devices("GPU"))


def test_allocations_are_classified_by_kind():
    from types import SimpleNamespace

    from batchfit.backend.tensorflow.compiled import classify_allocations

    def alloc(size, *, param=None, live=False, const=False, local=False):
        return SimpleNamespace(size=size, is_entry_computation_parameter=param is not None,
                               parameter_number=param or 0, maybe_live_out=live,
                               is_constant=const, is_thread_local=local)

    allocations = [alloc(1000, param=0), alloc(24, param=1),             # the batch (x, y)
                   alloc(4096, param=2, live=True),                      # a variable
                   alloc(512, param=3),                                  # a captured tensor
                   alloc(100_000), alloc(8, live=True), alloc(4, const=True),
                   alloc(4, local=True)]
    out = classify_allocations(allocations, 2, ["weights", "captured"])
    assert out["inputs"] == 1024 and out["arguments"] == 1000 + 24 + 4096 + 512
    assert out["captured"] == 512 and out["temporaries"] == 100_000 and out["outputs"] == 8
    assert out["constants"] == 4
    # 1000 -> 1024, 24 -> 256, 100000 -> 100096, 8 -> 256
    assert out["rounding"] == 24 + 232 + 96 + 248


def test_variables_are_replayed_in_the_order_they_were_made():
    from batchfit.backend.tensorflow.compiled import _in_creation_order

    second, first = keras.layers.Dense(2, name="listed_second"), keras.layers.Dense(2)
    first.build((None, 2))  # made first, listed second
    second.build((None, 3))
    model = keras.Sequential([keras.Input((3,)), second, first])
    model.compile(optimizer="adam", loss="mse")
    model.optimizer.build(model.trainable_variables)
    order = [v for _, v in _in_creation_order(model)]
    assert model.variables[0] is second.kernel          # the listing: graph order
    assert order[:4] == [first.kernel, first.bias, second.kernel, second.bias]
    assert {id(v) for v in order} >= {id(v) for v in model.optimizer.variables}
    kinds = {id(v): k for k, v in _in_creation_order(model)}
    assert kinds[id(model.optimizer.iterations)] == "optimizer_state"


def test_orthogonal_weights_and_traced_shape_constants_are_found():
    from batchfit.backend.tensorflow.compiled import _orthogonal_variables, shape_constant_bytes

    model = keras.Sequential([keras.Input((5, 3)), keras.layers.LSTM(4),
                              keras.layers.Reshape((2, 2)), keras.layers.Flatten()])
    model.compile(optimizer="sgd", loss="mse")
    lstm = model.layers[0]
    assert _orthogonal_variables(model) == {id(lstm.cell.recurrent_kernel)}
    fn = tf.function(lambda x: tf.reshape(tf.reduce_sum(x, axis=[1]), [-1, 3]))
    graph = fn.get_concrete_function(tf.TensorSpec((2, 5, 3))).graph
    assert sorted(shape_constant_bytes(graph)) == [4, 8]  # the axis (int32), the shape [-1, 3]
