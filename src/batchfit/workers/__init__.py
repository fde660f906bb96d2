"""Probe processes: the fork server, the worker protocol and the stall watch.

The parent side of this package never imports TensorFlow (tested): it starts workers, sends them
batch sizes and reads back :class:`~batchfit.results.Probe` records. Only the worker's own entry
points (run in the child) reach the Keras backend, through :mod:`batchfit.backend`.

- :mod:`.worker`: :class:`~.worker.ProbeWorker` (the parent side of the protocol) and what it
  sends a worker (:class:`~.worker.WorkerConfig`, :class:`~.worker.ModelSource`);
- :mod:`.server`: the fork server kept between searches (:func:`~.server.fork_server_status`,
  :func:`~.server.close_fork_server`);
- :mod:`.child`: what runs in the worker and in the fork server;
- :mod:`.stall`: tells a probe waiting on the capped allocator from one that computes.
"""
