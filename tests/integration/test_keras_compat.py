"""Each private Keras/TensorFlow API in keras_compat still answers on the pinned Keras.

A canary: when a Keras or TensorFlow upgrade moves one of them, the test of that function fails
here, by name, before the code that relies on it fails somewhere less obvious.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from batchfit.backend.tensorflow import keras_compat as kc


class _Block(keras.layers.Layer):
    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(4)
        self.norm = keras.layers.BatchNormalization()

    def call(self, x: object, training: bool = False) -> object:
        return self.norm(self.dense(x), training=training)


class _NoTraining(keras.layers.Layer):
    def call(self, x: object) -> object:
        return x


def _functional() -> keras.Model:
    inp = keras.Input((3,), name="features")
    out = keras.layers.Dense(1)(_Block(name="block")(inp))
    model = keras.Model(inp, out)
    model.compile(keras.optimizers.SGD(0.1), "mse")
    return model


def test_layer_graph() -> None:
    model = _functional()
    names = {type(layer).__name__ for layer in kc.sublayers(model) or []}
    assert {"_Block", "Dense", "BatchNormalization"} <= names
    block = model.get_layer("block")
    assert kc.sublayers(block, include_self=True)[0] is block
    assert kc.sublayers(object()) is None
    nodes = kc.inbound_nodes(block)
    assert len(nodes) == 1 and len(nodes[0].arguments.args) == 1
    assert nodes[0].input_tensors
    assert kc.inbound_nodes(object()) == []
    assert kc.keras_history_layer(model.inputs[0]).name == "features"
    assert kc.keras_history_layer(np.zeros(1)) is None


def test_node_counts_and_drop_new_nodes() -> None:
    layer = keras.layers.Dense(2)
    layer(keras.Input((3,)))
    counts = kc.node_counts(layer)
    assert counts == (1, 0)
    layer(keras.Input((3,)))
    assert kc.node_counts(layer) == (2, 0)
    kc.drop_new_nodes(layer, counts)
    assert kc.node_counts(layer) == counts


def test_build_shapes_and_training_arg() -> None:
    layer = _Block()
    layer(np.zeros((2, 3), "float32"))
    assert tuple(next(iter(kc.build_shapes(layer).values()))) == (2, 3)
    assert kc.build_shapes(keras.layers.Dense(1)) is None
    assert kc.call_has_training_arg(layer) is True
    assert kc.call_has_training_arg(_NoTraining()) is False


def test_model_loss_strategy_and_step_function() -> None:
    model = _functional()
    x, y = np.ones((4, 3), "float32"), np.ones((4, 1), "float32")
    assert kc.compile_loss(model) is not None
    assert kc.compile_loss(keras.Sequential([keras.layers.Dense(1)])) is None
    loss = kc.compute_loss_fn(model)(x=x, y=y, y_pred=model(x), sample_weight=None,
                                      training=True)
    assert float(kc.unscale_loss_for_distribution(loss)) == float(loss)  # one replica
    assert kc.model_distribute_strategy(model) is None
    with tf.distribute.OneDeviceStrategy("/cpu:0").scope() as _:
        scoped = _functional()
    assert kc.model_distribute_strategy(scoped) is not None
    step = kc.make_step_function(model, model.train_step)
    logs = step(iter([(x, y)]))
    assert "loss" in logs


def test_optimizer_state() -> None:
    model = _functional()
    opt = model.optimizer
    opt.build(model.trainable_variables)
    assert int(kc.optimizer_iterations(opt).numpy()) == 0
    kc.optimizer_iterations(opt).assign(3)
    assert int(opt.iterations.numpy()) == 3
    variables = kc.optimizer_trainable_variables(opt)
    assert len(variables) == len(model.trainable_variables)
    assert kc.optimizer_variable_index(opt, variables[1]) == 1
    assert float(kc.learning_rate_value(opt).numpy()) == np.float32(0.1)
    assert float(kc.current_learning_rate_fn(opt)().numpy()) == np.float32(0.1)
    kc.set_current_learning_rate_fn(opt, lambda: tf.constant(0.5))
    assert float(kc.current_learning_rate_fn(opt)()) == 0.5
    kc.restore_current_learning_rate_fn(opt)
    kc.restore_current_learning_rate_fn(opt)  # twice: nothing left to undo
    assert float(kc.current_learning_rate_fn(opt)().numpy()) == np.float32(0.1)
    assert not kc.accumulated_gradients(opt)
    accs = [keras.Variable(np.zeros(v.shape, "float32"), trainable=False) for v in variables]
    n_vars = len(opt.variables)
    kc.set_accumulated_gradients(opt, accs)
    assert kc.accumulated_gradients(opt) is accs
    assert len(opt.variables) == n_vars  # not tracked: checkpoints keep the user's variables


def test_tensorflow_internals() -> None:
    base = tf.data.Dataset.range(8)
    mapped = base.map(lambda v: v * 2)
    assert kc.upstream_dataset(mapped) is not None
    zipped = tf.data.Dataset.zip((mapped, base))
    assert kc.upstream_dataset(zipped) is not None
    assert kc.upstream_dataset(object()) is None
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=7.0)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    assert kc.communication_options_of(strategy).timeout_seconds == 7.0
    assert kc.communication_options_of(object()) is None


def test_keras2_objects() -> None:
    assert not kc.is_keras2_object(_functional())
    assert not kc.is_keras2_object(object())
    legacy = type("Legacy", (), {"__module__": "keras.src.legacy.layers"})()
    assert kc.is_keras2_object(legacy)


def test_is_graph_model() -> None:
    class Sub(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.dense = keras.layers.Dense(1)

        def call(self, x: object) -> object:
            return self.dense(x)

    class GraphSubclass(keras.Model):  # a KerasHub backbone's way: functional init
        def __init__(self) -> None:
            inp = keras.Input((3,))
            super().__init__(inp, keras.layers.Dense(1)(inp))

    assert kc.is_graph_model(_functional())
    assert kc.is_graph_model(keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)]))
    assert kc.is_graph_model(GraphSubclass())
    assert not kc.is_graph_model(Sub())
    assert not kc.is_graph_model(keras.layers.Dense(1))
