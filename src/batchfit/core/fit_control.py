"""The resilient fit's decisions, apart from any framework: shrink, grow, accumulate, replay, agree.

:func:`batchfit.fit` (one device, or replicas in one process) and
:func:`batchfit.fit_multiworker` (one process per worker) both ask one :class:`FitController`
what to do; the backend only executes (runs a step, restores the state a failed step wrote,
accumulates gradients). The decisions, per phase (``"train"``, ``"eval"``):

* **micro-batch**: given (``micro_batch_size``) or, until a step runs out of memory, the
  largest batch seen, so batches of varying size run whole (:meth:`FitController.see_batch`);
* **accumulate**: the rest of a batch of ``n`` runs as :func:`~batchfit.core.shrink.plan_micro_batches`
  of the micro-batch (:meth:`FitController.plan`); under replicas each replica's share is split
  into the same number of parts (:meth:`FitController.plan_replicas`, :func:`split_counts`), and
  training accumulates their gradients into one update when ``keep_effective_batch``;
* **shrink**: after an out-of-memory error every party (a replica set in one process, or each
  worker) proposes the shrink policy's next size (:meth:`FitController.propose`), all take the
  smallest (:func:`agree`), and when none is left a
  :class:`~batchfit.errors.TrainingOutOfMemoryError` says why (:meth:`FitController.shrink`);
* **measure**: the first plan after a change has its peak read, an observation for the policy;
* **grow**: after ``grow_after_epochs`` epochs without an out-of-memory error the training
  micro-batch doubles, up to the batch (:meth:`FitController.epoch_end`).

Every change is a :class:`~batchfit.results.fit.BatchAdjustment`, logged and kept in
:attr:`FitController.adjustments`. Sizes the user sees are global; under ``replicas`` the plan
and the policy reason per replica (memory is per device).

Example:

>>> from batchfit.core.shrink import HalvingShrink
>>> c = FitController(HalvingShrink(), batch_size=64)
>>> c.see_batch("train", 64)
>>> c.plan("train", 64).steps
1
>>> c.failed("train", 64)
>>> c.shrink("train", 64, 64, "OOM", 0.1).to_micro_batch
32
>>> c.plan("train", 64).sizes
(32, 32)
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..errors import TrainingOutOfMemoryError
from ..results.fit import BatchAdjustment
from .shrink import MicroPlan, Observation, ShrinkPolicy, next_smaller, plan_micro_batches
from .sizes import format_bytes

__all__ = ["Agreement", "FitController", "FitSummary", "PhaseState", "ReplicaPlan", "agree",
           "split_counts"]

PHASES = ("train", "eval")


def split_counts(n: int, parts: int) -> list[int]:
    """``n`` examples in ``parts`` contiguous parts differing by at most one (zeros allowed).

    How a replica's share of a failed batch is replayed when it holds fewer examples than
    the longest share (the parts then include empty ones).

    Example:

    >>> split_counts(5, 2), split_counts(1, 3)
    ([3, 2], [1, 0, 0])
    """
    q, r = divmod(n, parts)
    return [q + 1 if i < r else q for i in range(parts)]


@dataclass(frozen=True)
class Agreement:
    """What the parties of one step agreed after an out-of-memory error.

    Attributes:
        micro: the smallest size proposed; below 1 when some party has nothing left.
        failed: the parties (workers, in order) that ran out of memory.
        stuck: the parties that ran out of memory and have no smaller size to propose.
    """

    micro: int
    failed: tuple[int, ...]
    stuck: tuple[int, ...]

    @property
    def exhausted(self) -> bool:
        """Whether no size of at least one example is left."""
        return self.micro < 1


def agree(proposals: Sequence[tuple[bool, float]]) -> Agreement:
    """Every party's ``(ran_out_of_memory, proposed_size)``: all take the smallest.

    A party that ran out of memory proposes its policy's next size (0 when none is left); one
    that did not, its current micro-batch. One rule for the replicas of one process and for
    the workers of :func:`batchfit.fit_multiworker`.

    Example:

    >>> agree([(True, 16), (False, 32)])
    Agreement(micro=16, failed=(0,), stuck=())
    >>> agree([(True, 0), (True, 3)]).exhausted
    True
    """
    failed = tuple(i for i, (oom, _) in enumerate(proposals) if oom)
    stuck = tuple(i for i, (oom, size) in enumerate(proposals) if oom and size < 1)
    return Agreement(micro=int(min(size for _, size in proposals)), failed=failed, stuck=stuck)


@dataclass(frozen=True)
class ReplicaPlan:
    """The rest of a batch held by several replicas, as ``steps`` micro-batches of each share.

    Attributes:
        steps: micro-batches per replica (the same for all: they run together).
        pieces: per replica, the size of each of its ``steps`` parts (zeros allowed).
        micro: the largest part, the per-replica size that must fit.
    """

    steps: int
    pieces: tuple[tuple[int, ...], ...]
    micro: int


@dataclass(frozen=True)
class FitSummary:
    """The last training plan of a fit, as ``History`` reports it (sizes global).

    Attributes:
        micro_batch_size: the largest global micro-batch of the last plan (``None`` before
            any batch): under the size the shrinking left where the batch splits evenly into
            smaller parts (70 under a cap of 17: 5 parts of 14).
        accumulation_steps: micro-batches per batch at the end.
        replicas: replicas in sync.
        per_replica_batch_size: each replica's share of the batch (``None`` when unknown).
        per_replica_micro_batch_size: each replica's share of the micro-batch.
    """

    micro_batch_size: int | None
    accumulation_steps: int
    replicas: int
    per_replica_batch_size: int | None
    per_replica_micro_batch_size: int | None


@dataclass
class PhaseState:
    """The decisions' state for one phase (``"train"`` or ``"eval"``).

    Attributes:
        micro: the global micro-batch (``None`` until given or a batch is seen).
        limited: the micro-batch was given or shrunk; until then it follows the largest batch.
        measure_next: the next plan that runs reads its peak (an observation).
        observations: ``(per-replica size, fits, peak)`` triples for the shrink policy.
        largest: the largest batch seen.
        step: the batch index in the current epoch (evaluation: in the current evaluation).
    """

    micro: int | None = None
    limited: bool = False
    measure_next: bool = False
    observations: list[Observation] = field(default_factory=list)
    largest: int = 0
    step: int = 0


class FitController:
    """Every decision of one resilient fit; a backend executes them.

    Args:
        policy: the shrink policy (an object with ``next_size(failed, observations)``).
        batch_size: the (effective, global) training batch, or ``None`` (a dataset's own).
        keep_effective_batch: default True: accumulate micro-batches into one update;
            False: every micro-batch updates the weights (warned about once).
        grow_after_epochs: ``None`` (default) never grows; ``N`` doubles the training
            micro-batch after ``N`` epochs without an out-of-memory error.
        micro_batch_size: the training micro-batch to start with (default: the batch).
        eval_micro_batch_size: the evaluation micro-batch to start with (default: the batch).
        replicas: replicas in sync (default 1); sizes stay global, the policy works per replica.
        distributed: whether training runs under a strategy, so a failure is reported per
            replica (default: ``replicas > 1``; a strategy of one replica says so too).
        logger: where adjustments are logged at WARNING (default: not logged).

    Example:

    >>> from batchfit.core.shrink import HalvingShrink
    >>> c = FitController(HalvingShrink(), batch_size=8, micro_batch_size=4,
    ...                   grow_after_epochs=1)
    >>> c.epoch_begin(0)
    >>> c.epoch_end().to_micro_batch
    8
    """

    def __init__(self, policy: ShrinkPolicy, *, batch_size: int | None = None,
                 keep_effective_batch: bool = True, grow_after_epochs: int | None = None,
                 micro_batch_size: int | None = None, eval_micro_batch_size: int | None = None,
                 replicas: int = 1, distributed: bool | None = None,
                 logger: logging.Logger | None = None) -> None:
        self.policy = policy
        self.batch_size = batch_size
        self.keep_effective_batch = keep_effective_batch
        self.grow_after_epochs = grow_after_epochs
        self.replicas = max(1, int(replicas))
        self.distributed = self.replicas > 1 if distributed is None else bool(distributed)
        self.logger = logger
        self.phases = {
            "train": PhaseState(micro=micro_batch_size, limited=micro_batch_size is not None,
                                measure_next=True),
            "eval": PhaseState(micro=eval_micro_batch_size,
                               limited=eval_micro_batch_size is not None),
        }
        self.adjustments: list[BatchAdjustment] = []
        self.epoch = 0
        self.clean_epochs = 0
        self._adjusted_this_epoch = False
        self._warned_effective = False

    # --- reading the state ----------------------------------------------------------------
    def micro(self, phase: str) -> int | None:
        """The global micro-batch in force (``None`` before any is known)."""
        return self.phases[phase].micro

    def limited(self, phase: str) -> bool:
        """Whether the micro-batch was given or shrunk (else it follows the largest batch)."""
        return self.phases[phase].limited

    def limit(self, phase: str) -> int | None:
        """The largest batch that may run whole: the micro-batch once limited, else ``None``."""
        state = self.phases[phase]
        return int(state.micro) if state.limited and state.micro is not None else None

    def observations(self, phase: str) -> list[Observation]:
        """The observations the shrink policy sees for ``phase``."""
        return self.phases[phase].observations

    def step(self, phase: str) -> int:
        """The index of the current batch in the epoch (or evaluation)."""
        return self.phases[phase].step

    def measuring(self, phase: str) -> bool:
        """Whether the next plan that runs should read the allocator's peak."""
        return self.phases[phase].measure_next

    def accumulates(self, phase: str, steps: int) -> bool:
        """Whether a plan of ``steps`` micro-batches accumulates into one update."""
        return phase == "train" and self.keep_effective_batch and steps > 1

    def may_run_whole(self, phase: str) -> bool:
        """Whether the next batch may run whole without a size check by the host.

        True once a micro-batch is known, no measurement is due, and either the micro-batch
        follows the batches or it is no smaller than every batch seen (a larger batch is then
        caught by the executor's own size check, :meth:`limit`).
        """
        state = self.phases[phase]
        return (not state.measure_next and state.micro is not None
                and (not state.limited or state.micro >= state.largest))

    def micro_batch(self, phase: str, largest_seen: int = 0) -> int | None:
        """The micro-batch in force; while none was set, the largest batch that ran.

        Args:
            phase: ``"train"`` or ``"eval"``.
            largest_seen: the largest batch the executor ran without the host seeing it.
        """
        state = self.phases[phase]
        micro = state.micro
        if not state.limited:
            micro = max(micro or 0, largest_seen) or None
        return micro

    def largest_batch(self, phase: str, largest_seen: int = 0) -> int | None:
        """The largest batch seen in ``phase`` (by the host or the executor), ``None`` before any."""
        return max(self.phases[phase].largest, largest_seen) or None

    # --- a batch --------------------------------------------------------------------------
    def see_batch(self, phase: str, n: int) -> None:
        """A batch of ``n`` (global) examples is about to run through the host."""
        state = self.phases[phase]
        if state.micro is None or (not state.limited and n > state.micro):
            state.micro = n
        state.largest = max(state.largest, n)

    def advance(self, phase: str) -> None:
        """A batch of ``phase`` is done: the next one has the next index."""
        self.phases[phase].step += 1

    def plan(self, phase: str, rest: int) -> MicroPlan:
        """The ``rest`` examples of a batch (one device) as micro-batches of the micro-batch."""
        micro = self.phases[phase].micro or rest
        return plan_micro_batches(rest, min(int(micro), rest))

    def plan_replicas(self, phase: str, rest: Sequence[int]) -> ReplicaPlan:
        """The rest of each replica's share as the same number of micro-batches.

        The per-replica micro-batch is the global one divided by the replicas (rounded up);
        the longest share sets the number of parts.
        """
        longest = max(rest)
        micro = self.phases[phase].micro or sum(rest)
        per = max(1, -(-int(micro) // self.replicas))
        steps = plan_micro_batches(longest, min(per, longest)).steps if longest else 1
        pieces = tuple(tuple(split_counts(r, steps)) for r in rest)
        return ReplicaPlan(steps=steps, pieces=pieces, micro=max(max(p) for p in pieces))

    def observe(self, phase: str, size: int, fits: bool, peak: float | None = None) -> None:
        """Record that a plan whose largest micro-batch (per replica) is ``size`` ran or not."""
        self.phases[phase].observations.append((int(size), bool(fits), peak))

    def measured(self, phase: str, size: int, peak: float | None) -> None:
        """The measured plan ran: record its peak; no measurement is due until the next change."""
        self.observe(phase, size, True, peak)
        self.phases[phase].measure_next = False

    def failed(self, phase: str, size: int) -> None:
        """A plan whose largest micro-batch (per replica) is ``size`` ran out of memory."""
        self.observe(phase, size, False, None)

    # --- shrinking ------------------------------------------------------------------------
    def propose(self, phase: str, failed: int) -> int:
        """This party's proposal after ``failed`` (per replica) ran out of memory; 0: none left."""
        return next_smaller(self.policy, failed, list(self.phases[phase].observations)) or 0

    def shrink(self, phase: str, failed: int, n: int, detail: str, seconds: float, *,
               optimizer_step: int = 0,
               fixed_bytes: Callable[[], float] = lambda: 0.0) -> BatchAdjustment:
        """Shrink ``phase``'s micro-batch after ``failed`` (per replica) ran out of memory.

        Args:
            phase: ``"train"`` or ``"eval"``.
            failed: the per-replica size that failed.
            n: the global batch being split.
            detail: the first line of the error.
            seconds: the time lost.
            optimizer_step: updates done so far (for the record).
            fixed_bytes: the model's fixed memory, read only to explain a failure.

        Returns:
            The :class:`~batchfit.results.fit.BatchAdjustment` recorded.

        Raises:
            TrainingOutOfMemoryError: no smaller micro-batch is left.
        """
        agreed = agree([(True, self.propose(phase, failed))])
        if agreed.exhausted:
            fixed = fixed_bytes()
            per = " per replica" if self.distributed else ""
            raise TrainingOutOfMemoryError(
                f"out of memory even at a {phase} micro-batch of {failed} example(s){per}: the "
                f"model's weights and optimizer state alone take {format_bytes(fixed)}, which "
                f"with the step's workspace leaves no room for one example ({detail}). Use a "
                "smaller model, a lighter optimizer, mixed precision, or a larger device",
                fixed_bytes=float(fixed))
        new, r = agreed.micro, self.replicas
        self.adopt(phase, new * r)
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
        return self.record(phase, failed * r, new * r, plan.steps, "oom", detail, seconds,
                           batch_size=full, optimizer_step=optimizer_step)

    def adopt(self, phase: str, micro: int) -> None:
        """Take ``micro`` (global) as the micro-batch after an out-of-memory error."""
        state = self.phases[phase]
        state.micro = int(micro)
        state.limited = True
        state.measure_next = True
        if phase == "train":
            self._adjusted_this_epoch = True
            self.clean_epochs = 0

    def record(self, phase: str, old: int, new: int, steps: int, reason: str, detail: str,
               seconds: float, *, batch_size: int, optimizer_step: int = 0,
               time_unix: float | None = None) -> BatchAdjustment:
        """Keep (and log) one adjustment of ``phase``'s micro-batch from ``old`` to ``new``."""
        adj = BatchAdjustment(
            phase=phase, epoch=self.epoch, step=self.phases[phase].step,
            optimizer_step=int(optimizer_step), batch_size=int(batch_size),
            from_micro_batch=int(old), to_micro_batch=int(new), accumulation_steps=int(steps),
            reason=reason, detail=detail, seconds=float(seconds),
            time_unix=time.time() if time_unix is None else float(time_unix))
        self.adjustments.append(adj)
        if self.logger is not None:
            self.logger.warning(adj.describe())
        return adj

    # --- epochs ---------------------------------------------------------------------------
    def epoch_begin(self, epoch: int) -> None:
        """An epoch starts: batch indices count from 0 again."""
        self.epoch = epoch
        self.phases["train"].step = 0
        self.phases["eval"].step = 0
        self._adjusted_this_epoch = False

    def eval_begin(self) -> None:
        """An evaluation starts: its batch indices count from 0."""
        self.phases["eval"].step = 0

    def epoch_end(self, optimizer_step: Callable[[], int] = lambda: 0
                  ) -> BatchAdjustment | None:
        """An epoch ended; grow the training micro-batch when enough epochs were clean.

        Returns:
            The ``"grow"`` adjustment made, or ``None``.
        """
        if self._adjusted_this_epoch:
            return None
        self.clean_epochs += 1
        state = self.phases["train"]
        micro, full = state.micro, self.batch_size
        if (self.grow_after_epochs is None or not state.limited or micro is None
                or full is None or micro >= full or self.clean_epochs < self.grow_after_epochs):
            return None
        new = min(full, micro * 2)
        failed_sizes = [s for s, fits, _ in state.observations if not fits]
        state.micro = new
        self.clean_epochs = 0
        state.measure_next = True
        steps = plan_micro_batches(full, new).steps
        why = (f"{self.grow_after_epochs} clean epoch(s) at micro-batch {micro}"
               + (f"; sizes that failed before: {sorted(set(failed_sizes))}"
                  if failed_sizes else ""))
        return self.record("train", micro, new, steps, "grow", why, 0.0, batch_size=full,
                           optimizer_step=optimizer_step())

    # --- the end --------------------------------------------------------------------------
    def summary(self, largest_seen: int = 0) -> FitSummary:
        """The last training plan, for ``History`` (sizes global).

        Args:
            largest_seen: the largest training batch the executor ran unseen by the host.
        """
        micro = self.micro_batch("train", largest_seen)
        r = self.replicas
        # Without batch_size (a dataset's own batches), the batch is the largest one that ran.
        full = self.batch_size or self.largest_batch("train", largest_seen)
        steps = 1
        if micro and full:  # the plan that ran: an even split may use parts under the cap
            plan = plan_micro_batches(-(-full // r), max(1, micro // r))
            steps, micro = plan.steps, plan.micro_batch_size * r
        return FitSummary(micro_batch_size=micro, accumulation_steps=steps, replicas=r,
                          per_replica_batch_size=-(-full // r) if full else None,
                          per_replica_micro_batch_size=max(1, micro // r) if micro else None)
