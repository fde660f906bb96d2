"""Probe processes: the fork server, the worker protocol and the stall watch.

The parent side of this package never imports TensorFlow (tested): it starts workers, sends them
batch sizes and reads back :class:`~batchfit.results.Probe` records. Only the worker's own entry
points (run in the child) reach the Keras backend, through :mod:`batchfit.backend`.
"""
