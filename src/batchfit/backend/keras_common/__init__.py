"""What every Keras 3 backend shares: models from specs, batches, the layers ``check`` looks at.

Loading a model (a ``'file.py:factory'`` / ``'package.module:factory'`` spec, a factory, a
``.keras`` file), reading the user's data, synthesizing batches from a model's input specs and
loss, and finding the layers ``batchfit check`` probes are Keras's, not TensorFlow's: this
logic imports ``keras`` and NumPy only, and TensorFlow only when the user's object is a
TensorFlow one (a ``tf.data.Dataset``, a ``tf.Module``). The JAX backend
(:mod:`batchfit.backend.jax`) uses it from here; :mod:`batchfit.backend.tensorflow` uses the
same functions.

The modules still live in ``backend/tensorflow/`` (``loader``, ``synth``, ``data``,
``check_targets``, ``keras_compat``, and ``check_layer``'s
:class:`LayerProbe`, whose TensorFlow-only methods the JAX probe overrides), where other work in progress edits them; this package is
the one place a second backend reaches them, so moving them here later changes no caller.
Every test under ``tests/jax`` checks that using them under ``KERAS_BACKEND=jax`` never
imports TensorFlow (``tests/jax/conftest.py``).

Example:

>>> from batchfit.backend import keras_common
>>> callable(keras_common.load_model) and callable(keras_common.synthesize_batch)
True
"""

from __future__ import annotations

from ..tensorflow.check_layer import LayerProbe
from ..tensorflow.check_targets import (
    LayerInput,
    check_targets,
    custom_layers,
    is_custom_layer,
    is_custom_layer_class,
    load_checkable,
)
from ..tensorflow.data import DataSample
from ..tensorflow.keras_compat import drop_new_nodes, node_counts, sublayers
from ..tensorflow.loader import check_model, load_data, load_model, model_from_factory
from ..tensorflow.synth import batch_fn_for, describe_synthesis, synthesize_batch

__all__ = [
    "DataSample",
    "LayerInput",
    "LayerProbe",
    "batch_fn_for",
    "check_model",
    "check_targets",
    "custom_layers",
    "describe_synthesis",
    "drop_new_nodes",
    "is_custom_layer",
    "is_custom_layer_class",
    "load_checkable",
    "load_data",
    "load_model",
    "model_from_factory",
    "node_counts",
    "sublayers",
    "synthesize_batch",
]
