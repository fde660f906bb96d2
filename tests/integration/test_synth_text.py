"""Synthesized inputs of text models: token ids and segment ids in their own vocabularies,
masks as masks (ones, trailing padding), for a plain Keras model and KerasHub's BERT and GPT-2
(those two need ``keras_hub``, which ``make`` installs)."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from batchfit.backend.tensorflow.synth import describe_synthesis, input_specs, plan_synthesis

SEQ = 12


def _is_padding_mask(m: np.ndarray) -> bool:
    """Ones then zeros on every row, at least one 1 per row, the first row all ones."""
    rows_ok = all(r[0] == 1 and np.all(np.diff(r.astype(int)) <= 0) for r in m)
    return bool(rows_ok and set(np.unique(m)) <= {0, 1} and np.all(m[0] == 1))


def _encoder() -> keras.Model:
    names = ("token_ids", "segment_ids", "padding_mask", "keep")
    token_ids, segment_ids, padding_mask, keep = (
        keras.Input((None,), dtype="int32", name=n) for n in names)
    x = keras.layers.Embedding(50, 8)(token_ids) + keras.layers.Embedding(2, 8)(segment_ids)
    x = x * keras.ops.expand_dims(keras.ops.cast(padding_mask, "float32"), -1)
    # 'keep' is not named as a mask, but it is passed as one.
    pooled = keras.layers.GlobalAveragePooling1D()(x, mask=keep)
    model = keras.Model([token_ids, segment_ids, padding_mask, keep],
                        keras.layers.Dense(3)(pooled))
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(True))
    return model


def test_ids_get_their_vocabularies_and_masks_get_padding() -> None:
    model = _encoder()
    shapes = {n: (SEQ,) for n in ("token_ids", "segment_ids", "padding_mask", "keep")}
    specs = {s.name: s for s in input_specs(model, shapes)}
    assert (specs["token_ids"].int_high, specs["token_ids"].role) == (50, None)
    assert (specs["segment_ids"].int_high, specs["segment_ids"].role) == (2, None)
    assert specs["padding_mask"].role == "mask" and specs["keep"].role == "mask"
    x, y = plan_synthesis(model, shapes).batch(64, seed=3)
    tokens, segments, mask, keep = x
    assert tokens.min() >= 0 and tokens.max() == 49      # the whole vocabulary, nothing above
    assert set(np.unique(segments)) == {0, 1}
    for m in (mask, keep):
        assert m.dtype == np.int32 and _is_padding_mask(m)
        assert (m == 0).any()                              # some rows are padded
    notes = describe_synthesis(model, shapes)
    assert any("'keep'" in n and "'mask' argument" in n for n in notes)
    assert np.isfinite(model.train_on_batch(x, y))


def test_a_mask_that_is_not_a_sequence_is_all_ones() -> None:
    inp = keras.Input((3, 4), dtype="int32", name="attention_mask")
    model = keras.Model(inp, keras.layers.Flatten()(keras.ops.cast(inp, "float32")))
    x, _ = plan_synthesis(model).batch(5)
    assert x.shape == (5, 3, 4) and np.all(x == 1)


def test_kerashub_bert_and_gpt2_inputs() -> None:
    pytest.importorskip("keras_hub")
    import hub_models

    bert = hub_models.bert(vocabulary=100)
    shapes = {n: (SEQ,) for n in ("token_ids", "segment_ids", "padding_mask")}
    specs = {s.name: s for s in input_specs(bert, shapes)}
    assert specs["token_ids"].int_high == 100 and specs["segment_ids"].int_high == 2
    assert specs["padding_mask"].role == "mask" and specs["padding_mask"].int_high is None
    x, _ = plan_synthesis(bert, shapes).batch(16, seed=1)
    assert _is_padding_mask(x["padding_mask"]) and x["token_ids"].max() < 100
    assert np.isfinite(keras.ops.convert_to_numpy(bert(x))).all()

    gpt2 = hub_models.gpt2(vocabulary=1000)
    shapes = {"token_ids": (SEQ,), "padding_mask": (SEQ,)}
    x, y = plan_synthesis(gpt2, shapes).batch(16, seed=2)
    # The mask was integers in [0, vocabulary) before: now ones with padding, never ids.
    assert _is_padding_mask(x["padding_mask"])
    assert x["token_ids"].max() < 1000 and y.shape == (16, SEQ) and y.max() < 1000
