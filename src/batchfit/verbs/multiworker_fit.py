"""``fit_multiworker``: training under ``MultiWorkerMirroredStrategy`` that never dies of OOM.

An out-of-memory error on one worker must shrink the micro-batch of *all* of them, decided
collectively, or the others wait forever in the next gradient all-reduce. See
:mod:`batchfit.verbs.multiworker` for the whole design (one training step of batchfit's own
loop, the collectives and their timeouts); this module is its step 4.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf

from ..backend.oom import is_oom_error
from ..backend.tensorflow.distribute import DEFAULT_TIMEOUT
from ..core.shrink import (
    HalvingShrink,
    Observation,
    ShrinkPolicy,
    next_smaller,
    plan_micro_batches,
)
from ..errors import (
    InvalidInputError,
    TrainingOutOfMemoryError,
)
from ..results.fit import BatchAdjustment
from .multiworker import (
    _all_gather,
    _options,
    _per_worker,
    upstream_fit_failure,
    upstream_fit_works,
    worker_position,
)

__all__ = ["MultiWorkerHistory", "fit_multiworker"]


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
        from .fit import fit as resilient_fit

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
