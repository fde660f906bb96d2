"""Batches from the user's own data: arrays, tf.data (batched, unbatched, padded), PyDataset."""

from __future__ import annotations

import pickle

import keras
import numpy as np
import pytest
import tensorflow as tf

from batchfit.backend.tensorflow.data import (
    DataSample,
    batch_from_data,
    flatten_structure,
    pack_structure,
)
from batchfit.errors import InvalidInputError


def test_arrays_cycle_to_exact_batch_size() -> None:
    x = np.arange(10, dtype="float32").reshape(5, 2)
    y = np.arange(5)
    bx, by = batch_from_data((x, y), 12)
    assert bx.shape == (12, 2) and by.shape == (12,)
    assert by.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    assert np.array_equal(bx[5], x[0])
    _sx, sy = batch_from_data((x, y), 3)
    assert sy.tolist() == [0, 1, 2]


def test_nested_inputs_and_outputs() -> None:
    x = {"tokens": np.zeros((4, 6), "int32"), "feats": np.ones((4, 3), "float32")}
    y = [np.zeros(4), np.ones((4, 2))]
    bx, by = batch_from_data((x, y), 7)
    assert set(bx) == {"tokens", "feats"} and bx["tokens"].shape == (7, 6)
    assert bx["tokens"].dtype == np.int32
    assert isinstance(by, list) and by[1].shape == (7, 2)


def test_sample_weights_are_dropped_with_a_note() -> None:
    s = DataSample.from_data((np.zeros((3, 2)), np.zeros(3), np.ones(3)))
    assert s.batch(2)[1].shape == (2,)
    assert any("sample weights dropped" in n for n in s.notes)


def test_inputs_only() -> None:
    s = DataSample.from_data(np.zeros((3, 2)))
    x, y = s.batch(4)
    assert x.shape == (4, 2) and y is None and any("no targets" in n for n in s.notes)


def test_mismatched_lengths_are_named() -> None:
    with pytest.raises(InvalidInputError) as err:
        batch_from_data((np.zeros((5, 2)), np.zeros(4)), 2)
    msg = str(err.value)
    assert "same number of examples" in msg and "x: 5" in msg and "y: 4" in msg


@pytest.mark.parametrize("data,words", [
    ((np.zeros((0, 3)), np.zeros(0)), "empty"),
    ((), "Empty"),
    (42, "Unsupported data type int"),
    ("train.csv", "Unsupported data type str"),
    ((x for x in range(3)), "generator"),
    (None, "No data"),
    ((np.zeros((2, 2)), np.zeros(2), np.zeros(2), np.zeros(2)), "length 4"),
])
def test_bad_data_is_explained(data, words) -> None:
    with pytest.raises(InvalidInputError) as err:
        DataSample.from_data(data)
    assert words in str(err.value)
    assert "expected" in str(err.value).lower() or "example" in str(err.value)


def test_empty_dataset() -> None:
    ds = tf.data.Dataset.from_tensor_slices((np.zeros((0, 2)), np.zeros(0)))
    with pytest.raises(InvalidInputError, match="empty"):
        DataSample.from_data(ds)


def test_batched_and_unbatched_datasets_give_the_same_examples() -> None:
    x = np.arange(30, dtype="float32").reshape(10, 3)
    y = np.arange(10)
    unbatched = tf.data.Dataset.from_tensor_slices((x, y))
    for ds in (unbatched, unbatched.batch(4), unbatched.batch(4).map(lambda a, b: (a, b)).prefetch(1),
               unbatched.batch(4).unbatch()):
        s = DataSample.from_data(ds)
        assert s.num_examples == 10, ds
        bx, by = s.batch(16)
        assert bx.shape == (16, 3) and by.tolist()[:11] == [*range(10), 0]


def test_dataset_with_weights_and_dict_inputs() -> None:
    ds = tf.data.Dataset.from_tensor_slices(
        ({"a": np.zeros((6, 2)), "b": np.ones((6, 5))}, np.zeros(6), np.ones(6))).batch(3)
    s = DataSample.from_data(ds)
    x, y = s.batch(4)
    assert x["b"].shape == (4, 5) and y.shape == (4,)
    assert any("sample weights dropped" in n for n in s.notes)


def _varlen_dataset() -> tf.data.Dataset:
    lengths = [3, 9, 5, 2]

    def gen():
        for i, n in enumerate(lengths):
            yield np.full((n,), i + 1, "int32"), np.int32(i % 2)

    return tf.data.Dataset.from_generator(
        gen, output_signature=(tf.TensorSpec((None,), tf.int32), tf.TensorSpec((), tf.int32)))


def test_unbatched_variable_length_uses_longest_example() -> None:
    s = DataSample.from_data(_varlen_dataset())
    x, _y = s.batch(5)
    assert x.shape == (5, 9) and np.all(x == 2)  # the example of length 9, repeated
    assert any("largest" in n and "longest" in n for n in s.notes), s.notes


def test_padded_batches_use_longest_padded_example() -> None:
    ds = _varlen_dataset().padded_batch(2)  # batches padded to 9 and to 5
    s = DataSample.from_data(ds)
    x, _y = s.batch(3)
    assert x.shape == (3, 9) and any("longest" in n for n in s.notes)


def test_longest_example_trains_a_model() -> None:
    inp = keras.Input((None,), dtype="int32")
    h = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(10, 4)(inp))
    model = keras.Model(inp, keras.layers.Dense(2, activation="softmax")(h))
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy", run_eagerly=True)
    x, y = batch_from_data(_varlen_dataset().padded_batch(2), 8)
    assert np.isfinite(model.train_on_batch(x, y))


def test_generator_dataset_detection_can_be_overridden() -> None:
    def gen():
        for _ in range(3):
            yield np.zeros((4, 2), "float32"), np.zeros((4,), "float32")

    ds = tf.data.Dataset.from_generator(
        gen, output_signature=(tf.TensorSpec((None, 2)), tf.TensorSpec((None,))))
    s = DataSample.from_data(ds)
    assert s.num_examples == 12 and any("taken as batched" in n for n in s.notes)
    s2 = DataSample.from_data(ds, batched=False)
    assert s2.num_examples == 3 and s2.batch(2)[0].shape == (2, 4, 2)


def test_materialized_examples_are_capped() -> None:
    s = DataSample.from_data((np.zeros((5000, 2)), np.zeros(5000)))
    assert s.num_examples == 4096 and any("first 4096" in n for n in s.notes)
    ds = tf.data.Dataset.from_tensor_slices(np.zeros((100, 2))).repeat()  # infinite
    assert DataSample.from_data(ds, max_examples=50).num_examples == 50


def test_sample_pickles() -> None:
    s = DataSample.from_data(({"a": np.arange(6).reshape(3, 2)}, [np.arange(3), np.ones((3, 1))]))
    s2 = pickle.loads(pickle.dumps(s))
    x1, y1 = s.batch(5)
    x2, y2 = s2.batch(5)
    assert np.array_equal(x1["a"], x2["a"]) and np.array_equal(y1[1], y2[1])
    assert s2.notes == s.notes


class _Seq(keras.utils.PyDataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int):
        return np.full((3, 2), i, "float32"), np.full((3,), i, "float32")


def test_py_dataset() -> None:
    s = DataSample.from_data(_Seq())
    assert s.num_examples == 6 and s.batch(7)[0].shape == (7, 2)


def test_structure_roundtrip() -> None:
    struct = {"b": (np.zeros(1), None), "a": [1, {"c": 2}]}
    leaves, template = flatten_structure(struct)
    assert leaves[:2] == [1, 2]
    back = pack_structure(template, leaves)
    assert back["a"] == [1, {"c": 2}] and back["b"][1] is None


def test_bad_batch_size() -> None:
    with pytest.raises(InvalidInputError, match="batch_size"):
        batch_from_data((np.zeros((2, 2)), np.zeros(2)), 0)


@pytest.mark.parametrize("batched", [True, False])
def test_dataset_reading_stops_at_max_examples_with_a_note(batched) -> None:
    x = np.arange(40, dtype="float32").reshape(20, 2)
    y = np.arange(20)
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if batched:
        ds = ds.batch(3)                             # 7 batches; the cap falls inside the 3rd
    s = DataSample.from_data(ds, max_examples=7)
    assert s.num_examples == 7
    assert any("read the first 7 examples of the tf.data.Dataset" in n for n in s.notes)
    bx, by = s.batch(7)
    assert by.tolist() == list(range(7)) and np.array_equal(bx, x[:7])


class _Ragged(keras.utils.PyDataset):
    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int):
        return np.zeros((3, 2), "float32"), np.zeros((2,), "float32")


def test_a_batch_with_x_and_y_of_different_lengths_is_named() -> None:
    with pytest.raises(InvalidInputError, match=r"different lengths \[2, 3\]"):
        DataSample.from_data(_Ragged())


def test_text_data_batched_dataset_and_object_array_train_a_model() -> None:
    # String models (TextVectorization) need data=; a batched tf.string dataset (as from
    # keras.utils.text_dataset_from_directory) and a pandas-like object column must be accepted.
    texts = np.array(["the cat sat", "a dog ran far", "hello", "x y z"])
    labels = np.arange(4) % 2
    vec = keras.layers.TextVectorization(max_tokens=20, output_sequence_length=5)
    vec.adapt(texts)
    inp = keras.Input((), dtype="string")
    h = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(20, 4)(vec(inp)))
    model = keras.Model(inp, keras.layers.Dense(2, activation="softmax")(h))
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    for data in (tf.data.Dataset.from_tensor_slices((texts, labels)).batch(2),
                 (texts.astype(object), labels)):
        x, y = batch_from_data(data, 6)
        assert x.shape == (6,) and y.shape == (6,)
        assert np.isfinite(model.train_on_batch(x, y))
    with pytest.raises(InvalidInputError, match="Python objects"):
        batch_from_data((np.array([[1, 2], [3]], dtype=object), np.zeros(2)), 2)
