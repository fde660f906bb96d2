"""Keras on JAX: this folder runs in a pytest of its own, ``KERAS_BACKEND=jax pytest tests/jax``
(``make test`` runs it after the TensorFlow suite, which leaves this folder out).

Keras reads ``KERAS_BACKEND`` once, when first imported; a run that imported it with another
backend stops here with the command to use. Nothing in this folder may import TensorFlow:
:func:`no_tensorflow` checks it after every test (the GPU machines have no TensorFlow).
"""

from __future__ import annotations

import os
import sys

import pytest

if os.environ.get("KERAS_BACKEND", "").strip().lower() != "jax":  # pragma: no cover
    pytest.exit("tests/jax need KERAS_BACKEND=jax set before Keras is imported: run "
                "`KERAS_BACKEND=jax python -m pytest tests/jax` (make test does)", returncode=4)

import keras

if keras.config.backend() != "jax":  # pragma: no cover
    pytest.exit(f"Keras was imported with {keras.config.backend()!r}; tests/jax need jax",
                returncode=4)


@pytest.fixture(autouse=True)
def no_tensorflow():
    """Every JAX test runs without TensorFlow ever being imported (as on the GPU machines)."""
    yield
    assert "tensorflow" not in sys.modules, "a JAX code path imported TensorFlow"
