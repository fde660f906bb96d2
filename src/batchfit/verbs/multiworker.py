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
strategy = batchfit.make_strategy(timeout_seconds=300)
found = find_max_batch_size_multiworker(build_model, strategy)   # each worker: own budget
with strategy.scope():
    model = build_model()
history = fit_multiworker(model, x, y, batch_size=found.safe_global_batch_size,
                          epochs=3, strategy=strategy)
```
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backend import get_backend
from ..core.validate import is_int
from ..errors import (
    BatchfitError,
    InvalidInputError,
    NothingFitsError,
)
from ..results import MaxBatchResult

__all__ = [
    "MultiWorkerMaxBatchResult",
    "agree_batch_size",
    "find_max_batch_size_multiworker",
    "local_memory_budget",
    "make_strategy",
    "upstream_fit_failure",
    "upstream_fit_works",
    "worker_position",
]

DEFAULT_AGREE_TIMEOUT = 1800.0  # seconds one worker waits for the others' searches to end


# --- the strategy and this worker's place in it -----------------------------------------------
def make_strategy(timeout_seconds: float | None = None) -> Any:
    """A ``MultiWorkerMirroredStrategy`` (from ``TF_CONFIG``) whose collectives time out.

    A collective that waits longer than ``timeout_seconds`` raises ``DeadlineExceededError``
    (this includes the gradient all-reduce inside the optimizer), so a worker never waits
    forever for one that died. Create it at the start of the program, before other
    TensorFlow work, as TensorFlow requires for this strategy.

    Args:
        timeout_seconds: the longest one collective may wait, in seconds (default: 300).

    Returns:
        The strategy.

    Raises:
        InvalidInputError: ``timeout_seconds`` is not positive.

    Example:

    >>> strategy = make_strategy(timeout_seconds=120)  # doctest: +SKIP
    >>> strategy.num_replicas_in_sync                  # doctest: +SKIP
    2
    """
    return get_backend().make_strategy(timeout_seconds)


def worker_position(strategy: Any) -> tuple[int, int]:
    """``(this worker's index, number of workers)``; ``(0, 1)`` for a single-process strategy.

    Workers are numbered as TensorFlow orders its tasks: the chief (if any) first, then the
    workers by their ``TF_CONFIG`` index.

    Example:

    >>> import tensorflow as tf
    >>> worker_position(tf.distribute.get_strategy())
    (0, 1)
    """
    return get_backend().worker_position(strategy)


def _all_gather(strategy: Any, values: list[float], timeout: float | None) -> np.ndarray:
    """Every replica's ``values`` (same on the replicas of one worker): ``(replicas, k)``."""
    return np.asarray(get_backend().all_gather(strategy, values, timeout))


def _per_worker(strategy: Any, rows: np.ndarray) -> np.ndarray:
    """The gathered rows, one per worker (replicas are ordered worker by worker)."""
    _, workers = worker_position(strategy)
    local = max(1, rows.shape[0] // workers)
    return rows[::local][:workers]


# --- 1. is Keras's own fit usable under this strategy? ----------------------------------------
def upstream_fit_works(strategy: Any, *, timeout: float = 120.0) -> bool:
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

    >>> import tensorflow as tf
    >>> upstream_fit_works(tf.distribute.get_strategy())
    True
    """
    return get_backend().upstream_fit_works(strategy, timeout=timeout)


def upstream_fit_failure(strategy: Any) -> str:
    """The error the probe of :func:`upstream_fit_works` caught on this worker ("" if none)."""
    return get_backend().upstream_fit_failure(strategy)


# --- 2. a collective minimum ------------------------------------------------------------------
def agree_batch_size(strategy: Any, local_value: int, *,
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

    >>> import tensorflow as tf
    >>> agree_batch_size(tf.distribute.get_strategy(), 48)
    48
    """
    if not is_int(local_value):
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
    strategy: Any,
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
        **kwargs: passed to :func:`batchfit.find_max_batch_size` (e.g. the search policy,
            ``search="binsearch"``; ``isolate`` defaults to ``"process"``).

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
    from .maxbatch_local import search_max_batch_size

    t0 = time.perf_counter()
    if get_backend().is_model(model):
        raise InvalidInputError(
            "find_max_batch_size_multiworker needs a function that builds the model (or a "
            "'file.py:factory' spec), not a model object: each worker probes in separate "
            "processes, which rebuild the model from the function")
    kwargs.setdefault("isolate", "process")
    budget_arg = memory if memory is not None else local_memory_budget()
    index, workers = worker_position(strategy)
    local: MaxBatchResult | None = None
    failure: BaseException | None = None
    try:
        local = search_max_batch_size(model, budget_arg, **kwargs)
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

