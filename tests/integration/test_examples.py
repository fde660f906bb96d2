"""The example factories build, compile and train; the seed layers behave as documented."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from batchfit.backend.tensorflow.loader import check_model
from batchfit.backend.tensorflow.synth import synthesize_batch
from batchfit.examples import models
from batchfit.examples.seed import MemoryAwareLayer, MyCustomLayer, MyVariableBatchLayer

FACTORIES = ["seed_mlp", "seed_sequence", "seed_memory_aware", "demo_model", "cnn",
             "transformer", "lstm"]


@pytest.mark.parametrize("name", FACTORIES)
def test_factory_builds_compiles_and_trains(name: str) -> None:
    model = getattr(models, name)()
    check_model(model)
    x, y = synthesize_batch(model, 8)
    loss = model.train_on_batch(x, y)
    assert np.isfinite(loss)


def test_memory_aware_model_raises_above_its_limit() -> None:
    model = models.seed_memory_aware(limit=8)
    assert model.run_eagerly
    model.train_on_batch(*synthesize_batch(model, 8))  # at the limit: fine
    with pytest.raises(ValueError, match="Batch size 9 exceeds maximum allowed 8"):
        model.train_on_batch(*synthesize_batch(model, 9))


def test_memory_aware_layer_fails_in_graph_mode() -> None:
    # As documented in batchfit.examples.seed: the Python `if` on a tensor cannot be traced.
    with pytest.raises(tf.errors.OperatorNotAllowedInGraphError):
        keras.Sequential([keras.Input((4,)), MemoryAwareLayer(8)])
    model = models.SeedMemoryAwareModel(limit=8, features=4)
    model.build((None, 4))
    model.compile(optimizer="sgd", loss="mse")  # default: a traced (graph) train step
    with pytest.raises(tf.errors.OperatorNotAllowedInGraphError):
        model.train_on_batch(np.zeros((2, 4)), np.zeros((2, 1)))


def test_seed_layer_quirks() -> None:
    layer = MyCustomLayer(3)
    assert len(layer.weights) == 1 and layer.weights[0].shape == (3,)  # created in __init__
    assert tuple(layer(np.ones((5, 3), "float32")).shape) == (5, 1)
    # "mean along batch dimension" says the comment; the code averages axis 1 (time).
    x = np.arange(24, dtype="float32").reshape(2, 3, 4)
    out = MyVariableBatchLayer()(x).numpy()
    assert out.shape == (2, 4) and np.allclose(out, x.mean(axis=1))


@pytest.mark.filterwarnings("ignore:Skipping variable loading")  # optimizer never stepped
def test_transformer_layers_serialize(tmp_path) -> None:
    attention = models.MultiHeadSelfAttention(2, 4, name="att")
    clone = models.MultiHeadSelfAttention.from_config(attention.get_config())
    assert (clone.num_heads, clone.key_dim, clone.name) == (2, 4, "att")
    model = models.transformer(vocab_size=50, max_length=8, dim=8, num_heads=2)
    path = tmp_path / "t.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    x = np.arange(16, dtype="int32").reshape(2, 8)
    assert np.allclose(model.predict(x, verbose=0), loaded.predict(x, verbose=0), atol=1e-6)


def test_attention_handles_any_batch_and_length() -> None:
    layer = models.MultiHeadSelfAttention(2, 3)
    for shape in [(1, 5, 6), (7, 2, 6)]:
        assert tuple(layer(np.ones(shape, "float32")).shape) == shape
