"""Synthesized inputs and targets: the right target kind per loss, and the model trains on them."""

from __future__ import annotations

import pickle

import keras
import numpy as np
import pytest

from batchfit.backend.tensorflow.synth import (
    InputSpec,
    describe_synthesis,
    input_specs,
    loss_name,
    plan_synthesis,
    synthesize_batch,
)
from batchfit.errors import InvalidInputError


def _dense_model(loss, units: int = 4, activation: str | None = None, *,
                 eager: bool = True) -> keras.Model:
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(units, activation=activation)])
    model.compile(optimizer="sgd", loss=loss, run_eagerly=eager)
    return model


def _my_loss(y_true, y_pred):
    return keras.ops.mean(keras.ops.abs(y_true - y_pred))


def _is_onehot(y: np.ndarray) -> bool:
    return bool(np.all((y == 0) | (y == 1)) and np.all(y.sum(-1) == 1))


CASES = [
    ("sparse_categorical_crossentropy", "softmax",
     lambda y: y.shape == (16,) and y.dtype.kind == "i" and y.min() >= 0 and y.max() < 4),
    (keras.losses.SparseCategoricalCrossentropy(from_logits=True), None,
     lambda y: y.shape == (16,) and y.dtype.kind == "i" and y.max() < 4),
    (keras.losses.sparse_categorical_crossentropy, "softmax",
     lambda y: y.shape == (16,) and y.dtype.kind == "i"),
    ("categorical_crossentropy", "softmax", lambda y: y.shape == (16, 4) and _is_onehot(y)),
    (keras.losses.CategoricalFocalCrossentropy(), "softmax", _is_onehot),
    ("kl_divergence", "softmax",
     lambda y: y.shape == (16, 4) and np.all(y >= 0) and np.allclose(y.sum(-1), 1, atol=1e-5)),
    ("binary_crossentropy", "sigmoid",
     lambda y: y.shape == (16, 4) and set(np.unique(y)) <= {0.0, 1.0} and y.dtype == np.float32),
    (keras.losses.BinaryFocalCrossentropy(), "sigmoid", lambda y: set(np.unique(y)) <= {0.0, 1.0}),
    ("hinge", None, lambda y: set(np.unique(y)) == {-1.0, 1.0}),
    (keras.losses.SquaredHinge(), None, lambda y: set(np.unique(y)) == {-1.0, 1.0}),
    ("poisson", "softplus", lambda y: np.all(y >= 0) and np.all(y == np.round(y))),
    ("mse", None, lambda y: y.shape == (16, 4) and (y < 0).any() and y.dtype == np.float32),
    ("mae", None, lambda y: (y < 0).any()),
    (keras.losses.Huber(), None, lambda y: (y < 0).any()),
    ("log_cosh", None, lambda y: (y < 0).any()),
    ("msle", "relu", lambda y: np.all(y > 0)),
    (_my_loss, None, lambda y: y.shape == (16, 4) and np.all((y >= 0) & (y < 1))),
]


@pytest.mark.parametrize("loss,activation,check", CASES,
                         ids=[loss_name(c[0]) or "none" for c in CASES])
def test_each_loss_gets_fitting_targets_and_trains(loss, activation, check) -> None:
    model = _dense_model(loss, activation=activation)
    x, y = synthesize_batch(model, 16, seed=3)
    assert x.shape == (16, 5) and x.dtype == np.float32
    assert check(y), y
    assert np.isfinite(model.train_on_batch(x, y))


def test_unknown_loss_is_noted() -> None:
    model = _dense_model(_my_loss)
    notes = describe_synthesis(model)
    assert any("unknown loss '_my_loss'" in n and "[0,1)" in n for n in notes), notes


def test_label_losses_circle_and_ctc_get_integer_labels() -> None:
    # Circle takes (batch,) labels for (batch, dim) embeddings; CTC takes (batch, time) labels
    # for (batch, time, classes) outputs: real-valued targets of the output's shape crash both.
    emb = keras.Sequential([keras.Input((5,)), keras.layers.Dense(8),
                            keras.layers.UnitNormalization()])
    emb.compile(optimizer="sgd", loss=keras.losses.Circle())
    x, y = synthesize_batch(emb, 16)
    assert y.shape == (16,) and y.dtype.kind == "i"
    assert np.isfinite(emb.train_on_batch(x, y))
    seq = keras.Sequential([keras.Input((10, 3)), keras.layers.Dense(6, activation="softmax")])
    seq.compile(optimizer="sgd", loss=keras.losses.CTC())
    x, y = synthesize_batch(seq, 4)
    assert y.shape == (4, 10) and y.dtype.kind == "i" and y.max() < 6
    seq.train_on_batch(x, y)


def test_loss_class_names_with_acronyms_are_recognized() -> None:
    # compile(loss="KLDivergence") is accepted by Keras; it must get probability rows, not be
    # reported as an unknown loss.
    assert loss_name("KLDivergence") == "kl_divergence"
    assert loss_name("CTC") == "ctc" and loss_name("MSE") == "mse"
    model = _dense_model("KLDivergence", activation="softmax")
    _, y = synthesize_batch(model, 8)
    assert np.allclose(y.sum(-1), 1, atol=1e-5)
    assert not any("unknown loss" in n for n in describe_synthesis(model))


def test_sequence_output_sparse_labels_drop_class_axis() -> None:
    inp = keras.Input((6, 3))
    out = keras.layers.Dense(5, activation="softmax")(inp)
    model = keras.Model(inp, out)
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    x, y = synthesize_batch(model, 4)
    assert y.shape == (4, 6) and y.max() < 5
    assert np.isfinite(model.train_on_batch(x, y))  # graph mode


def test_integer_inputs_stay_in_embedding_vocabulary() -> None:
    inp = keras.Input((12,), dtype="int32", name="tokens")
    h = keras.layers.Embedding(7, 4)(keras.layers.Reshape((12,))(inp))
    out = keras.layers.Dense(2, activation="softmax")(keras.layers.GlobalAveragePooling1D()(h))
    model = keras.Model(inp, out)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    assert input_specs(model) == [InputSpec("tokens", (12,), "int32", 7)]
    x, y = synthesize_batch(model, 512, seed=1)
    assert x.dtype == np.int32 and x.min() >= 0 and x.max() == 6
    assert np.isfinite(model.train_on_batch(x, y))  # an out-of-range id would raise on CPU


def test_integer_input_feeding_two_embeddings_uses_smaller_vocab() -> None:
    inp = keras.Input((3,), dtype="int32")
    a = keras.layers.Embedding(50, 2)(inp)
    b = keras.layers.Embedding(9, 2)(inp)
    out = keras.layers.Dense(1)(keras.layers.Flatten()(keras.layers.Add()([a, b])))
    model = keras.Model(inp, out)
    model.compile(optimizer="sgd", loss="mse")
    assert input_specs(model)[0].int_high == 9


@keras.saving.register_keras_serializable(package="batchfit_tests")
class _TokenEmbedding(keras.layers.Layer):
    def __init__(self, vocab: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.vocab = vocab
        self.emb = keras.layers.Embedding(vocab, 4)

    def call(self, x):
        return self.emb(x)

    def compute_output_shape(self, s):
        return (*s, 4)


def test_custom_layer_owning_an_embedding_and_nested_model() -> None:
    tok = keras.Input((5,), dtype="int32", name="tok")
    ids = keras.Input((5,), dtype="int32", name="ids")
    inner_in = keras.Input((5,), dtype="int32")
    inner = keras.Model(inner_in, keras.layers.Embedding(11, 4)(inner_in))
    h = keras.layers.Concatenate()([_TokenEmbedding(13)(tok), inner(ids)])
    out = keras.layers.Dense(1)(keras.layers.Flatten()(h))
    model = keras.Model({"tok": tok, "ids": ids}, out)
    model.compile(optimizer="sgd", loss="mse")
    specs = {s.name: s.int_high for s in input_specs(model)}
    assert specs == {"tok": 13, "ids": 11}
    x, y = synthesize_batch(model, 64)
    assert np.isfinite(model.train_on_batch(x, y))


def test_integer_input_without_embedding_defaults_to_two() -> None:
    inp = keras.Input((3,), dtype="int32")
    out = keras.layers.Dense(1)(keras.layers.Lambda(lambda t: keras.ops.cast(t, "float32"))(inp))
    model = keras.Model(inp, out)
    model.compile(optimizer="sgd", loss="mse")
    assert input_specs(model)[0].int_high == 2


def test_none_time_dimension_needs_input_shapes() -> None:
    inp = keras.Input((None,), dtype="int32", name="tokens")
    h = keras.layers.Embedding(20, 4)(inp)
    out = keras.layers.Dense(3, activation="softmax")(keras.layers.GlobalAveragePooling1D()(h))
    model = keras.Model(inp, out)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    with pytest.raises(InvalidInputError) as err:
        synthesize_batch(model, 4)
    msg = str(err.value)
    for part in ("'tokens'", "(None,)", "input_shapes=", "{'tokens': (128,)}",
                 "--input-shape tokens=128", "data="):
        assert part in msg, (part, msg)
    x, y = synthesize_batch(model, 4, input_shapes={"tokens": (30,)})
    assert x.shape == (4, 30) and x.max() < 20
    x, y = synthesize_batch(model, 4, input_shapes=(31,))
    assert x.shape == (4, 31)
    assert np.isfinite(model.train_on_batch(x, y))


def test_bad_input_shapes_are_explained() -> None:
    inp = keras.Input((None, 8), name="seq")
    model = keras.Model(inp, keras.layers.Dense(1)(inp))
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(InvalidInputError, match="conflicts"):
        input_specs(model, {"seq": (10, 9)})
    with pytest.raises(InvalidInputError, match="rank"):
        input_specs(model, {"seq": (10,)})
    with pytest.raises(InvalidInputError, match="does not have"):
        input_specs(model, {"seq": (10, 8), "other": (3,)})
    assert input_specs(model, {"seq": (10, 8)})[0].shape == (10, 8)


def test_dict_inputs_and_outputs_with_loss_dict() -> None:
    tokens = keras.Input((6,), dtype="int32", name="tokens")
    feats = keras.Input((3,), name="feats")
    h = keras.layers.Concatenate()(
        [keras.layers.Flatten()(keras.layers.Embedding(7, 2)(tokens)), feats])
    cls = keras.layers.Dense(4, activation="softmax", name="cls")(h)
    reg = keras.layers.Dense(2, name="reg")(h)
    model = keras.Model({"tokens": tokens, "feats": feats}, {"cls": cls, "reg": reg})
    model.compile(optimizer="adam", loss={"cls": "sparse_categorical_crossentropy", "reg": "mse"})
    x, y = synthesize_batch(model, 8)
    assert set(x) == {"tokens", "feats"} and x["tokens"].max() < 7 and x["feats"].shape == (8, 3)
    assert y["cls"].shape == (8,) and y["cls"].dtype.kind == "i" and y["reg"].shape == (8, 2)
    assert np.all(np.isfinite(model.train_on_batch(x, y)))


def test_list_outputs_with_list_loss_and_single_loss() -> None:
    a = keras.Input((4,), name="a")
    b = keras.Input((2,), name="b")
    h = keras.layers.Concatenate()([a, b])
    o1 = keras.layers.Dense(3, activation="sigmoid")(h)
    o2 = keras.layers.Dense(1)(h)
    model = keras.Model([a, b], [o1, o2])
    model.compile(optimizer="sgd", loss=["binary_crossentropy", "mse"])
    x, y = synthesize_batch(model, 5)
    assert isinstance(x, list) and [v.shape for v in x] == [(5, 4), (5, 2)]
    assert set(np.unique(y[0])) <= {0.0, 1.0} and y[1].shape == (5, 1)
    assert np.all(np.isfinite(model.train_on_batch(x, y)))
    model.compile(optimizer="sgd", loss="mse")
    x, y = synthesize_batch(model, 5)
    assert [v.shape for v in y] == [(5, 3), (5, 1)]
    assert np.all(np.isfinite(model.train_on_batch(x, y)))


class _AddLossModel(keras.Model):
    def __init__(self) -> None:
        super().__init__()
        self.dense = keras.layers.Dense(2)

    def call(self, x):
        out = self.dense(x)
        self.add_loss(keras.ops.mean(out ** 2))
        return out


def test_add_loss_model_gets_no_targets() -> None:
    model = _AddLossModel()
    model.compile(optimizer="sgd", run_eagerly=True)
    x, y = synthesize_batch(model, 4, input_shapes=(3,))
    assert y is None and x.shape == (4, 3)
    assert any("y is None" in n for n in describe_synthesis(model, input_shapes=(3,)))
    model.train_on_batch(x, y)


class _Sub(keras.Model):
    def __init__(self) -> None:
        super().__init__()
        self.dense = keras.layers.Dense(2)

    def call(self, x):
        return self.dense(x)


def test_subclassed_model_needs_input_shapes_or_data() -> None:
    model = _Sub()
    model.compile(optimizer="sgd", loss="mse", run_eagerly=True)
    with pytest.raises(InvalidInputError) as err:
        synthesize_batch(model, 4)
    assert "data=" in str(err.value) and "input_shapes=" in str(err.value)
    x, y = synthesize_batch(model, 4, input_shapes=(6,))
    assert x.shape == (4, 6) and y.shape == (4, 2)
    model.train_on_batch(x, y)
    built = _Sub()
    built(np.zeros((1, 9), "float32"))  # called once: Keras records the input shape
    built.compile(optimizer="sgd", loss="mse")
    assert synthesize_batch(built, 2)[0].shape == (2, 9)


def test_deterministic_for_a_seed_and_picklable_plan() -> None:
    model = _dense_model("sparse_categorical_crossentropy", activation="softmax")
    x1, y1 = synthesize_batch(model, 8, seed=5)
    x2, y2 = synthesize_batch(model, 8, seed=5)
    x3, _ = synthesize_batch(model, 8, seed=6)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2) and not np.array_equal(x1, x3)
    plan = pickle.loads(pickle.dumps(plan_synthesis(model)))
    xp, yp = plan.batch(8, seed=5)
    assert np.array_equal(xp, x1) and np.array_equal(yp, y1)


def test_recompiling_changes_the_targets() -> None:
    model = _dense_model("mse")
    assert synthesize_batch(model, 2)[1].dtype == np.float32
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    assert synthesize_batch(model, 2)[1].dtype == np.int32


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "8"])
def test_bad_batch_size(bad) -> None:
    with pytest.raises(InvalidInputError, match="batch_size"):
        synthesize_batch(_dense_model("mse"), bad)


def test_sequential_built_by_calling_with_float_input_into_embedding() -> None:
    model = keras.Sequential([keras.layers.Embedding(5, 2), keras.layers.GlobalAveragePooling1D(),
                              keras.layers.Dense(2, activation="softmax")])
    model(np.zeros((1, 7)))  # no keras.Input: the input is float32, fed to the Embedding
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy", run_eagerly=True)
    x, y = synthesize_batch(model, 64)
    assert x.shape == (64, 7) and np.all(x == np.round(x)) and x.min() >= 0 and x.max() < 5
    assert any("feeds an Embedding" in n for n in describe_synthesis(model))
    assert np.isfinite(model.train_on_batch(x, y))
