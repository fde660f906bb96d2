"""The docstring examples of the JAX backend's modules, run on Keras's JAX backend."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "batchfit.backend.jax", "batchfit.backend.jax.compiled", "batchfit.backend.jax.step",
    "batchfit.backend.jax.probe", "batchfit.backend.jax.noise", "batchfit.backend.keras_common",
    "batchfit.backend.keras_common.sampler", "batchfit.examples.portable",
    "batchfit.backend.jax.fit_data", "batchfit.backend.jax.distribute",
    "batchfit.backend.jax.noise_monitor", "batchfit.backend.keras_common.noise_monitor",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no docstring example"
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
