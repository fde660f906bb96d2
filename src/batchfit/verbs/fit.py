"""``batchfit.fit``: ``model.fit`` that shrinks its micro-batch on out-of-memory and goes on.

How it works (Keras 3, TensorFlow backend):

* Keras's own ``fit`` loop runs unchanged (callbacks, ``History``, progress bar, early
  stopping, checkpoints, learning-rate schedules). Only ``model.train_function`` and
  ``model.test_function`` are replaced, for the duration of the call, by Python callables that
  take one batch out of Keras's iterator and run Keras's own compiled step on it (built with
  ``model._make_function`` around ``model.train_step``, so a custom ``train_step`` works).
* While a batch runs whole (no micro-batch set, or one no smaller than every batch seen), it
  is read inside a compiled function, as Keras's own function reads it (reading it eagerly in
  Python cost ~0.3 ms a step, 2.6% of an 11.6 ms step, measured). That function first keeps a
  reference to the batch in host-side replay variables (an assignment shares the tensor's
  buffer: no copy, no allocation) and checks its size; every op of the step that reads the
  batch waits for both. A step that then fails hands its batch back, which takes the path
  below. A batch larger than the micro-batch fails the check before it runs and is split.
  The reference is dropped outside that path (between epochs, in evaluation, after a
  shrink), so no extra batch stays in memory while smaller steps run. Otherwise (the first
  batch, after an out-of-memory error, under a strategy) the callable takes the batch out of
  the iterator in Python.
* A step that runs out of memory is replayed: the state from before it is restored, the batch
  is split into ``k`` micro-batches, and the optimizer accumulates their gradients
  (``gradient_accumulation_steps = k``) into one update. Keras sees one step per batch, so
  step counts, callbacks and ``optimizer.iterations`` are those of the run asked for.
* Restoring is cheap because a failed step writes little. Measured under a capped allocator:
  after an out-of-memory error in a compiled step the weights and optimizer slots were
  untouched, but ``optimizer.iterations`` and the loss metric had already been incremented
  (their updates do not depend on the gradients, so the graph ran them early). So:
  - every weight and optimizer-slot update is made to wait for *all* gradients (a control
    dependency added around ``optimizer.apply``): nothing of the model changes unless the
    whole backward pass succeeded;
  - the small state a step writes before that (metric totals, the iteration counter,
    non-trainable model state such as BatchNorm statistics and seed-generator state) is copied
    on the device into shadow variables at the start of each step, inside the same graph, and
    assigned back after a failure; gradient accumulators are zeroed (they are zero at the start
    of every batch).
  Not covered: an out-of-memory error *inside* the optimizer's update, after some variables
  were updated (its memory does not depend on the batch size, so a smaller batch could not
  help anyway); non-trainable variables over :data:`SHADOW_LIMIT_BYTES` (frozen weights,
  which a step does not write) are not shadowed.
* Learning-rate schedules: with ``gradient_accumulation_steps = k`` Keras evaluates a schedule
  at its raw counter, which advances ``k`` times per update; during :func:`fit` the optimizer
  evaluates it at the update count instead (patched on the instance, not in its config).
* Between epochs and after :func:`fit` the optimizer is the user's own again (no
  accumulation; the accumulators are untracked), so epoch-end checkpoints are unchanged.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from ..backend.oom import is_oom_error
from ..backend.tensorflow.distribute import (
    is_multiworker,
    merge_per_replica,
    model_strategy,
    num_replicas,
    replica_devices,
    resolve_strategy,
    split_per_replica,
)
from ..backend.tensorflow.probe import (
    _assign_in_chunks,
    _first_line,
    memory_device,
    read_peak,
    reset_peak,
    state_bytes,
)
from ..core.shrink import (
    MemoryModelShrink,
    Observation,
    ShrinkPolicy,
    next_smaller,
    plan_micro_batches,
)
from ..core.sizes import format_bytes
from ..errors import InvalidInputError, TrainingOutOfMemoryError
from ..results.fit import BatchAdjustment

__all__ = ["fit"]

LOGGER = logging.getLogger("batchfit")

#: Non-trainable variables larger than this are not shadowed (frozen weights a step never writes).
SHADOW_LIMIT_BYTES = 4 << 20

#: The size check's limit while no micro-batch is set (batches run whole).
_NO_LIMIT = 1 << 62

#: Message of the in-graph check that sends a batch larger than the micro-batch to the split path.
_TOO_LARGE = "batchfit: batch larger than the current micro-batch"


def _nbytes(v: Any) -> int:
    n = int(np.prod(v.shape)) if len(v.shape) else 1
    return n * tf.as_dtype(v.dtype).size


def _tensor_of(v: Any) -> Any:
    return getattr(v, "value", v)


class _Shadow:
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


def _components(v: Any) -> list[Any]:
    """The per-device variables behind ``v`` (one for an ordinary variable)."""
    t = _tensor_of(v)
    if isinstance(t, tf.distribute.DistributedValues):
        return list(t.values)
    return [t]


class _HostShadow:
    """Copies of small variables taken eagerly before a step, per device (under a strategy).

    Under ``tf.distribute`` a step runs once per replica and a variable has one copy per
    device, so the in-graph copy of :class:`_Shadow` would be taken by every replica into one
    variable. Here every device's copy is copied before the step (a few small eager copies per
    step) and assigned back after a failure; the interface is :class:`_Shadow`'s.
    """

    def __init__(self, variables: Sequence[Any]) -> None:
        self.variables = [c for v in variables for c in _components(v)]
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


class _NotReplayable(Exception):
    """Raised while tracing the fast path for a batch :class:`_Replay` cannot hold."""


class _Replay:
    """Host-side references to the batch a compiled step is running, for its replay.

    One resource variable per input tensor (unknown shape, on the CPU): the step assigns its
    batch to them before anything else runs, which shares the tensors' buffers (no copy and
    no allocation, so it cannot itself run out of memory), and counts the assignments. After a
    failure the batch is read back when the count shows it was stored. ``limit`` holds the
    current micro-batch: a larger batch fails the step's first check (:data:`_TOO_LARGE`).
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
                check = tf.debugging.assert_less_equal(n, self.limit, message=_TOO_LARGE)
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


def _split_counts(n: int, parts: int) -> list[int]:
    """``n`` examples in ``parts`` contiguous parts differing by at most one (zeros allowed)."""
    q, r = divmod(n, parts)
    return [q + 1 if i < r else q for i in range(parts)]


def _data_size(data: Any) -> int:
    for t in tf.nest.flatten(data):
        if isinstance(t, (tf.Tensor, tf.RaggedTensor, tf.SparseTensor, np.ndarray)):
            shape = t.shape if not isinstance(t, tf.SparseTensor) else t.dense_shape
            return int(shape[0])
    raise InvalidInputError("batchfit.fit could not find the batch dimension of a batch")


def _slice(data: Any, start: int, stop: int) -> Any:
    def cut(t: Any) -> Any:
        if isinstance(t, tf.SparseTensor):
            size = tf.concat([[stop - start], t.dense_shape[1:]], 0)
            start_idx = tf.concat([[start], tf.zeros_like(t.dense_shape[1:])], 0)
            return tf.sparse.slice(t, start_idx, size)
        if isinstance(t, (tf.Tensor, tf.RaggedTensor, np.ndarray)):
            return t[start:stop]
        return t
    return tf.nest.map_structure(cut, data)


class _Run:
    """The state of one :func:`fit` call: plans, shadows, compiled functions, adjustments."""

    def __init__(self, model: Any, *, batch_size: int | None, policy: ShrinkPolicy,
                 keep_effective_batch: bool, grow_after_epochs: int | None,
                 micro_batch_size: int | None, eval_micro_batch_size: int | None,
                 logger: logging.Logger, strategy: Any = None) -> None:
        self.model = model
        # Under tf.distribute: sizes the user sees (batch, micro-batch) are global; the plan
        # and the shrink policy work per replica (memory is per device).
        self.strategy = strategy
        self.replicas = num_replicas(strategy)
        self.distributed = strategy is not None
        self._tls = threading.local()   # the role of the step being traced, per replica thread
        self._dist_k = 1
        self._dist_accs: list[Any] | None = None
        self.opt = model.optimizer
        self.batch_size = batch_size
        self.policy = policy
        self.keep_effective_batch = keep_effective_batch
        self.grow_after_epochs = grow_after_epochs
        self.micro = {"train": micro_batch_size, "eval": eval_micro_batch_size}
        # Limited: the micro-batch was given or shrunk. Until then it follows the largest
        # batch seen, so batches of varying size run whole until one runs out of memory.
        self._limited = {"train": micro_batch_size is not None,
                         "eval": eval_micro_batch_size is not None}
        self.observations: dict[str, list[Observation]] = {"train": [], "eval": []}
        self.adjustments: list[BatchAdjustment] = []
        self.logger = logger
        self.epoch = 0
        self.step = {"train": 0, "eval": 0}
        self.clean_epochs = 0
        self._adjusted_this_epoch = False
        self._warned_effective = False
        self._measure_next = {"train": True, "eval": False}
        self._device = memory_device(None)
        self._peak_devices = [self._device]
        if self.replicas > 1:
            gpus = [d for d in replica_devices(strategy) if "GPU:" in d.upper()]
            # Logical CPU devices share one allocator: its peak is not one replica's.
            self._peak_devices = ([f"GPU:{d.upper().rsplit('GPU:', 1)[1]}" for d in gpus]
                                  if len(gpus) == self.replicas else [])
        self._fns: dict[tuple[str, int], Callable[[Any], Any]] = {}
        self._shadows: dict[str, _Shadow] = {}
        self._replays: dict[str, _Replay] = {}
        self._largest = {"train": 0, "eval": 0}   # the largest batch seen, per phase
        self._acc = 1
        self._done = 0
        self._target = 0
        self._accumulating = False
        self._accs_zeroed = False   # the optimizer's accumulators checked zero in this run
        self._orig_apply: Any = None
        self._patched_lr = False
        self._saved_functions = (model.train_function, model.test_function)

    # --- setup and teardown ------------------------------------------------------------
    def install(self) -> None:
        opt = self.opt
        if opt.gradient_accumulation_steps:
            raise InvalidInputError(
                "batchfit.fit manages gradient accumulation itself; compile the model with an "
                f"optimizer without gradient_accumulation_steps (got "
                f"{opt.gradient_accumulation_steps}) and pass the effective batch as batch_size")
        orig_apply = opt.apply

        def apply(grads: Any, trainable_variables: Any = None) -> Any:
            # Every variable update waits for every gradient: an OOM in the backward pass
            # leaves weights and optimizer slots untouched.
            grads = list(grads)
            deps = [g.values if isinstance(g, tf.IndexedSlices) else g
                    for g in grads if g is not None]
            role = getattr(self._tls, "role", None)
            if role is not None:
                return self._apply_accumulating(role, grads, trainable_variables, deps)
            if deps and tf.inside_function():
                with tf.control_dependencies([tf.group(*deps)]):
                    return orig_apply(grads, trainable_variables)
            return orig_apply(grads, trainable_variables)

        self._orig_apply = orig_apply
        opt.apply = apply
        orig_lr = opt._get_current_learning_rate

        def current_learning_rate() -> Any:
            # With gradient_accumulation_steps = k, Keras evaluates a schedule at its raw
            # counter, which advances k times per update: evaluate it at the update count,
            # where it would be without accumulation. (Patched on the instance, so the
            # optimizer's config and saved models are unchanged.)
            k = opt.gradient_accumulation_steps or 1
            schedule = opt._learning_rate
            if k > 1 and isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
                return schedule(opt._iterations // k)
            return orig_lr()

        opt._get_current_learning_rate = current_learning_rate
        self._patched_lr = True
        self.model.train_function = _StepFunction(self, "train")
        self.model.test_function = _StepFunction(self, "eval")

    def uninstall(self) -> None:
        opt = self.opt
        for replay in self._replays.values():
            replay.clear()
        try:
            self._use_accumulation(1)
        except Exception as exc:  # noqa: BLE001 - never mask the error that ended training
            self.logger.warning("batchfit: could not switch gradient accumulation off after "
                                "training: %s", _first_line(exc))
        finally:
            if self._orig_apply is not None and "apply" in vars(opt):
                del opt.apply
            if self._patched_lr and "_get_current_learning_rate" in vars(opt):
                del opt._get_current_learning_rate
            self.model.train_function, self.model.test_function = self._saved_functions

    def _ensure_built(self) -> None:
        if not self.opt.built:
            if self.distributed:
                with self.strategy.scope():
                    self.opt.build(self.model.trainable_variables)
            else:
                self.opt.build(self.model.trainable_variables)

    def _apply_accumulating(self, role: str, grads: list[Any], variables: Any,
                            deps: list[Any]) -> Any:
        """The optimizer's ``apply`` in a step of batchfit's own accumulation (distributed).

        Keras's ``gradient_accumulation_steps`` cannot run under a strategy (its update is a
        ``cond`` around a cross-replica all-reduce: "merge_call called while defining a new
        graph", measured with MirroredStrategy). So under a strategy batchfit accumulates
        itself, with the role fixed when the step is traced: ``"accumulate"`` adds each
        replica's gradients to that replica's own accumulators (no update, no all-reduce);
        ``"final"`` applies ``(gradients + accumulated) / k`` through the optimizer's own
        ``apply`` (one all-reduce, one update, one iteration) and zeroes the accumulators.
        """
        variables = list(variables if variables is not None else self.opt._trainable_variables)
        accs = [self._dist_accs[self.opt._get_variable_index(v)]  # type: ignore[index]
                for v in variables]
        dense = [None if g is None else tf.convert_to_tensor(g) for g in grads]
        with tf.control_dependencies([tf.group(*deps)] if deps else []):
            if role == "accumulate":
                return tf.group(*[a.assign_add(g, read_value=False)
                                  for a, g in zip(accs, dense) if g is not None])
            k = float(self._tls.k)
            total = [None if g is None else (g + a.read_value()) / k
                     for a, g in zip(accs, dense)]
        ready = [t for t in total if t is not None]
        with tf.control_dependencies(ready):
            out = self._orig_apply(total, variables)
            for a in accs:
                a.assign(tf.zeros_like(a), read_value=False)
        return out

    def _shadow(self, phase: str) -> _Shadow:
        if phase not in self._shadows:
            self._ensure_built()
            seen: set[int] = set()
            small: list[Any] = []
            groups = [v for m in self.model.metrics for v in m.variables]
            if phase == "train":
                groups += [self.opt._iterations]
                groups += [v for v in self.model.non_trainable_variables
                           if _nbytes(v) <= SHADOW_LIMIT_BYTES]
            for v in groups:
                if id(v) not in seen:
                    seen.add(id(v))
                    small.append(v)
            self._shadows[phase] = (_HostShadow(small) if self.distributed
                                    else _Shadow(small))  # type: ignore[assignment]
        return self._shadows[phase]

    def _function(self, phase: str, accumulation: int,
                  role: str | None = None) -> Callable[[Any], Any]:
        key = (phase, accumulation if phase == "train" else 1, role)
        if key not in self._fns:
            shadow = self._shadow(phase)
            step = self.model.train_step if phase == "train" else self.model.test_step
            if self.distributed:
                tls = self._tls

                def replica_step(data: Any) -> Any:
                    # Traced once per replica (each in its own thread): the role tells the
                    # patched optimizer.apply what to do in this function.
                    tls.role, tls.k = role, accumulation
                    try:
                        return step(data)
                    finally:
                        tls.role = None

                self._fns[key] = self.model._make_function(replica_step)
                return self._fns[key]

            def guarded_step(data: Any) -> Any:
                # The copy comes first: every op that reads the batch waits for it, and a
                # write to a shadowed variable follows the copy's read of it anyway
                # (tf.function orders the ops on one resource in program order). Only the
                # inputs carry the dependency: control inputs on every op of the step
                # blocked Grappler's fusions (measured: +48% step time on a small CNN).
                token = shadow.in_graph()

                def after_copy(t: Any) -> Any:
                    if isinstance(t, (tf.Tensor, tf.RaggedTensor, tf.SparseTensor)):
                        with tf.control_dependencies([token]):
                            return tf.identity(t)
                    return t

                return step(tf.nest.map_structure(after_copy, data))

            self._fns[key] = self.model._make_function(guarded_step)
        return self._fns[key]

    def _fast_function(self, phase: str) -> Callable[[Any], Any]:
        """The step at micro-batch = batch, reading its batch from the iterator in the graph.

        The batch is stored (:class:`_Replay`) and its size checked before the step's ops
        that read it; the step itself is the one :meth:`_function` compiles (the same
        concrete function the split path calls).
        """
        key = (phase, 0, "iterator")
        if key not in self._fns:
            step = self._function(phase, 1)
            replay = self._replays[phase]

            def from_iterator(iterator: Any) -> Any:
                data = iterator.get_next()
                if not replay.matches(data):
                    replay.usable = False   # another structure: not the fast path again
                    raise _NotReplayable()
                first = replay.in_graph(data)
                with tf.control_dependencies(first):
                    data = tf.nest.map_structure(tf.identity, data)
                return step([data])

            self._fns[key] = tf.function(from_iterator)
        return self._fns[key]

    # --- gradient accumulation on the user's optimizer ---------------------------------
    def _use_accumulation(self, k: int) -> None:
        """Switch the optimizer to ``k`` micro-steps per update, at a batch boundary."""
        if self.distributed:
            # batchfit's own accumulation (see _apply_accumulating): the optimizer is left
            # as it is, and its iteration counter counts updates.
            if k > 1 and self._dist_accs is None:
                self._ensure_built()
                with self.strategy.scope():
                    self._dist_accs = [
                        tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False,
                                    synchronization=tf.VariableSynchronization.ON_READ,
                                    aggregation=tf.VariableAggregation.NONE)
                        for v in self.opt._trainable_variables]
            self._dist_k = k
            return
        if k == self._acc:
            return
        opt = self.opt
        if k > 1:
            self._ensure_built()
            accs = getattr(opt, "_accumulated_gradients", None)
            if not accs or len(accs) != len(opt._trainable_variables):
                # As Optimizer.build makes them, but not tracked: they are zero at every batch
                # boundary (a batch's micro-steps end with the update), so nothing is lost by
                # leaving them out of checkpoints, and the optimizer keeps the variables a
                # checkpoint of the user's own optimizer has (Keras skips loading optimizer
                # state whose variable count differs).
                with keras.name_scope(opt.name, caller=opt):
                    accs = [keras.Variable(initializer="zeros", shape=v.shape, dtype=v.dtype,
                                           trainable=False, name="gradient_accumulator")
                            for v in opt._trainable_variables]
                object.__setattr__(opt, "_accumulated_gradients", accs)
            elif not self._accs_zeroed:
                # Left by an earlier fit that stopped inside a batch (an error, Ctrl-C)
                # holding that batch's partial sums.
                self._zero_accumulators()
            self._accs_zeroed = True
        updates = int(opt._iterations.numpy()) // self._acc
        opt._iterations.assign(updates * k)
        opt.gradient_accumulation_steps = k if k > 1 else None
        self._acc = k

    def _zero_accumulators(self) -> None:
        if self.distributed:
            for acc in self._dist_accs or []:
                for c in _components(acc):
                    c.assign(tf.zeros_like(c))
            return
        for acc in getattr(self.opt, "_accumulated_gradients", None) or []:
            if acc is not None:
                _assign_in_chunks(acc, np.zeros(acc.shape, dtype=acc.dtype))

    # --- running one batch -------------------------------------------------------------
    def run_batch(self, phase: str, data: Any) -> Any:
        """Run one batch of Keras's loop, shrinking and replaying it on out-of-memory."""
        if self.distributed:
            return self._run_batch_distributed(phase, data)
        n = _data_size(data)
        micro = self.micro[phase]
        if micro is None or (not self._limited[phase] and n > micro):
            self.micro[phase] = n
        self._largest[phase] = max(self._largest[phase], n)
        replay = self._replays.get(phase)
        if replay is None:
            replay = self._replays[phase] = _Replay(data)
        replay.clear()
        try:
            return self._run_batch(phase, data, n)
        finally:
            replay.stored = int(replay.count.numpy())
            replay.set_limit(int(self.micro[phase]) if self._limited[phase] else _NO_LIMIT)

    def release(self, phase: str) -> None:
        """Let go of the last batch the fast path held (between epochs, during evaluation)."""
        replay = self._replays.get(phase)
        if replay is not None:
            replay.clear()

    def micro_batch(self, phase: str) -> int | None:
        """The micro-batch in force: while none was set, the largest batch that ran."""
        micro = self.micro[phase]
        replay = self._replays.get(phase)
        if not self._limited[phase] and replay is not None:
            largest = int(replay.largest.numpy())
            micro = max(micro or 0, largest) or None
        return micro

    def largest_batch(self, phase: str) -> int | None:
        """The largest batch seen in ``phase`` (by either path), ``None`` before any."""
        replay = self._replays.get(phase)
        largest = max(self._largest[phase], int(replay.largest.numpy()) if replay else 0)
        return largest or None

    def fast(self, phase: str) -> bool:
        """Whether the next batch may be read inside the compiled step (see ``run_fast``)."""
        replay = self._replays.get(phase)
        micro = self.micro[phase]
        return (replay is not None and replay.usable and not self.distributed
                and not self.model.run_eagerly   # its step must stay eager
                and not self._measure_next[phase] and micro is not None
                and (not self._limited[phase] or micro >= self._largest[phase]))

    def run_fast(self, phase: str, iterator: Any) -> Any:
        """One batch read from ``iterator`` inside the compiled step, as Keras's own does.

        The step stores the batch first; when it then fails (out of memory, or a batch larger
        than the micro-batch), the batch is taken back and goes through :meth:`run_batch`.
        """
        shadow = self._shadows[phase]
        replay = self._replays[phase]
        if phase == "train":
            self._use_accumulation(1)
        self._accumulating = False
        fn = self._fast_function(phase)
        shadow.arm(True)
        self._target = shadow.count + 1
        t0 = time.perf_counter()
        replay.holding = True
        try:
            logs = fn(iterator)
        except (StopIteration, tf.errors.OutOfRangeError):
            raise StopIteration from None
        except _NotReplayable:
            # Found while tracing, before anything ran or was read.
            return self.run_batch(phase, next(iterator))
        except Exception as exc:
            oom = is_oom_error(exc)
            if not oom and not (isinstance(exc, tf.errors.InvalidArgumentError)
                                and _TOO_LARGE in str(exc)):
                raise
            failure = _first_line(exc)
        else:
            shadow.count = self._target
            replay.stored += 1
            return logs
        data = replay.take_back()
        if data is None:
            raise TrainingOutOfMemoryError(
                f"out of memory before batchfit held the {phase} batch (while the input "
                f"pipeline produced it): {failure}. Lower the input pipeline's memory "
                "(prefetch, cache, shuffle buffer)", fixed_bytes=float(state_bytes(self.model))
            ) from None
        # The size check may fail after the copy was taken (the step's ops that do not read
        # the batch are not ordered after it): restore in both cases.
        shadow.restore_if_taken(self._target)
        if oom:
            n = _data_size(data)
            self.observations[phase].append((n, False, None))
            self._shrink(phase, n, n, failure, time.perf_counter() - t0)
        return self.run_batch(phase, data)

    def _run_batch(self, phase: str, data: Any, n: int) -> Any:
        self._done = 0    # examples of this batch whose updates are final
        while True:
            rest = n - self._done
            plan = plan_micro_batches(rest, min(self.micro[phase], rest))
            ran, logs = self._attempt(
                phase, plan.micro_batch_size, n, functools.partial(self._run_plan, phase, data, plan),
                reset=lambda: reset_peak(self._device), peak=lambda: read_peak(self._device))
            if ran:
                return logs

    def _attempt(self, phase: str, micro: int, n: int, run: Callable[[], Any], *,
                 reset: Callable[[], None], peak: Callable[[], int | None]) -> tuple[bool, Any]:
        """Run one plan of a batch of ``n``; on an out-of-memory error, undo it and shrink.

        Returns ``(True, logs)`` when the plan ran, ``(False, None)`` after a failure, once
        the state is back where the failure returns to and the micro-batch is smaller (the
        caller plans the rest again). Errors other than out-of-memory propagate. When a
        measurement is due, the allocator's peak is reset before and read after.
        """
        t0 = time.perf_counter()
        failure = None
        measure = self._measure_next[phase]
        try:
            if measure:
                reset()
            logs = run()
        except Exception as exc:
            if not is_oom_error(exc):
                raise
            failure = _first_line(exc)
        if failure is None:
            if measure:
                self.observations[phase].append((micro, True, peak()))
                self._measure_next[phase] = False
            return True, logs
        # Outside the handler: the traceback holding the failed step's tensors is gone.
        self._shadows[phase].restore_if_taken(self._target)
        if self._accumulating:
            self._zero_accumulators()
        self.observations[phase].append((micro, False, None))
        self._shrink(phase, micro, n, failure, time.perf_counter() - t0)
        return False, None

    def _call(self, fn: Callable[[Any], Any], shadow: _Shadow, data: Any, *,
              snapshot: bool) -> Any:
        """One compiled step; with ``snapshot``, its start is the state a failure returns to."""
        shadow.arm(snapshot)
        if snapshot:
            self._target = shadow.count + 1
            shadow.take()
        logs = fn([data])
        if snapshot:
            shadow.count = self._target
        return logs

    def _run_plan(self, phase: str, data: Any, plan: Any) -> Any:
        """Run the examples ``data[self._done:]`` as ``plan`` says.

        Accumulating (training, ``keep_effective_batch``): one update after all micro-batches,
        so a failure anywhere returns to the batch's start. Otherwise (evaluation, or
        ``keep_effective_batch=False``) every micro-batch is final once it ran, and a failure
        resumes after the last one that ran.
        """
        shadow = self._shadows.get(phase) or self._shadow(phase)
        accumulate = phase == "train" and self.keep_effective_batch and plan.steps > 1
        self._accumulating = accumulate
        if phase == "train":
            self._use_accumulation(plan.steps if accumulate else 1)
        fn = self._function(phase, self._acc if phase == "train" else 1)
        if plan.steps == 1 and self._done == 0:
            return self._call(fn, shadow, data, snapshot=True)
        logs = None
        start = self._done
        try:
            for i, size in enumerate(plan.sizes):
                piece = _slice(data, start, start + size)
                logs = self._call(fn, shadow, piece, snapshot=i == 0 or not accumulate)
                start += size
                if not accumulate:
                    self._done = start
        finally:
            shadow.arm(True)
        return logs

    # --- under a distribution strategy -------------------------------------------------
    def _replica_peak(self) -> int | None:
        peaks = [read_peak(d) for d in self._peak_devices]
        known = [p for p in peaks if p is not None]
        return max(known) if known and len(known) == len(peaks) else None

    def _run_batch_distributed(self, phase: str, data: Any) -> Any:
        """:meth:`run_batch` under a strategy: every replica shrinks to the same micro-batch.

        In one process an out-of-memory error on any replica fails the whole step in the
        caller, so the decision is one for all replicas: the batch each replica holds is split
        into the same number of micro-batches, and the policy reasons per replica.
        """
        local = split_per_replica(self.strategy, data)
        sizes = [_data_size(p) for p in local]
        n = sum(sizes)
        micro = self.micro[phase]
        if micro is None or (not self._limited[phase] and n > micro):
            self.micro[phase] = n
        self._largest[phase] = max(self._largest[phase], n)
        done = [0] * self.replicas   # examples of each replica's share whose updates are final
        self._done = 0
        while True:
            rest = [s - d for s, d in zip(sizes, done)]
            longest = max(rest)
            per = max(1, -(-int(self.micro[phase]) // self.replicas))
            steps = plan_micro_batches(longest, min(per, longest)).steps if longest else 1
            pieces = [_split_counts(r, steps) for r in rest]
            micro = max(max(p) for p in pieces)
            ran, logs = self._attempt(
                phase, micro, n,
                functools.partial(self._run_plan_distributed, phase, data, local, done, pieces,
                                  steps),
                reset=self._reset_replica_peaks, peak=self._replica_peak)
            if ran:
                return logs

    def _reset_replica_peaks(self) -> None:
        for d in self._peak_devices:
            reset_peak(d)

    def _run_plan_distributed(self, phase: str, data: Any, local: list[Any], done: list[int],
                              pieces: list[list[int]], steps: int) -> Any:
        """Run micro-batch ``i`` of every replica together, for ``i`` in ``range(steps)``."""
        shadow = self._shadows.get(phase) or self._shadow(phase)
        accumulate = phase == "train" and self.keep_effective_batch and steps > 1
        self._accumulating = accumulate
        if phase == "train":
            self._use_accumulation(steps if accumulate else 1)
        if steps == 1 and not any(done):
            return self._call(self._function(phase, 1), shadow, data, snapshot=True)
        starts = list(done)
        logs = None
        for i in range(steps):
            role = None
            if accumulate:
                role = "final" if i == steps - 1 else "accumulate"
            fn = self._function(phase, steps if accumulate else 1, role)
            batch = merge_per_replica(self.strategy, [
                _slice(local[r], starts[r], starts[r] + pieces[r][i])
                for r in range(self.replicas)])
            logs = self._call(fn, shadow, batch, snapshot=i == 0 or not accumulate)
            starts = [s + p[i] for s, p in zip(starts, pieces)]
            if not accumulate:
                done[:] = starts
                self._done = sum(starts)
        return logs

    def _shrink(self, phase: str, failed: int, n: int, detail: str, seconds: float) -> None:
        """Pick the next micro-batch after ``failed`` (per replica under a strategy)."""
        new = next_smaller(self.policy, failed, list(self.observations[phase]))
        if new is None:
            fixed = state_bytes(self.model)
            per = " per replica" if self.distributed else ""
            raise TrainingOutOfMemoryError(
                f"out of memory even at a {phase} micro-batch of {failed} example(s){per}: the "
                f"model's weights and optimizer state alone take {format_bytes(fixed)}, which "
                f"with the step's workspace leaves no room for one example ({detail}). Use a "
                "smaller model, a lighter optimizer, mixed precision, or a larger device",
                fixed_bytes=float(fixed))
        r = self.replicas
        self.micro[phase] = new * r
        self._limited[phase] = True
        self._measure_next[phase] = True
        if phase == "train":
            self._adjusted_this_epoch = True
            self.clean_epochs = 0
        # The batch being split: evaluation's are its own (validation_batch_size), not fit's.
        full = (self.batch_size if phase == "train" else None) or n
        plan = plan_micro_batches(-(-full // r), new)
        if phase == "train" and not self.keep_effective_batch and not self._warned_effective:
            self._warned_effective = True
            warnings.warn(
                f"batchfit.fit: keep_effective_batch=False: each batch of {n} now makes "
                f"{plan.steps} optimizer updates on micro-batches of <= {new * r} examples: "
                "the effective batch size shrinks, optimizer.iterations and learning-rate "
                "schedules advance faster, and the learning dynamics change", stacklevel=2)
        self._record(phase, failed * r, new * r, plan.steps, "oom", detail, seconds, full)

    def _record(self, phase: str, old: int, new: int, steps: int, reason: str, detail: str,
                seconds: float, n: int) -> None:
        updates = int(self.opt._iterations.numpy()) // self._acc if self.opt.built else 0
        adj = BatchAdjustment(
            phase=phase, epoch=self.epoch, step=self.step[phase], optimizer_step=updates,
            batch_size=int(n), from_micro_batch=int(old),
            to_micro_batch=int(new), accumulation_steps=int(steps), reason=reason,
            detail=detail, seconds=float(seconds), time_unix=time.time())
        self.adjustments.append(adj)
        self.logger.warning(adj.describe())

    def epoch_begin(self, epoch: int) -> None:
        self.epoch = epoch
        self.step = {"train": 0, "eval": 0}
        self._adjusted_this_epoch = False

    def epoch_end(self, epoch: int) -> None:
        self.release("train")
        # Between epochs the optimizer is the user's own (no gradient_accumulation_steps,
        # iterations in updates), so epoch-end checkpoints save its own config; the next
        # batch switches accumulation back on.
        self._use_accumulation(1)
        if self._adjusted_this_epoch:
            return
        self.clean_epochs += 1
        micro = self.micro["train"]
        full = self.batch_size
        if (self.grow_after_epochs is None or not self._limited["train"] or micro is None
                or full is None or micro >= full or self.clean_epochs < self.grow_after_epochs):
            return
        new = min(full, micro * 2)
        failed_sizes = [s for s, fits, _ in self.observations["train"] if not fits]
        self.micro["train"] = new
        self.clean_epochs = 0
        self._measure_next["train"] = True
        steps = plan_micro_batches(full, new).steps
        why = (f"{self.grow_after_epochs} clean epoch(s) at micro-batch {micro}"
               + (f"; sizes that failed before: {sorted(set(failed_sizes))}"
                  if failed_sizes else ""))
        self._record("train", micro, new, steps, "grow", why, 0.0, full)


class _StepFunction:
    """Stands in for ``model.train_function``/``test_function`` during :func:`fit`."""

    def __init__(self, run: _Run, phase: str) -> None:
        self.run = run
        self.phase = phase

    def __call__(self, iterator: Any) -> Any:
        run = self.run
        spe = max(1, int(run.model.steps_per_execution))
        if spe == 1 and isinstance(iterator, tf.data.Iterator) and run.fast(self.phase):
            logs = run.run_fast(self.phase, iterator)
            run.step[self.phase] += 1
            return logs
        logs = None
        for _ in range(spe):
            try:
                data = next(iterator)
            except (StopIteration, tf.errors.OutOfRangeError):
                if logs is None:
                    raise StopIteration from None
                break
            logs = self.run.run_batch(self.phase, data)
            self.run.step[self.phase] += 1
        return logs


class _EpochHook(keras.callbacks.Callback):
    def __init__(self, run: _Run) -> None:
        super().__init__()
        self.run = run

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.run.epoch_begin(epoch)

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self.run.epoch_end(epoch)

    def on_test_begin(self, logs: Any = None) -> None:
        self.run.step["eval"] = 0
        self.run.release("train")

    def on_test_end(self, logs: Any = None) -> None:
        self.run.release("eval")


def _is_arrays(x: Any) -> bool:
    """Whether ``x`` is array data (arrays, tensors, or a list/dict of them) that Keras batches.

    Other inputs (a generator, a ``PyDataset``, a torch ``DataLoader``) bring their own batches.
    """
    leaves = tf.nest.flatten(x)
    return bool(leaves) and all(
        tf.is_tensor(t) or isinstance(t, np.ndarray) or hasattr(t, "__array__") for t in leaves)


def _static_batch(ds: tf.data.Dataset) -> int | None:
    for spec in tf.nest.flatten(ds.element_spec):
        shape = getattr(spec, "shape", None)
        if shape is not None and shape.rank:
            return shape[0]
    return None


def _rebatch(ds: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
    """Re-batch ``ds`` to ``batch_size``, keeping a known cardinality known.

    ``rebatch`` leaves the cardinality unknown, and Keras then miscounts steps (and shifts
    accumulation boundaries); the number of batches is restored with ``assert_cardinality``.
    """
    old = _static_batch(ds)
    if old == batch_size:
        return ds
    if old is None:
        raise InvalidInputError(
            "batchfit.fit got a tf.data.Dataset with batches of unknown size and "
            f"batch_size={batch_size}: batch the dataset yourself (ds.batch({batch_size})) "
            "and pass batch_size=None, or batch it with drop_remainder=True")
    cardinality = int(ds.cardinality().numpy())
    out = ds.rebatch(batch_size)
    if cardinality >= 0:
        n = cardinality * old
        out = out.apply(tf.data.experimental.assert_cardinality(math.ceil(n / batch_size)))
    return out


def fit(model: Any, x: Any = None, y: Any = None, *, batch_size: int | None = None,
        shrink_policy: ShrinkPolicy | None = None, keep_effective_batch: bool = True,
        grow_after_epochs: int | None = None, micro_batch_size: int | None = None,
        validation_micro_batch_size: int | None = None,
        logger: logging.Logger | None = None, distribute: Any = None,
        **fit_kwargs: Any) -> Any:
    """Train like ``model.fit``, shrinking the micro-batch instead of dying of out-of-memory.

    A drop-in for ``model.fit``: same arguments (passed through), same loop, same callbacks,
    and the same return value, a ``keras.callbacks.History``. When a training step runs out of
    memory, the state from before the step is restored (weights, optimizer variables and
    iteration count, metrics), the micro-batch shrinks as ``shrink_policy`` says, and the
    failed batch is replayed as several micro-batches whose gradients the optimizer
    accumulates into one update, so the updates are those of the batch size asked for.
    Training then carries on in the same epoch. Under ``tf.distribute.MirroredStrategy`` (the
    model built under ``strategy.scope()``) ``batch_size`` is the global batch; an
    out-of-memory error on any replica shrinks the micro-batch of every replica together,
    and the global batch is kept by accumulation. An out-of-memory error during evaluation
    (``validation_data``) shrinks the evaluation micro-batch only. Every adjustment is logged
    (logger ``"batchfit"``, level WARNING) and listed in ``history.adjustments``.

    Args:
        model: a compiled ``keras.Model`` (TensorFlow backend), optimizer without
            ``gradient_accumulation_steps`` (batchfit manages it).
        x, y: the training data, as for ``model.fit`` (arrays, tensors, ``tf.data.Dataset``).
        batch_size: the (effective) batch size. Required for arrays; for a dataset ``None``
            uses its own batches, a different size re-batches it (keeping its cardinality).
        shrink_policy: an object with ``next_size(failed, observations)`` (see
            :mod:`batchfit.core.shrink`). Default: :class:`batchfit.MemoryModelShrink`, the
            largest size the memory model fitted to the peaks seen says fits, else halving.
        keep_effective_batch: default True: accumulate the micro-batches' gradients into one
            update per batch. False: each micro-batch updates the weights (a smaller effective
            batch; a warning says so).
        grow_after_epochs: ``None`` (default) never grows back; ``N`` doubles the micro-batch
            (up to ``batch_size``) after ``N`` epochs without an out-of-memory error.
        micro_batch_size: start with this training micro-batch (default: ``batch_size``).
        validation_micro_batch_size: start with this evaluation micro-batch (default: the
            evaluation batch).
        logger: where adjustments are logged (default ``logging.getLogger("batchfit")``).
        distribute: ``None`` (default: the strategy the model was built under, if any), a
            ``tf.distribute.MirroredStrategy`` or ``"mirrored"`` (the model must have been
            built under that strategy's scope). Multi-worker training goes through
            :mod:`batchfit.verbs.multiworker`.
        **fit_kwargs: everything else ``model.fit`` takes (``epochs``, ``callbacks``,
            ``validation_data``, ``shuffle``, ...).

    Returns:
        The ``History`` of ``model.fit``, with ``adjustments`` (a list of
        :class:`batchfit.BatchAdjustment`), ``micro_batch_size`` and ``accumulation_steps``
        (the last training plan; sizes global) added, and under a strategy ``replicas``,
        ``per_replica_batch_size`` and ``per_replica_micro_batch_size`` (each replica's
        share; with one device they equal the global sizes).

    Raises:
        TrainingOutOfMemoryError: when even a micro-batch of one example does not fit; the
            message states the model's fixed memory.
        InvalidInputError: for an unsupported setup (a strategy other than MirroredStrategy,
            an optimizer that already accumulates gradients, a bad option).

    Any other error from training propagates unchanged.

    Example:

    >>> import keras, numpy as np, batchfit
    >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    >>> m.compile("sgd", "mse")
    >>> h = batchfit.fit(m, np.ones((8, 4)), np.ones((8, 1)), batch_size=4, epochs=2,
    ...                  verbose=0)
    >>> len(h.history["loss"]), h.adjustments
    (2, [])

    Under a strategy (``batch_size`` is global: 64 is 32 per replica on 2 devices):

    >>> strategy = tf.distribute.MirroredStrategy()       # doctest: +SKIP
    >>> with strategy.scope():                            # doctest: +SKIP
    ...     model = build_and_compile()
    >>> h = batchfit.fit(model, x, y, batch_size=64)      # doctest: +SKIP
    """
    if getattr(model, "optimizer", None) is None or not getattr(model, "compiled", True):
        raise InvalidInputError("batchfit.fit needs a compiled model (call model.compile first)")
    if keras.backend.backend() != "tensorflow":
        raise InvalidInputError(
            f"batchfit.fit supports the TensorFlow backend, not {keras.backend.backend()!r}")
    for name, value in (("batch_size", batch_size), ("micro_batch_size", micro_batch_size),
                        ("validation_micro_batch_size", validation_micro_batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise InvalidInputError(f"{name} must be an integer >= 1 or None, got {value!r}")
    if grow_after_epochs is not None and (isinstance(grow_after_epochs, bool) or not isinstance(
            grow_after_epochs, int) or grow_after_epochs < 1):
        raise InvalidInputError(
            f"grow_after_epochs must be an integer >= 1 or None, got {grow_after_epochs!r}")
    strategy = _check_strategy(resolve_strategy(distribute, model), model)
    policy = shrink_policy if shrink_policy is not None else MemoryModelShrink()
    if not callable(getattr(policy, "next_size", None)):
        raise InvalidInputError(
            f"shrink_policy needs a next_size(failed, observations) method, got {policy!r}")
    is_dataset = isinstance(x, tf.data.Dataset)
    if is_dataset:
        if batch_size is not None:
            x = _rebatch(x, batch_size)
        fit_batch = None
    else:
        if batch_size is None and _is_arrays(x):
            raise InvalidInputError("batchfit.fit needs batch_size= for array inputs")
        fit_batch = batch_size
    if micro_batch_size is not None and batch_size is not None:
        micro_batch_size = min(micro_batch_size, batch_size)
    run = _Run(model, batch_size=batch_size, policy=policy,
               keep_effective_batch=keep_effective_batch, grow_after_epochs=grow_after_epochs,
               micro_batch_size=micro_batch_size,
               eval_micro_batch_size=validation_micro_batch_size,
               logger=logger or LOGGER, strategy=strategy)
    if isinstance(fit_kwargs.get("callbacks"), keras.callbacks.CallbackList):
        raise InvalidInputError("batchfit.fit takes callbacks as a list, not a CallbackList")
    callbacks = fit_kwargs.pop("callbacks", None) or []
    # model.fit takes one callback alone too.
    callbacks = [callbacks] if isinstance(callbacks, keras.callbacks.Callback) else list(callbacks)
    callbacks.insert(0, _EpochHook(run))
    run.install()
    try:
        history = model.fit(x, y, batch_size=fit_batch, callbacks=callbacks, **fit_kwargs)
    finally:
        run.uninstall()
    micro = run.micro_batch("train")
    history.adjustments = list(run.adjustments)
    history.micro_batch_size = micro
    r = run.replicas
    # Without batch_size (a dataset's own batches), the batch is the largest one that ran.
    full = batch_size or run.largest_batch("train")
    history.accumulation_steps = (
        plan_micro_batches(-(-full // r), max(1, micro // r)).steps
        if micro and full else 1)
    history.replicas = r
    history.per_replica_batch_size = -(-full // r) if full else None
    history.per_replica_micro_batch_size = max(1, micro // r) if micro else None
    return history


def _check_strategy(strategy: Any, model: Any) -> Any:
    """The strategy :func:`fit` runs under (``None`` for one device), or a clear refusal."""
    if strategy is None:
        return None
    if is_multiworker(strategy):
        raise InvalidInputError(
            "batchfit.fit does not train under MultiWorkerMirroredStrategy (Keras 3's "
            "model.fit fails there, keras-team/keras issue 20585): train with "
            "batchfit.fit_multiworker(model, x, y, batch_size=..., strategy=..., epochs=...), "
            "batchfit's own step with the same out-of-memory recovery, on every worker")
    if not isinstance(strategy, tf.distribute.MirroredStrategy):
        raise InvalidInputError(
            f"batchfit.fit supports tf.distribute.MirroredStrategy (one host), not "
            f"{type(strategy).__name__}")
    if model_strategy(model) is not strategy:
        raise InvalidInputError(
            f"the model was not built under the {type(strategy).__name__} given as "
            "distribute=: build and compile it inside strategy.scope()")
    return strategy
