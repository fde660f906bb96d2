"""Example models for batchfit's tests, benchmarks and demo.

- :mod:`batchfit.examples.seed`: the three custom layers of batchfit's origin document
  ("How do I determine the batch size in a TensorFlow custom layer?"), reproduced faithfully.
- :mod:`batchfit.examples.models`: zero-argument factories returning small compiled models
  (``seed_mlp``, ``seed_sequence``, ``seed_memory_aware``, ``demo_model``, ``cnn``,
  ``transformer``, ``lstm``), usable as CLI specs such as
  ``batchfit.examples.models:demo_model``.

Importing this package imports nothing; its submodules import TensorFlow/Keras.
"""
