"""Batch size across worker processes: ``tf.distribute.MultiWorkerMirroredStrategy``.

With several workers (hosts, or processes on one host, each named in ``TF_CONFIG``) the batch
size a user trains with is *global*: every replica runs ``global / num_replicas_in_sync``
examples per step, and the gradients are all-reduced. Memory is per replica, so:

* the largest batch is the largest *per-replica* batch that fits on the *smallest* device:
  every worker searches its own device (:func:`batchfit.find_max_batch_size`, each under its
  own budget) and the workers then agree on the minimum
  (:func:`find_max_batch_size_multiworker`, :func:`agree_batch_size`);
* an out-of-memory error on one worker must shrink the micro-batch of *all* of them, decided
  collectively, or the others wait forever in the next gradient all-reduce
  (:func:`fit_multiworker`).

Keras 3's ``model.fit`` fails under ``MultiWorkerMirroredStrategy`` with TensorFlow >= 2.16
(keras-team/keras issue 20585: ``_maybe_symbolic_build`` converts a ``PerReplica`` batch to a
tensor: "Attempt to convert a value (PerReplica:{...}) with an unsupported type"). So
:func:`fit_multiworker` trains with batchfit's own step under ``strategy.run`` (the model's
forward pass and compiled loss, the Keras optimizer's ``apply_gradients``, which all-reduces
the gradients) unless :func:`upstream_fit_works` finds that Keras's own ``fit`` works under the
strategy, which it checks with a one-step probe rather than assuming either way.

One training step of batchfit's own loop, on every worker:

1. compute the gradients of this worker's share of the global batch, micro-batch by
   micro-batch, into local accumulators (no collective: an out-of-memory error is caught here,
   in Python, on the worker where it happens);
2. all-reduce ``[out-of-memory flag, loss]`` (a SUM: MIN and MAX are no reduce ops there),
   *before* any gradient all-reduce, so every worker learns the same thing at the same time;
3. if any worker ran out of memory: nothing was applied (weights and optimizer are untouched;
   non-trainable variables the failed attempt changed are restored), each worker proposes a
   micro-batch (its shrink policy's size if it failed, its current size otherwise), all take
   the minimum, and the step is replayed with gradient accumulation, so the global batch the
   optimizer sees is unchanged;
4. otherwise the accumulated gradients are applied: the optimizer all-reduces them (SUM of
   gradients of losses already scaled by ``examples / global batch``) and updates.

Every collective batchfit issues carries a timeout, so a worker that dies or diverges makes the
others fail with ``DeadlineExceededError`` instead of hanging; create the strategy with
``communication_options=tf.distribute.experimental.CommunicationOptions(timeout_seconds=...)``
(or :func:`make_strategy`) so the gradient all-reduce inside the optimizer is bounded too.

Example (run the same script on every worker, ``TF_CONFIG`` set per worker; see
``examples/multiworker_fit.py``):

```python
strategy = batchfit.tf.multiworker.make_strategy(timeout_seconds=300)
found = find_max_batch_size_multiworker(build_model, strategy)   # each worker: own budget
with strategy.scope():
    model = build_model()
history = fit_multiworker(model, x, y, batch_size=found.safe_global_batch_size,
                          epochs=3, strategy=strategy)
```
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from ..core.shrink import (
    HalvingShrink,
    Observation,
    ShrinkPolicy,
    next_smaller,
    plan_micro_batches,
)
from ..errors import (
    BatchfitError,
    InvalidInputError,
    NothingFitsError,
    TrainingOutOfMemoryError,
)
from ..results import MaxBatchResult
from ..results.fit import BatchAdjustment
from .oom import is_oom_error

__all__ = [
    "MultiWorkerHistory",
    "MultiWorkerMaxBatchResult",
    "agree_batch_size",
    "find_max_batch_size_multiworker",
    "fit_multiworker",
    "local_memory_budget",
    "make_strategy",
    "upstream_fit_works",
    "worker_position",
]

DEFAULT_TIMEOUT = 300.0        # seconds a collective of one training step may wait
DEFAULT_AGREE_TIMEOUT = 1800.0  # seconds one worker waits for the others' searches to end
KNOWN_UPSTREAM_FAILURE = "PerReplica"  # keras-team/keras#20585: "Attempt to convert a value (PerReplica"

_UPSTREAM: weakref.WeakKeyDictionary[Any, tuple[bool, str]] = weakref.WeakKeyDictionary()


# --- the strategy and this worker's place in it -----------------------------------------------
def make_strategy(timeout_seconds: float = DEFAULT_TIMEOUT) -> tf.distribute.Strategy:
    """A ``MultiWorkerMirroredStrategy`` (from ``TF_CONFIG``) whose collectives time out.

    A collective that waits longer than ``timeout_seconds`` raises ``DeadlineExceededError``
    (this includes the gradient all-reduce inside the optimizer), so a worker never waits
    forever for one that died. Create it at the start of the program, before other
    TensorFlow work, as TensorFlow requires for this strategy.

    Args:
        timeout_seconds: the longest one collective may wait, in seconds (default 300).

    Returns:
        The strategy.

    Example:

    >>> strategy = make_strategy(timeout_seconds=120)  # doctest: +SKIP
    >>> strategy.num_replicas_in_sync                  # doctest: +SKIP
    2
    """
    if not timeout_seconds > 0:
        raise InvalidInputError(f"timeout_seconds must be > 0, got {timeout_seconds!r}")
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout_seconds)
    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)


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


def _options(timeout: float | None) -> tf.distribute.experimental.CommunicationOptions:
    return tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout)


def _all_gather(strategy: tf.distribute.Strategy, values: list[float], timeout: float | None
                ) -> np.ndarray:
    """Every replica's ``values`` (same on the replicas of one worker): ``(replicas, k)``."""
    row = tf.constant([values], dtype=tf.float64)
    options = _options(timeout)

    def gather() -> Any:
        ctx = tf.distribute.get_replica_context()
        return ctx.all_gather(tf.identity(row), axis=0, options=options)

    out = strategy.run(gather)
    return np.asarray(strategy.experimental_local_results(out)[0].numpy())


def _per_worker(strategy: tf.distribute.Strategy, rows: np.ndarray) -> np.ndarray:
    """The gathered rows, one per worker (replicas are ordered worker by worker)."""
    _, workers = worker_position(strategy)
    local = max(1, rows.shape[0] // workers)
    return rows[::local][:workers]


# --- 1. is Keras's own fit usable under this strategy? ----------------------------------------
def upstream_fit_works(strategy: tf.distribute.Strategy, *, timeout: float = 120.0
                       ) -> bool:
    """Whether Keras's own ``model.fit`` trains under ``strategy`` (probed, then cached).

    Fits a one-unit model for one step under the strategy and catches the known failure
    (keras-team/keras issue 20585, "Attempt to convert a value (PerReplica...)"), so the day
    Keras fixes it, batchfit notices. Every worker must call it (the probe's step and the
    agreement are collectives); the answer is ``True`` only when the probe worked on every
    worker. Cheap: one tiny model, one step, once per strategy.

    Args:
        strategy: the ``tf.distribute`` strategy.
        timeout: seconds the agreement may wait for the other workers (default 120).

    Returns:
        ``True`` when ``model.fit`` works under the strategy on every worker.

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
        first = str(exc).splitlines()[0] if str(exc) else ""
        known = KNOWN_UPSTREAM_FAILURE in str(exc)
        detail = (f"{type(exc).__name__}: {first[:200]}"
                  + ("" if known else " (not the known keras#20585 failure)"))
    if worker_position(strategy)[1] > 1 or replicas > 1:
        votes = _all_gather(strategy, [1.0 if ok else 0.0], timeout)
        ok = bool(np.all(votes > 0.5))
    _UPSTREAM[strategy] = (ok, detail)
    return ok


def upstream_fit_failure(strategy: tf.distribute.Strategy) -> str:
    """The error the probe of :func:`upstream_fit_works` caught on this worker ("" if none)."""
    cached = _UPSTREAM.get(strategy)
    return cached[1] if cached else ""


# --- 2. a collective minimum ------------------------------------------------------------------
def agree_batch_size(strategy: tf.distribute.Strategy, local_value: int, *,
                     timeout: float | None = DEFAULT_AGREE_TIMEOUT) -> int:
    """The minimum of ``local_value`` over all workers, the same answer on every worker.

    The reduce ops of a multi-worker strategy are SUM and MEAN only, so the workers all-gather
    their values and each takes the minimum of the same list: every worker returns the same
    size, and none waits on another afterwards. Every worker must call it.

    Args:
        strategy: the ``tf.distribute`` strategy.
        local_value: this worker's value (e.g. its largest per-replica batch), an integer;
            a value <= 0 may stand for "nothing fits here".
        timeout: seconds to wait for the other workers (default 1800: they may still be
            searching); ``None`` waits as long as the strategy's own options allow.

    Returns:
        The minimum over the workers.

    Example:

    >>> agree_batch_size(tf.distribute.get_strategy(), 48)
    48
    """
    if isinstance(local_value, bool) or not isinstance(local_value, (int, np.integer)):
        raise InvalidInputError(f"local_value must be an integer, got {local_value!r}")
    rows = _all_gather(strategy, [float(local_value)], timeout)
    return int(rows[:, 0].min())


# --- 3. the search --------------------------------------------------------------------------
@dataclass(frozen=True)
class MultiWorkerMaxBatchResult:
    """The batch every worker can train with, as :func:`find_max_batch_size_multiworker` found.

    Attributes:
        per_replica_batch_size: the largest per-replica batch that fits on every worker (the
            minimum of the workers' ``max_batch_size``).
        safe_per_replica_batch_size: the same for the workers' ``safe_batch_size``.
        global_batch_size: ``per_replica_batch_size * num_replicas``: the ``batch_size`` to
            train with.
        safe_global_batch_size: ``safe_per_replica_batch_size * num_replicas``.
        num_replicas: replicas in sync (all workers).
        num_workers: worker processes.
        worker_index: this worker's index.
        worker_max_batch_sizes: each worker's own largest per-replica batch (0: nothing fit).
        worker_safe_batch_sizes: each worker's own safe per-replica batch.
        worker_budgets: each worker's memory budget in bytes (0: unknown).
        limiting_worker: the index of the worker whose device set the size.
        local: this worker's own :class:`~batchfit.results.MaxBatchResult` (``None`` if its
            search found nothing that fits).
        seconds: wall time of this worker's search and the agreement.
    """

    per_replica_batch_size: int
    safe_per_replica_batch_size: int
    global_batch_size: int
    safe_global_batch_size: int
    num_replicas: int
    num_workers: int
    worker_index: int
    worker_max_batch_sizes: list[int]
    worker_safe_batch_sizes: list[int]
    worker_budgets: list[int]
    limiting_worker: int
    local: MaxBatchResult | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the local result nested as its own ``to_dict``)."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "local"}
        out["local"] = self.local.to_dict() if self.local is not None else None
        return out


def local_memory_budget() -> str | None:
    """This worker's device budget when its environment caps TensorFlow's CPU allocator.

    ``TF_CPU_BFC_MEM_LIMIT_IN_MB=N`` (with ``TF_CPU_ALLOCATOR_USE_BFC=true``) makes this
    process's CPU "device" N MiB, so ``"NMiB"`` is returned; otherwise ``None`` (the search
    then uses the device's own memory: a GPU's total, or the available RAM on CPU).
    """
    raw = os.environ.get("TF_CPU_BFC_MEM_LIMIT_IN_MB", "").strip()
    if not raw or os.environ.get("TF_CPU_ALLOCATOR_USE_BFC", "").lower() not in ("1", "true"):
        return None
    try:
        mib = int(raw)
    except ValueError:
        return None
    return f"{mib}MiB" if mib > 0 else None


def find_max_batch_size_multiworker(
    model: Any,
    strategy: tf.distribute.Strategy,
    memory: str | int | None = None,
    *,
    agree_timeout: float | None = DEFAULT_AGREE_TIMEOUT,
    **kwargs: Any,
) -> MultiWorkerMaxBatchResult:
    """The largest per-replica (and global) batch that fits on every worker's device.

    Each worker searches its own device with :func:`batchfit.find_max_batch_size` (probes in
    isolated processes, so the search never touches the strategy or its collectives), then all
    workers agree on the minimum with one all-gather, which also tells each worker every
    other worker's own maximum. Every worker must call it, with the same ``kwargs``; a worker
    on which nothing fits makes every worker raise :class:`~batchfit.NothingFitsError`.

    Args:
        model: a zero-argument function returning a compiled ``keras.Model``, or a spec
            (``"file.py:factory"``, ``"package.module:factory"``, ``"model.keras"``). Not a
            model built under the strategy: its variables cannot be sent to a probe process.
        strategy: the ``tf.distribute`` strategy training will use.
        memory: this worker's device budget (``"16GiB"``, bytes); default: the CPU allocator
            cap of this process when its environment sets one (:func:`local_memory_budget`),
            else the device's own memory. Each worker passes its own, so workers with
            different devices are handled: the smallest one decides.
        agree_timeout: seconds a worker that finished its search waits for the others
            (default 1800).
        **kwargs: passed to :func:`batchfit.find_max_batch_size` (``strategy`` there is the
            search strategy, e.g. ``search="binsearch"`` here; ``isolate`` defaults to
            ``"process"``).

    Returns:
        A :class:`MultiWorkerMaxBatchResult`; train with ``safe_global_batch_size`` (or
        ``global_batch_size``) as the global ``batch_size``.

    Raises:
        InvalidInputError: a model object instead of a factory, or bad search arguments.
        NothingFitsError: nothing fits on at least one worker (all workers raise it).

    Example:

    >>> strategy = make_strategy()                                        # doctest: +SKIP
    >>> r = find_max_batch_size_multiworker(build_model, strategy)        # doctest: +SKIP
    >>> r.per_replica_batch_size, r.global_batch_size, r.worker_max_batch_sizes  # doctest: +SKIP
    (96, 192, [96, 210])
    """
    from .maxbatch import find_max_batch_size

    t0 = time.perf_counter()
    if hasattr(model, "train_on_batch") and hasattr(model, "variables"):
        raise InvalidInputError(
            "find_max_batch_size_multiworker needs a function that builds the model (or a "
            "'file.py:factory' spec), not a model object: each worker probes in separate "
            "processes, which rebuild the model from the function")
    if "search" in kwargs:
        kwargs["strategy"] = kwargs.pop("search")
    kwargs.setdefault("isolate", "process")
    budget_arg = memory if memory is not None else local_memory_budget()
    index, workers = worker_position(strategy)
    local: MaxBatchResult | None = None
    failure: BaseException | None = None
    try:
        local = find_max_batch_size(model, budget_arg, **kwargs)
    except NothingFitsError as exc:
        failure = exc
    except Exception:
        # Tell the other workers before raising, so none of them waits for this one.
        _all_gather(strategy, [-1.0, -1.0, 0.0], agree_timeout)
        raise
    mine = ([float(local.max_batch_size), float(local.safe_batch_size),
             float(local.memory_budget_bytes or 0)] if local is not None else [0.0, 0.0, 0.0])
    rows = _per_worker(strategy, _all_gather(strategy, mine, agree_timeout))
    maxes = [int(v) for v in rows[:, 0]]
    safes = [int(v) for v in rows[:, 1]]
    budgets = [int(v) for v in rows[:, 2]]
    if min(maxes) < 0:
        bad = [i for i, v in enumerate(maxes) if v < 0]
        raise BatchfitError(f"the search failed on worker(s) {bad}; see their own error")
    if min(maxes) == 0:
        bad = [i for i, v in enumerate(maxes) if v == 0]
        msg = f"nothing fits on worker(s) {bad}: no per-replica batch size works on every worker"
        if failure is not None:
            msg += f" (here: {failure})"
        raise NothingFitsError(msg, budget_bytes=budgets[bad[0]] or None)
    replicas = int(strategy.num_replicas_in_sync)
    per_replica, safe = min(maxes), min(safes)
    return MultiWorkerMaxBatchResult(
        per_replica_batch_size=per_replica, safe_per_replica_batch_size=safe,
        global_batch_size=per_replica * replicas, safe_global_batch_size=safe * replicas,
        num_replicas=replicas, num_workers=workers, worker_index=index,
        worker_max_batch_sizes=maxes, worker_safe_batch_sizes=safes, worker_budgets=budgets,
        limiting_worker=int(np.argmin(maxes)), local=local,
        seconds=time.perf_counter() - t0)


# --- 4. training that never dies of out-of-memory -------------------------------------------
@dataclass
class MultiWorkerHistory:
    """What :func:`fit_multiworker` did, on this worker (the numbers agree on every worker).

    Attributes:
        history: ``{"loss": [per-epoch mean loss over the global batches]}``, as Keras's
            ``History.history``.
        epoch: the epoch indices run.
        adjustments: every micro-batch change (:class:`~batchfit.BatchAdjustment`; sizes are
            per replica, ``batch_size`` is the global batch).
        batch_size: the global (effective) batch size.
        per_replica_batch_size: ``batch_size / num_replicas``.
        micro_batch_size: the per-replica micro-batch at the end.
        accumulation_steps: micro-batches per step at the end.
        optimizer_steps: optimizer updates this run made (effective steps).
        num_replicas: replicas in sync.
        num_workers: worker processes.
        worker_index: this worker's index.
        engine: ``"batchfit"`` (batchfit's own step) or ``"keras"`` (Keras's ``fit``).
        notes: why the engine was chosen, and anything else worth knowing.
        seconds: wall time.
    """

    history: dict[str, list[float]] = field(default_factory=dict)
    epoch: list[int] = field(default_factory=list)
    adjustments: list[BatchAdjustment] = field(default_factory=list)
    batch_size: int = 0
    per_replica_batch_size: int = 0
    micro_batch_size: int = 0
    accumulation_steps: int = 1
    optimizer_steps: int = 0
    num_replicas: int = 1
    num_workers: int = 1
    worker_index: int = 0
    engine: str = "batchfit"
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["adjustments"] = [a.to_dict() for a in self.adjustments]
        return out


def _nested_len(data: Any) -> int:
    first = tf.nest.flatten(data)[0]
    return int(first.shape[0])


def _cut(data: Any, start: int, stop: int) -> Any:
    return tf.nest.map_structure(lambda t: t[start:stop], data)


def _take(data: Any, index: np.ndarray) -> Any:
    return tf.nest.map_structure(lambda t: np.asarray(t)[index], data)


def _arrays_from(x: Any, y: Any, sample_weight: Any) -> tuple[Any, Any, Any]:
    """NumPy arrays (nested as given) from ``x, y`` or a finite dataset of batches."""
    if isinstance(x, tf.data.Dataset):
        if y is not None:
            raise InvalidInputError("with a tf.data.Dataset, pass y inside it, not as y=")
        if int(x.cardinality().numpy()) < 0:
            raise InvalidInputError(
                "the dataset is infinite or of unknown size: fit_multiworker reads it whole "
                "(every worker the same data, each training on its share of every global "
                "batch); pass a finite dataset or arrays")
        parts: list[Any] = list(x.as_numpy_iterator())
        if not parts:
            raise InvalidInputError("the dataset is empty")
        joined = tf.nest.map_structure(lambda *t: np.concatenate(t, axis=0), *parts)
        if not isinstance(joined, tuple) or len(joined) not in (2, 3):
            raise InvalidInputError("dataset elements must be batches of (x, y) or "
                                    "(x, y, sample_weight)")
        return joined[0], joined[1], joined[2] if len(joined) == 3 else None
    if x is None or y is None:
        raise InvalidInputError("pass x and y (arrays), or a finite tf.data.Dataset as x")
    sw = None if sample_weight is None else np.asarray(sample_weight)
    return tf.nest.map_structure(np.asarray, x), tf.nest.map_structure(np.asarray, y), sw


class _Trainer:
    """batchfit's own distributed step: local accumulation, a collective OOM decision, apply.

    The accumulators are on-read-synchronized variables (one local copy per replica, updated
    without any collective), so the step functions take no per-replica arguments but the
    micro-batch: applying gradients passed into a ``tf.function`` as ``PerReplica`` values
    failed under this strategy ("destinations can not be empty"), reading them from such
    variables works.
    """

    def __init__(self, model: Any, strategy: tf.distribute.Strategy, global_batch: int,
                 timeout: float | None) -> None:
        self.model, self.strategy = model, strategy
        self.global_batch = global_batch
        self.options = _options(timeout)
        self.variables = list(model.trainable_variables)
        on_read: dict[str, Any] = {"trainable": False,
                                   "synchronization": tf.VariableSynchronization.ON_READ,
                                   "aggregation": tf.VariableAggregation.SUM}
        with strategy.scope():
            self.acc = [tf.Variable(tf.zeros(tuple(v.shape), v.dtype), name="batchfit_acc",
                                    **on_read) for v in self.variables]
            self.loss_acc = tf.Variable(0.0, dtype=tf.float32, name="batchfit_loss", **on_read)
        self._grad = self._make_grad_fn()
        self._apply = self._make_apply_fn()
        self._flag = self._make_flag_fn()
        self._zero = self._make_zero_fn()

    def _make_grad_fn(self) -> Callable[..., Any]:
        model, opt = self.model, self.model.optimizer
        try:
            from keras.src.losses.loss import unscale_loss_for_distribution as unscale
        except ImportError:  # pragma: no cover - a Keras that no longer scales by replicas
            def unscale(v: Any) -> Any:
                return v
        call_has_training = getattr(model, "_call_has_training_arg", True)
        variables, acc, loss_acc = self.variables, self.acc, self.loss_acc
        global_batch = float(self.global_batch)

        def replica(x: Any, y: Any, sw: Any) -> None:
            with tf.GradientTape() as tape:
                y_pred = model(x, training=True) if call_has_training else model(x)
                # compute_loss divides by the replicas under a strategy (Keras's own step
                # relies on the optimizer's SUM all-reduce): undo that, then weigh this
                # micro-batch by its share of the global batch.
                loss = unscale(model._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sw,
                                                    training=True))
                n = tf.cast(tf.shape(tf.nest.flatten(x)[0])[0], loss.dtype)
                share = loss * n / tf.cast(global_batch, loss.dtype)
                scaled = opt.scale_loss(share)
            grads = tape.gradient(scaled, variables)
            for a, g in zip(acc, grads):
                if g is not None:
                    a.assign_add(tf.cast(g, a.dtype))
            loss_acc.assign_add(tf.cast(share, tf.float32))

        @tf.function(reduce_retracing=True)
        def grad(x: Any, y: Any, sw: Any) -> None:
            self.strategy.run(replica, args=(x, y, sw))

        return grad

    def _make_apply_fn(self) -> Callable[..., Any]:
        opt, variables, acc = self.model.optimizer, self.variables, self.acc

        def replica() -> None:
            opt.apply_gradients(zip([a.read_value() for a in acc], variables))

        @tf.function
        def apply() -> None:
            self.strategy.run(replica)

        return apply

    def _make_flag_fn(self) -> Callable[..., Any]:
        options, loss_acc = self.options, self.loss_acc

        def replica(flag: Any) -> Any:
            ctx = tf.distribute.get_replica_context()
            return ctx.all_reduce(tf.distribute.ReduceOp.SUM,
                                  tf.stack([flag, loss_acc.read_value()]), options=options)

        @tf.function
        def flag_fn(flag: Any) -> Any:
            return self.strategy.run(replica, args=(flag,))

        return flag_fn

    def _make_zero_fn(self) -> Callable[..., Any]:
        acc, loss_acc = self.acc, self.loss_acc

        def replica() -> None:
            for a in acc:
                a.assign(tf.zeros_like(a))
            loss_acc.assign(0.0)

        @tf.function
        def zero() -> None:
            self.strategy.run(replica)

        return zero

    def distribute(self, data: Any, start: int, per_replica: int, offset: int, size: int
                   ) -> Any:
        """Each replica's micro-batch: rows ``[offset, offset+size)`` of its share."""
        if data is None:
            return None

        def value(ctx: Any) -> Any:
            lo = start + ctx.replica_id_in_sync_group * per_replica + offset
            return tf.nest.map_structure(tf.convert_to_tensor, _cut(data, lo, lo + size))

        return self.strategy.experimental_distribute_values_from_function(value)

    def gradients(self, x: Any, y: Any, sw: Any, start: int, per_replica: int,
                  sizes: tuple[int, ...]) -> None:
        """Accumulate this worker's share of one global batch, micro-batch by micro-batch."""
        self._zero()
        offset = 0
        for size in sizes:
            self._grad(*[self.distribute(d, start, per_replica, offset, size)
                         for d in (x, y, sw)])
            offset += size

    def decide(self, oom: bool) -> tuple[bool, float]:
        """All-reduce ``[oom flag, loss]``: (whether any worker ran out of memory, step loss)."""
        out = self._flag(tf.constant(1.0 if oom else 0.0, tf.float32))
        total = self.strategy.experimental_local_results(out)[0].numpy()
        return bool(total[0] > 0.5), float(total[1])

    def apply(self) -> None:
        self._apply()

    def release(self) -> None:
        self._zero()


def _memory_device() -> str:
    return "GPU:0" if tf.config.list_logical_devices("GPU") else "CPU:0"


def _reset_peak(device: str) -> None:
    with contextlib.suppress(Exception):  # an allocator without statistics
        tf.config.experimental.reset_memory_stats(device)


def _read_peak(device: str) -> float | None:
    try:
        return float(tf.config.experimental.get_memory_info(device)["peak"])
    except Exception:  # noqa: BLE001 - allocator without statistics
        return None


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    oom = [ln for ln in lines if "OOM" in ln or "out of memory" in ln.lower()]
    text = (oom or lines or [""])[0]
    return f"{type(exc).__name__}: {text[:300]}"


def fit_multiworker(
    model: Any,
    x: Any = None,
    y: Any = None,
    *,
    batch_size: int,
    strategy: tf.distribute.Strategy,
    epochs: int = 1,
    sample_weight: Any = None,
    micro_batch_size: int | None = None,
    shrink: ShrinkPolicy | None = None,
    shuffle: bool = True,
    seed: int = 0,
    engine: str = "auto",
    timeout: float | None = DEFAULT_TIMEOUT,
    verbose: int = 1,
) -> MultiWorkerHistory:
    """Train under a multi-worker strategy at a global batch size, without dying of OOM.

    Every worker runs this with the same arguments and the same data; each trains on its
    replicas' shares of every global batch (replica ``r`` takes rows
    ``[r * per_replica, (r + 1) * per_replica)``). An out-of-memory error on any worker makes
    every worker drop the step (nothing applied), agree on a smaller per-replica micro-batch
    and replay the step with gradient accumulation, so the global batch the optimizer sees,
    and the number of optimizer steps, stay what they would have been without it (see the
    module docstring for the protocol). A global batch that does not fill ``batch_size``
    (the remainder of an epoch) is dropped, as with ``drop_remainder=True``.

    Args:
        model: a compiled ``keras.Model`` built under ``strategy.scope()``, or a zero-argument
            function returning one (called under the scope).
        x: inputs (arrays, or a dict/list of arrays), or a finite ``tf.data.Dataset`` of
            ``(x, y)`` / ``(x, y, sample_weight)`` (read whole on every worker).
        y: targets (arrays); ``None`` with a dataset.
        batch_size: the global batch size (a multiple of ``num_replicas_in_sync``).
        strategy: the ``tf.distribute`` strategy (``MultiWorkerMirroredStrategy``; a
            single-process strategy works too).
        epochs: passes over the data (default 1).
        sample_weight: per-example weights (default none).
        micro_batch_size: the per-replica micro-batch to start with (default: the whole
            per-replica batch).
        shrink: the policy proposing a smaller micro-batch after an out-of-memory error
            (default :class:`~batchfit.HalvingShrink`); the workers take the minimum.
        shuffle: shuffle the examples each epoch, the same permutation on every worker
            (default ``True``; seeded by ``seed`` and the epoch).
        seed: the shuffling seed (default 0).
        engine: ``"batchfit"`` (batchfit's own step), ``"keras"`` (:func:`batchfit.fit`,
            Keras's ``fit``) or ``"auto"`` (default: Keras's ``fit`` only when
            :func:`upstream_fit_works` finds it works under this strategy).
        timeout: seconds each collective batchfit issues may wait (default 300).
        verbose: 1 prints one line per epoch on worker 0; 0 is silent.

    Returns:
        A :class:`MultiWorkerHistory`.

    Raises:
        InvalidInputError: bad arguments, or workers called it with different ones.
        TrainingOutOfMemoryError: a micro-batch of one example does not fit on some worker
            (raised on every worker).

    Example:

    >>> strategy = make_strategy()                                          # doctest: +SKIP
    >>> with strategy.scope():                                              # doctest: +SKIP
    ...     model = build_model()
    >>> h = fit_multiworker(model, x, y, batch_size=256, epochs=2,          # doctest: +SKIP
    ...                     strategy=strategy)
    >>> h.optimizer_steps, [a.describe() for a in h.adjustments]            # doctest: +SKIP
    (16, ['batchfit: epoch 1, step 0: train micro-batch 128 -> 64 (2 x accumulated ...'])
    """
    t0 = time.perf_counter()
    if engine not in ("auto", "batchfit", "keras"):
        raise InvalidInputError(f"engine must be 'auto', 'batchfit' or 'keras', got {engine!r}")
    for name, value in (("batch_size", batch_size), ("epochs", epochs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidInputError(f"{name} must be an integer >= 1, got {value!r}")
    if micro_batch_size is not None and (isinstance(micro_batch_size, bool)
                                         or not isinstance(micro_batch_size, int)
                                         or micro_batch_size < 1):
        raise InvalidInputError(f"micro_batch_size must be an integer >= 1, got {micro_batch_size!r}")
    if timeout is not None and not timeout > 0:
        raise InvalidInputError(f"timeout must be > 0 seconds or None, got {timeout!r}")
    policy: ShrinkPolicy = shrink if shrink is not None else HalvingShrink()
    replicas = int(strategy.num_replicas_in_sync)
    index, workers = worker_position(strategy)
    if batch_size % replicas:
        raise InvalidInputError(
            f"the global batch_size {batch_size} is not a multiple of the {replicas} replicas "
            f"in sync; use e.g. {max(1, batch_size // replicas) * replicas}")
    per_replica = batch_size // replicas

    if not (hasattr(model, "train_on_batch") and hasattr(model, "variables")):
        if not callable(model):
            raise InvalidInputError("model must be a compiled keras.Model or a function "
                                    "returning one")
        with strategy.scope():
            model = model()
    if getattr(model, "optimizer", None) is None or getattr(model, "_compile_loss", None) is None:
        raise InvalidInputError("the model must be compiled (an optimizer and a loss), under "
                                "strategy.scope()")
    owner = getattr(model, "_distribute_strategy", None)
    if owner is not strategy and replicas > 1:
        raise InvalidInputError("build and compile the model under this strategy's scope "
                                "(`with strategy.scope(): model = build_model()`)")
    if getattr(model.optimizer, "gradient_accumulation_steps", None):
        raise InvalidInputError("the optimizer already has gradient_accumulation_steps; "
                                "fit_multiworker accumulates by itself: leave it unset")

    xs, ys, ws = _arrays_from(x, y, sample_weight)
    n = _nested_len(xs)
    steps = n // batch_size
    if workers > 1 or replicas > 1:
        rows = _per_worker(strategy, _all_gather(
            strategy, [float(batch_size), float(n), float(epochs), float(seed)], timeout))
        if not np.all(rows == rows[0]):
            raise InvalidInputError(
                "the workers called fit_multiworker with different arguments or data "
                f"(batch_size, examples, epochs, seed per worker: {rows.astype(int).tolist()}); "
                "every worker must pass the same")
    if steps < 1:
        raise InvalidInputError(f"{n} examples do not make one global batch of {batch_size}")

    out = MultiWorkerHistory(batch_size=batch_size, per_replica_batch_size=per_replica,
                             num_replicas=replicas, num_workers=workers, worker_index=index)
    if engine == "auto":
        works = upstream_fit_works(strategy, timeout=timeout or DEFAULT_TIMEOUT)
        engine = "keras" if works else "batchfit"
        out.notes.append(
            "Keras's model.fit works under this strategy: training with batchfit.fit" if works
            else f"Keras's model.fit fails under this strategy ({upstream_fit_failure(strategy)}"
                 "; keras-team/keras#20585): training with batchfit's own step")
    out.engine = engine
    if engine == "keras":
        from .resilient import fit as resilient_fit

        before = int(model.optimizer.iterations.numpy())
        # batchfit.fit takes global sizes (micro_batch_size here is per replica).
        h = resilient_fit(model, xs, ys, batch_size=batch_size, epochs=epochs,
                          sample_weight=ws, shuffle=shuffle, verbose=verbose,
                          shrink_policy=policy,
                          micro_batch_size=(None if micro_batch_size is None
                                            else min(micro_batch_size, per_replica) * replicas))
        out.history = {k: [float(v) for v in vals] for k, vals in h.history.items()}
        out.epoch = list(h.epoch)
        out.adjustments = list(getattr(h, "adjustments", []))
        out.optimizer_steps = int(model.optimizer.iterations.numpy()) - before
        out.micro_batch_size = int(getattr(h, "per_replica_micro_batch_size", None)
                                   or per_replica)
        out.accumulation_steps = int(getattr(h, "accumulation_steps", 1))
        out.seconds = time.perf_counter() - t0
        return out

    strategy_timeout = getattr(getattr(strategy.extended, "_communication_options", None),
                               "timeout_seconds", None)
    if workers > 1 and strategy_timeout is None:
        out.notes.append("the strategy's collectives have no timeout: the gradient all-reduce "
                         "inside the optimizer may wait forever for a dead worker (create the "
                         "strategy with make_strategy(timeout_seconds=...))")
    if not model.built:
        with strategy.scope():
            model(tf.nest.map_structure(lambda t: t[:1], xs))
    if not model.optimizer.built:
        with strategy.scope():
            model.optimizer.build(model.trainable_variables)

    trainer = _Trainer(model, strategy, batch_size, timeout)
    micro = min(micro_batch_size or per_replica, per_replica)
    device = _memory_device()
    observations: list[Observation] = []
    non_trainable = list(model.non_trainable_variables)
    start_iterations = int(model.optimizer.iterations.numpy())
    rng = np.random.default_rng(seed)
    for epoch in range(epochs):
        order = rng.permutation(n) if shuffle else None
        ex, ey, ew = ((xs, ys, ws) if order is None else
                      (_take(xs, order), _take(ys, order),
                       None if ws is None else np.asarray(ws)[order]))
        losses: list[float] = []
        for step in range(steps):
            start = step * batch_size
            saved = [v.numpy() for v in non_trainable]
            while True:
                plan = plan_micro_batches(per_replica, micro)
                t_step = time.perf_counter()
                oom_exc: BaseException | None = None
                _reset_peak(device)
                try:
                    trainer.gradients(ex, ey, ew, start, per_replica, plan.sizes)
                except Exception as exc:
                    if not is_oom_error(exc):
                        raise
                    oom_exc = exc
                observations.append((plan.micro_batch_size, oom_exc is None,
                                     _read_peak(device)))
                any_oom, step_loss = trainer.decide(oom_exc is not None)
                if not any_oom:
                    trainer.apply()
                    losses.append(step_loss)
                    break
                # Nothing was applied: restore what the forward passes changed, then agree.
                for v, value in zip(non_trainable, saved):
                    v.assign(value)
                proposal = micro
                if oom_exc is not None:
                    proposal = next_smaller(policy, plan.micro_batch_size, observations) or 0
                rows = _per_worker(strategy, _all_gather(
                    strategy, [float(oom_exc is not None), float(proposal)], timeout))
                failed = [i for i, r in enumerate(rows) if r[0] > 0.5]
                new = int(rows[:, 1].min())
                detail = f"out of memory on worker(s) {failed}"
                if oom_exc is not None:
                    detail += f"; here {_first_line(oom_exc)}"
                if new < 1:
                    stuck = [i for i, r in enumerate(rows) if r[0] > 0.5 and r[1] < 1]
                    raise TrainingOutOfMemoryError(
                        f"out of memory at a per-replica micro-batch of {plan.micro_batch_size} "
                        f"on worker(s) {stuck}, and no smaller micro-batch is left (a "
                        f"micro-batch of 1 example does not fit): the model's weights and "
                        f"optimizer state leave no room on that device. {detail}")
                new = min(new, plan.micro_batch_size - 1)
                new_plan = plan_micro_batches(per_replica, new)
                out.adjustments.append(BatchAdjustment(
                    phase="train", epoch=epoch, step=step,
                    optimizer_step=int(model.optimizer.iterations.numpy()),
                    batch_size=batch_size, from_micro_batch=plan.micro_batch_size,
                    to_micro_batch=new_plan.micro_batch_size,
                    accumulation_steps=new_plan.steps, reason="oom", detail=detail,
                    seconds=time.perf_counter() - t_step, time_unix=time.time()))
                micro = new
                if verbose and index == 0:
                    print(out.adjustments[-1].describe(), flush=True)
        mean = float(np.mean(losses)) if losses else math.nan
        out.history.setdefault("loss", []).append(mean)
        out.epoch.append(epoch)
        if verbose and index == 0:
            print(f"epoch {epoch + 1}/{epochs}: loss {mean:.4f} (global batch {batch_size}, "
                  f"per replica {per_replica}, micro-batch {micro})", flush=True)
    final = plan_micro_batches(per_replica, micro)
    out.micro_batch_size = final.micro_batch_size
    out.accumulation_steps = final.steps
    out.optimizer_steps = int(model.optimizer.iterations.numpy()) - start_iterations
    out.seconds = time.perf_counter() - t0
    return out
