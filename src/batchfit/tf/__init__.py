"""TensorFlow/Keras glue: the only package of batchfit that imports TensorFlow/Keras.

Everything else (``batchfit.core``, ``batchfit.results``, the report) stays importable without
TensorFlow. This package turns a model and the user's data (or nothing) into the batches a probe
trains on: :mod:`batchfit.tf.synth` synthesizes inputs and targets from the model itself,
:mod:`batchfit.tf.data` builds batches from a sample of the user's data, and
:mod:`batchfit.tf.loader` loads models and data from command-line specs.
"""
