"""Collectives across the workers of a ``tf.distribute`` strategy, and the upstream-fit probe.

What :mod:`batchfit.verbs.multiworker` (the agreed search) and
:mod:`batchfit.verbs.multiworker_fit` (the resilient multi-worker fit) need from TensorFlow to
coordinate workers: this worker's place among them (:func:`worker_position`), an all-gather
of a few numbers that carries a timeout (:func:`all_gather`), and whether Keras's own
``model.fit`` trains under the strategy (:func:`upstream_fit_works`, probed once per strategy:
keras-team/keras issue 20585). The reduce ops of a multi-worker strategy are SUM and MEAN
only, so a minimum or a vote is an all-gather each worker reduces itself.

Example:

>>> import tensorflow as tf
>>> worker_position(tf.distribute.get_strategy())
(0, 1)
>>> all_gather(tf.distribute.get_strategy(), [48.0], timeout=None).tolist()
[[48.0]]
"""

from __future__ import annotations

import weakref
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from ...errors import error_line

__all__ = [
    "KNOWN_UPSTREAM_FAILURE",
    "all_gather",
    "communication_options",
    "upstream_fit_failure",
    "upstream_fit_works",
    "worker_position",
]

KNOWN_UPSTREAM_FAILURE = "PerReplica"  # keras-team/keras#20585: "Attempt to convert a value (PerReplica"

_UPSTREAM: weakref.WeakKeyDictionary[Any, tuple[bool, str]] = weakref.WeakKeyDictionary()


def worker_position(strategy: tf.distribute.Strategy) -> tuple[int, int]:
    """``(this worker's index, number of workers)``; ``(0, 1)`` for a single-process strategy.

    Workers are numbered as TensorFlow orders its tasks: the chief (if any) first, then the
    workers by their ``TF_CONFIG`` index.
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:
        return 0, 1
    try:
        spec = resolver.cluster_spec().as_dict()
    except Exception:  # noqa: BLE001 - no cluster: one process
        return 0, 1
    tasks = ([("chief", i) for i in range(len(spec.get("chief", [])))]
             + [("worker", i) for i in range(len(spec.get("worker", [])))])
    if not tasks:
        return 0, 1
    me = (resolver.task_type, int(resolver.task_id or 0))
    return (tasks.index(me) if me in tasks else 0), len(tasks)


def communication_options(timeout: float | None
                          ) -> tf.distribute.experimental.CommunicationOptions:
    """Options that bound a collective to ``timeout`` seconds (``None``: the strategy's own)."""
    return tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout)


def all_gather(strategy: tf.distribute.Strategy, values: list[float], timeout: float | None
               ) -> np.ndarray:
    """Every replica's ``values`` (same on the replicas of one worker): ``(replicas, k)``."""
    row = tf.constant([values], dtype=tf.float64)
    options = communication_options(timeout)

    def gather() -> Any:
        ctx = tf.distribute.get_replica_context()
        return ctx.all_gather(tf.identity(row), axis=0, options=options)

    out = strategy.run(gather)
    return np.asarray(strategy.experimental_local_results(out)[0].numpy())


def upstream_fit_works(strategy: tf.distribute.Strategy, *, timeout: float = 120.0
                       ) -> bool:
    """The TensorFlow side of :func:`batchfit.upstream_fit_works` (documented there): a
    one-unit model fitted for one step under ``strategy``, the answer agreed by all workers.

    Example:

    >>> upstream_fit_works(tf.distribute.get_strategy())
    True
    """
    cached = _UPSTREAM.get(strategy)
    if cached is not None:
        return cached[0]
    replicas = int(strategy.num_replicas_in_sync)
    detail = ""
    with strategy.scope():
        probe = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)],
                                 name="batchfit_upstream_probe")
        probe.compile(keras.optimizers.SGD(0.0), "mse")
    x = np.zeros((2 * replicas, 1), "float32")
    try:
        probe.fit(x, x, batch_size=replicas, epochs=1, steps_per_epoch=1, verbose=0,
                  shuffle=False)
        ok = True
    except Exception as exc:  # noqa: BLE001 - any failure means "do not use fit"
        ok = False
        known = KNOWN_UPSTREAM_FAILURE in str(exc)
        detail = (f"{type(exc).__name__}: {error_line(exc, limit=200)}"
                  + ("" if known else " (not the known keras#20585 failure)"))
    if worker_position(strategy)[1] > 1 or replicas > 1:
        votes = all_gather(strategy, [1.0 if ok else 0.0], timeout)
        ok = bool(np.all(votes > 0.5))
    _UPSTREAM[strategy] = (ok, detail)
    return ok


def upstream_fit_failure(strategy: tf.distribute.Strategy) -> str:
    """The error the probe of :func:`upstream_fit_works` caught on this worker ("" if none)."""
    cached = _UPSTREAM.get(strategy)
    return cached[1] if cached else ""
