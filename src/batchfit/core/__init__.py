"""Pure numeric and search logic: NumPy only, never imports TensorFlow or Keras.

Everything here can be unit-tested in milliseconds and reused outside batchfit (a scheduler,
another framework). ``tests/test_layering.py`` proves that importing it loads no TensorFlow.
"""
