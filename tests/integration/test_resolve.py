"""The one resolver, as every verb meets it: what a model argument may be, and what is refused."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import batchfit
from batchfit.errors import InvalidInputError
from batchfit.verbs.resolve import resolve


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(64, 4)).astype("float32"), rng.normal(size=(64, 1)).astype("float32")


@pytest.mark.parametrize("call", [
    lambda m: batchfit.find_max_batch_size(m, memory="64MiB"),
    lambda m: batchfit.tune(m, memory="64MiB"),
    lambda m: batchfit.estimate_noise_scale(m, _data(), small=4, big=16, steps=4),
    lambda m: resolve(m),
], ids=["max", "tune", "noise", "resolve"])
def test_a_layer_is_refused_with_how_to_wrap_it_not_called_as_a_factory(call) -> None:
    with pytest.raises(InvalidInputError, match="a Layer, not a Model. Wrap it"):
        call(keras.layers.Dense(1))


def test_a_factory_a_spec_and_a_model_resolve_alike() -> None:
    from batchfit.examples.models import seed_mlp

    by_factory = resolve(seed_mlp, build=True)
    by_spec = resolve("batchfit.examples.models:seed_mlp", build=True)
    given = seed_mlp()
    by_object = resolve(given)
    assert by_factory.model.name == by_spec.model.name == given.name == "seed_mlp"
    assert by_object.model is given and by_object.given_object
    assert not by_factory.given_object and by_factory.rebuildable is seed_mlp
    assert (by_factory.replicas, by_factory.distribute, by_factory.strategy) == (1, "", None)
