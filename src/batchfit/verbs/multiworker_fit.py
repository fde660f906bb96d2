"""``fit_multiworker``: training under ``MultiWorkerMirroredStrategy`` that never dies of OOM.

An out-of-memory error on one worker must shrink the micro-batch of *all* of them, decided
collectively, or the others wait forever in the next gradient all-reduce. See
:mod:`batchfit.verbs.multiworker` for the whole design (one training step of batchfit's own
loop, the collectives and their timeouts); this module is its step 4.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..backend import DEFAULT_COLLECTIVE_TIMEOUT, get_backend
from ..backend.oom import is_oom_error
from ..core.fit_control import FitController, agree
from ..core.shrink import HalvingShrink, ShrinkPolicy
from ..core.validate import check_int
from ..errors import InvalidInputError, TrainingOutOfMemoryError, error_line
from ..results.fit import BatchAdjustment
from .multiworker import (
    _all_gather,
    _per_worker,
    upstream_fit_failure,
    upstream_fit_works,
    worker_position,
)

__all__ = ["MultiWorkerHistory", "fit_multiworker"]

#: Seconds each collective of one training step may wait (the backends' default).
DEFAULT_TIMEOUT = DEFAULT_COLLECTIVE_TIMEOUT

# The line of an error that names running out of memory (quoted when one worker ran out).
_OOM_LINE = r"OOM|(?i:out of memory)"


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


def fit_multiworker(
    model: Any,
    x: Any = None,
    y: Any = None,
    *,
    batch_size: int,
    strategy: Any,
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
    policy = _check_arguments(engine, batch_size, epochs, micro_batch_size, timeout, shrink)
    # Python ints from here on (a NumPy integer is accepted): the history is JSON-ready.
    batch_size, epochs = int(batch_size), int(epochs)
    micro_batch_size = None if micro_batch_size is None else int(micro_batch_size)
    backend = get_backend()
    replicas = backend.num_replicas(strategy)
    index, workers = worker_position(strategy)
    if batch_size % replicas:
        raise InvalidInputError(
            f"the global batch_size {batch_size} is not a multiple of the {replicas} replicas "
            f"in sync; use e.g. {max(1, batch_size // replicas) * replicas}")
    per_replica = batch_size // replicas
    session = backend.fit_multiworker_session(model, strategy, timeout)
    xs, ys, ws = session.arrays(x, y, sample_weight)
    n = session.num_examples(xs)
    if workers > 1 or replicas > 1:
        rows = _per_worker(strategy, _all_gather(
            strategy, [float(batch_size), float(n), float(epochs), float(seed)], timeout))
        if not np.all(rows == rows[0]):
            raise InvalidInputError(
                "the workers called fit_multiworker with different arguments or data "
                f"(batch_size, examples, epochs, seed per worker: {rows.astype(int).tolist()}); "
                "every worker must pass the same")
    if n // batch_size < 1:
        raise InvalidInputError(f"{n} examples do not make one global batch of {batch_size}")

    out = MultiWorkerHistory(batch_size=batch_size, per_replica_batch_size=per_replica,
                             num_replicas=replicas, num_workers=workers, worker_index=index)
    out.engine = _choose_engine(engine, strategy, timeout, out.notes)
    run = _Training(session=session, strategy=strategy, timeout=timeout, out=out, verbose=verbose,
               control=FitController(policy, batch_size=per_replica,
                                     micro_batch_size=min(micro_batch_size or per_replica,
                                                          per_replica)))
    if out.engine == "keras":
        _fit_with_keras(run, (xs, ys, ws), epochs=epochs, shuffle=shuffle,
                        micro_batch_size=micro_batch_size)
    else:
        _fit_with_batchfit(run, (xs, ys, ws), epochs=epochs, shuffle=shuffle, seed=seed)
    out.seconds = time.perf_counter() - t0
    return out


def _check_arguments(engine: str, batch_size: int, epochs: int, micro_batch_size: int | None,
                     timeout: float | None, shrink: ShrinkPolicy | None) -> ShrinkPolicy:
    """The shrink policy, once every argument of :func:`fit_multiworker` is checked."""
    if engine not in ("auto", "batchfit", "keras"):
        raise InvalidInputError(f"engine must be 'auto', 'batchfit' or 'keras', got {engine!r}")
    check_int("batch_size", batch_size, minimum=1)
    check_int("epochs", epochs, minimum=1)
    check_int("micro_batch_size", micro_batch_size, minimum=1, optional=True)
    if timeout is not None and not timeout > 0:
        raise InvalidInputError(f"timeout must be > 0 seconds or None, got {timeout!r}")
    return shrink if shrink is not None else HalvingShrink()


def _choose_engine(engine: str, strategy: Any, timeout: float | None, notes: list[str]) -> str:
    """``engine``, with ``"auto"`` resolved by probing Keras's own fit (every worker)."""
    if engine != "auto":
        return engine
    works = upstream_fit_works(strategy, timeout=timeout or DEFAULT_TIMEOUT)
    notes.append(
        "Keras's model.fit works under this strategy: training with batchfit.fit" if works
        else f"Keras's model.fit fails under this strategy ({upstream_fit_failure(strategy)}"
             "; keras-team/keras#20585): training with batchfit's own step")
    return "keras" if works else "batchfit"


@dataclass
class _Training:
    """What one :func:`fit_multiworker` call trains with (its pieces, not its decisions)."""

    session: Any
    strategy: Any
    timeout: float | None
    out: MultiWorkerHistory
    verbose: int
    control: FitController

    @property
    def per_replica(self) -> int:
        return self.out.per_replica_batch_size

    def say(self, line: str) -> None:
        """Print ``line`` on worker 0 when verbose."""
        if self.verbose and self.out.worker_index == 0:
            print(line, flush=True)


def _fit_with_keras(run: _Training, data: tuple[Any, Any, Any], *, epochs: int, shuffle: bool,
                    micro_batch_size: int | None) -> None:
    """Train with :func:`batchfit.fit` (Keras's own loop), which works under this strategy."""
    from .fit import fit as resilient_fit

    out, session = run.out, run.session
    xs, ys, ws = data
    before = session.iterations()
    # batchfit.fit takes global sizes (micro_batch_size here is per replica).
    h = resilient_fit(session.model, xs, ys, batch_size=out.batch_size, epochs=epochs,
                      sample_weight=ws, shuffle=shuffle, verbose=run.verbose,
                      shrink_policy=run.control.policy,
                      micro_batch_size=(None if micro_batch_size is None
                                        else min(micro_batch_size, run.per_replica)
                                        * out.num_replicas))
    out.history = {k: [float(v) for v in vals] for k, vals in h.history.items()}
    out.epoch = list(h.epoch)
    out.adjustments = list(getattr(h, "adjustments", []))
    out.optimizer_steps = session.iterations() - before
    out.micro_batch_size = int(getattr(h, "per_replica_micro_batch_size", None)
                               or run.per_replica)
    out.accumulation_steps = int(getattr(h, "accumulation_steps", 1))


def _fit_with_batchfit(run: _Training, data: tuple[Any, Any, Any], *, epochs: int, shuffle: bool,
                       seed: int) -> None:
    """Train with batchfit's own step: every worker drops an out-of-memory step together."""
    out, session, control = run.out, run.session, run.control
    if out.num_workers > 1 and session.collective_timeout() is None:
        out.notes.append("the strategy's collectives have no timeout: the gradient all-reduce "
                         "inside the optimizer may wait forever for a dead worker (create the "
                         "strategy with make_strategy(timeout_seconds=...))")
    xs = data[0]
    session.build(xs)
    trainer = session.trainer(out.batch_size)
    n = session.num_examples(xs)
    steps = n // out.batch_size
    start_iterations = session.iterations()
    rng = np.random.default_rng(seed)
    for epoch in range(epochs):
        order = rng.permutation(n) if shuffle else None
        epoch_data = session.reorder(*data, order)
        control.epoch_begin(epoch)
        losses = [_train_step(run, trainer, epoch_data, step) for step in range(steps)]
        mean = float(np.mean(losses)) if losses else math.nan
        out.history.setdefault("loss", []).append(mean)
        out.epoch.append(epoch)
        run.say(f"epoch {epoch + 1}/{epochs}: loss {mean:.4f} (global batch {out.batch_size}, "
                f"per replica {run.per_replica}, micro-batch {control.micro('train')})")
    final = control.plan("train", run.per_replica)
    out.micro_batch_size = final.micro_batch_size
    out.accumulation_steps = final.steps
    out.optimizer_steps = session.iterations() - start_iterations


def _train_step(run: _Training, trainer: Any, data: tuple[Any, Any, Any], step: int) -> float:
    """One global batch: accumulate, agree on out-of-memory, apply; replay until it fits."""
    session, control, per_replica = run.session, run.control, run.per_replica
    start = step * run.out.batch_size
    saved = session.save_state()
    while True:
        plan = control.plan("train", per_replica)
        t_step = time.perf_counter()
        oom_exc: BaseException | None = None
        session.reset_peak()
        try:
            trainer.gradients(*data, start, per_replica, plan.sizes)
        except Exception as exc:
            if not is_oom_error(exc):
                raise
            oom_exc = exc
        control.observe("train", plan.micro_batch_size, oom_exc is None, session.read_peak())
        any_oom, step_loss = trainer.decide(oom_exc is not None)
        if not any_oom:
            trainer.apply()
            control.advance("train")
            return step_loss
        # Nothing was applied: restore what the forward passes changed, then agree.
        session.restore_state(saved)
        _agree_smaller(run, plan.micro_batch_size, oom_exc, t_step)


def _agree_smaller(run: _Training, failed: int, oom_exc: BaseException | None,
                   t_step: float) -> None:
    """Every worker proposes (its policy's next size, or its micro-batch); all take the least.

    Raises:
        TrainingOutOfMemoryError: a worker that ran out of memory has nothing smaller.
    """
    control, strategy = run.control, run.strategy
    oom = oom_exc is not None
    proposal = control.propose("train", failed) if oom else int(control.micro("train") or 0)
    rows = _per_worker(strategy, _all_gather(strategy, [float(oom), float(proposal)],
                                             run.timeout))
    agreed = agree([(bool(r[0] > 0.5), float(r[1])) for r in rows])
    detail = f"out of memory on worker(s) {list(agreed.failed)}"
    if oom_exc is not None:
        detail += f"; here {error_line(oom_exc, with_type=True, prefer=_OOM_LINE)}"
    if agreed.exhausted:
        raise TrainingOutOfMemoryError(
            f"out of memory at a per-replica micro-batch of {failed} "
            f"on worker(s) {list(agreed.stuck)}, and no smaller micro-batch is left (a "
            f"micro-batch of 1 example does not fit): the model's weights and "
            f"optimizer state leave no room on that device. {detail}")
    control.adopt("train", min(agreed.micro, failed - 1))
    new_plan = control.plan("train", run.per_replica)
    adj = control.record("train", failed, new_plan.micro_batch_size, new_plan.steps, "oom",
                         detail, time.perf_counter() - t_step, batch_size=run.out.batch_size,
                         optimizer_step=run.session.iterations())
    run.out.adjustments.append(adj)
    run.say(adj.describe())


