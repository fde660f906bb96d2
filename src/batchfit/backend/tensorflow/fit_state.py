"""What :func:`batchfit.fit` keeps on the device to undo a failed step and replay its batch.

Execution only (the decisions are :class:`batchfit.core.fit_control.FitController`'s):

* :class:`Shadow` / :class:`HostShadow`: copies of the small state a step writes before its
  update (metric totals, the iteration counter, non-trainable state such as BatchNorm
  statistics), taken at the start of a step and assigned back after a failure; in the step's
  graph on one device, eagerly per device under a strategy;
* :class:`Replay`: host-side references to the batch a compiled step reads from Keras's
  iterator, so a step that fails hands its batch back for replay as micro-batches;
* :func:`data_size`, :func:`slice_batch`: a batch's size and a contiguous part of it.

See :mod:`batchfit.verbs.fit` for the whole design and its measurements.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from ...errors import InvalidInputError

__all__ = ["NO_LIMIT", "SHADOW_LIMIT_BYTES", "TOO_LARGE", "HostShadow", "NotReplayable",
           "Replay", "Shadow", "components", "data_size", "nbytes", "slice_batch"]

#: Non-trainable variables larger than this are not shadowed (frozen weights a step never writes).
SHADOW_LIMIT_BYTES = 4 << 20

#: The size check's limit while no micro-batch is set (batches run whole).
NO_LIMIT = 1 << 62

#: Message of the in-graph check that sends a batch larger than the micro-batch to the split path.
TOO_LARGE = "batchfit: batch larger than the current micro-batch"


def nbytes(v: Any) -> int:
    n = int(np.prod(v.shape)) if len(v.shape) else 1
    return n * tf.as_dtype(v.dtype).size


def _tensor_of(v: Any) -> Any:
    """The TensorFlow variable behind ``v``: a Keras variable's ``value``, a ``tf.Variable``
    itself (its ``value`` is a method: batchfit's own accumulators under a strategy are
    ``tf.Variable`` objects, and reading their ``value`` gave ``components`` a bound method,
    "'function' object has no attribute 'assign'" after a failed accumulating step)."""
    if isinstance(v, tf.Variable):
        return v
    return getattr(v, "value", v)


class Shadow:
    """Device-side copies of small variables, taken at the start of a step inside its graph.

    ``taken`` counts completed copies. Every op of the step that reads the batch depends on
    that increment, and a write to a shadowed variable follows the copy's read of it (ops on
    one resource run in program order in a ``tf.function``), so a step that changed anything
    had its copy completed first.
    """

    def __init__(self, variables: Sequence[Any]) -> None:
        self.variables = list(variables)
        self.copies = [tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False)
                       for v in self.variables]
        self.armed = tf.Variable(True, trainable=False)
        self.taken = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.count = 0          # completed copies known to the host
        self._armed_host = True

    def in_graph(self) -> Any:
        """Ops (traced inside the step) that take the copy when armed; returns the counter."""
        def take():
            ops = [c.assign(tf.identity(_tensor_of(v)), read_value=False)
                   for v, c in zip(self.variables, self.copies)]
            with tf.control_dependencies(ops):
                return self.taken.assign_add(1)

        return tf.cond(self.armed, take, lambda: tf.identity(self.taken))

    def arm(self, armed: bool) -> None:
        if armed != self._armed_host:
            self.armed.assign(armed)
            self._armed_host = armed

    def restore_if_taken(self, target: int) -> bool:
        """Assign the copies back when the copy numbered ``target`` completed."""
        taken = int(self.taken.numpy())
        restored = taken >= target
        if restored:
            for v, c in zip(self.variables, self.copies):
                v.assign(c)
        self.count = taken
        return restored

    def take(self) -> None:
        """Nothing to do on the host: the copy is taken inside the step."""


def components(v: Any) -> list[Any]:
    """The per-device variables behind ``v`` (one for an ordinary variable)."""
    t = _tensor_of(v)
    if isinstance(t, tf.distribute.DistributedValues):
        return list(t.values)
    return [t]


class HostShadow:
    """Copies of small variables taken eagerly before a step, per device (under a strategy).

    Under ``tf.distribute`` a step runs once per replica and a variable has one copy per
    device, so the in-graph copy of :class:`Shadow` would be taken by every replica into one
    variable. Here every device's copy is copied before the step (a few small eager copies per
    step) and assigned back after a failure; the interface is :class:`Shadow`'s.
    """

    def __init__(self, variables: Sequence[Any]) -> None:
        self.variables = [c for v in variables for c in components(v)]
        self.saved: list[Any] | None = None
        self.count = 0

    def in_graph(self) -> None:
        return None

    def arm(self, armed: bool) -> None:
        """Copies are taken by :meth:`take`; nothing to arm."""

    def take(self) -> None:
        saved = []
        for c in self.variables:
            with tf.device(c.device):
                saved.append(tf.identity(c.read_value()))
        self.saved = saved

    def restore_if_taken(self, target: int) -> bool:
        if self.saved is None:
            return False
        for c, value in zip(self.variables, self.saved):
            c.assign(value)
        self.count = target
        return True


class NotReplayable(Exception):
    """Raised while tracing the fast path for a batch :class:`Replay` cannot hold."""


class Replay:
    """Host-side references to the batch a compiled step is running, for its replay.

    One resource variable per input tensor (unknown shape, on the CPU): the step assigns its
    batch to them before anything else runs, which shares the tensors' buffers (no copy and
    no allocation, so it cannot itself run out of memory), and counts the assignments. After a
    failure the batch is read back when the count shows it was stored. ``limit`` holds the
    current micro-batch: a larger batch fails the step's first check (:data:`TOO_LARGE`).
    """

    def __init__(self, data: Any) -> None:
        self.structure = data
        flat = tf.nest.flatten(data)
        self.usable = bool(flat) and all(
            isinstance(t, tf.Tensor) and t.shape.rank is not None and t.shape.rank >= 1
            for t in flat)
        self.dtypes = [t.dtype for t in flat] if self.usable else []
        self._empties = [self._empty(t) for t in flat] if self.usable else []
        with tf.device("/CPU:0"):
            self.vars = [tf.Variable(t, shape=tf.TensorShape(None), trainable=False)
                         for t in self._empties]
            self.count = tf.Variable(0, dtype=tf.int64, trainable=False)
            self.limit = tf.Variable(0, dtype=tf.int64, trainable=False)
            self.largest = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._limit_host = 0
        self.stored = 0          # assignments known to the host
        self.holding = False     # whether the variables may hold a batch

    @staticmethod
    def _empty(t: Any) -> Any:
        return tf.zeros([0] * t.shape.rank, t.dtype)

    def clear(self) -> None:
        """Let go of the batch held (its memory), outside the fast path."""
        if self.holding:
            with tf.device("/CPU:0"):
                for v, t in zip(self.vars, self._empties):
                    v.assign(t, read_value=False)
            self.holding = False

    def matches(self, data: Any) -> bool:
        flat = tf.nest.flatten(data)
        return (self.usable and len(flat) == len(self.vars)
                and all(getattr(t, "dtype", None) == d for t, d in zip(flat, self.dtypes)))

    def in_graph(self, data: Any) -> list[Any]:
        """Store the batch and check its size: ops the step's inputs wait for."""
        flat = tf.nest.flatten(data)
        with tf.device("/CPU:0"):
            stores = [v.assign(t, read_value=False) for v, t in zip(self.vars, flat)]
            with tf.control_dependencies(stores):
                counted = self.count.assign_add(1)
            n = tf.cast(tf.shape(flat[0], out_type=tf.int64)[0], tf.int64)
            with tf.control_dependencies([counted]):
                check = tf.debugging.assert_less_equal(n, self.limit, message=TOO_LARGE)
            with tf.control_dependencies([check]):
                seen = self.largest.assign(tf.maximum(self.largest, n), read_value=False)
        return [counted, check, seen]

    def set_limit(self, limit: int) -> None:
        if limit != self._limit_host:
            self.limit.assign(limit)
            self._limit_host = limit

    def take_back(self) -> Any | None:
        """The batch of the step that just failed, or None if it was never stored."""
        count = int(self.count.numpy())
        stored = count == self.stored + 1
        self.stored = count
        if not stored:
            self.clear()
            return None
        data = tf.nest.pack_sequence_as(self.structure,
                                        [tf.identity(v.read_value()) for v in self.vars])
        self.clear()
        return data


def data_size(data: Any) -> int:
    for t in tf.nest.flatten(data):
        if isinstance(t, (tf.Tensor, tf.RaggedTensor, tf.SparseTensor, np.ndarray)):
            shape = t.shape if not isinstance(t, tf.SparseTensor) else t.dense_shape
            return int(shape[0])
    raise InvalidInputError("batchfit.fit could not find the batch dimension of a batch")


def slice_batch(data: Any, start: int, stop: int) -> Any:
    def cut(t: Any) -> Any:
        if isinstance(t, tf.SparseTensor):
            size = tf.concat([[stop - start], t.dense_shape[1:]], 0)
            start_idx = tf.concat([[start], tf.zeros_like(t.dense_shape[1:])], 0)
            return tf.sparse.slice(t, start_idx, size)
        if isinstance(t, (tf.Tensor, tf.RaggedTensor, np.ndarray)):
            return t[start:stop]
        return t
    return tf.nest.map_structure(cut, data)


