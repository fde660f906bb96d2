"""The user's optimizer during :func:`batchfit.fit`: updates that wait for every gradient,
gradient accumulation switched per batch, learning-rate schedules at the update count.

Every patch is made on the optimizer instance (never in its config) for the duration of the
call and removed after it, so saved models and checkpoints are the user's own. See
:mod:`batchfit.verbs.fit` for why each patch exists.
"""

from __future__ import annotations

import threading
from typing import Any

import keras
import tensorflow as tf

from ...errors import InvalidInputError
from .fit_state import components
from .keras_compat import (
    accumulated_gradients,
    current_learning_rate_fn,
    learning_rate_value,
    optimizer_iterations,
    optimizer_trainable_variables,
    optimizer_variable_index,
    restore_current_learning_rate_fn,
    set_accumulated_gradients,
    set_current_learning_rate_fn,
)
from .probe import assign_whole

__all__ = ["OptimizerPatch"]


class OptimizerPatch:
    """The patches :func:`batchfit.fit` makes to ``model.optimizer``, and its accumulation.

    Args:
        model: the compiled model whose optimizer is patched.
        strategy: the ``tf.distribute`` strategy the model was built under, or ``None``.

    Attributes:
        tls: per replica thread, the role (``None``, ``"accumulate"``, ``"final"``) and the
            accumulation ``k`` of the step being traced (set by the step compiler).
        accumulation: micro-steps per update the optimizer is set to (one device).
    """

    def __init__(self, model: Any, strategy: Any = None) -> None:
        self.model = model
        self.opt = model.optimizer
        self.strategy = strategy
        self.distributed = strategy is not None
        self.tls = threading.local()
        self.accumulation = 1
        self._dist_accs: list[Any] | None = None
        self._accs_zeroed = False   # the optimizer's accumulators checked zero in this run
        self._orig_apply: Any = None
        self._patched_lr = False

    # --- setup and teardown ------------------------------------------------------------
    def install(self) -> None:
        """Patch ``apply`` and the learning rate (refusing an optimizer that accumulates)."""
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
            role = getattr(self.tls, "role", None)
            if role is not None:
                return self._apply_accumulating(role, grads, trainable_variables, deps)
            if deps and tf.inside_function():
                with tf.control_dependencies([tf.group(*deps)]):
                    return orig_apply(grads, trainable_variables)
            return orig_apply(grads, trainable_variables)

        self._orig_apply = orig_apply
        opt.apply = apply
        orig_lr = current_learning_rate_fn(opt)

        def current_learning_rate() -> Any:
            # With gradient_accumulation_steps = k, Keras evaluates a schedule at its raw
            # counter, which advances k times per update: evaluate it at the update count,
            # where it would be without accumulation. (Patched on the instance, so the
            # optimizer's config and saved models are unchanged.)
            k = opt.gradient_accumulation_steps or 1
            schedule = learning_rate_value(opt)
            if k > 1 and isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
                return schedule(optimizer_iterations(opt) // k)
            return orig_lr()

        set_current_learning_rate_fn(opt, current_learning_rate)
        self._patched_lr = True

    def uninstall(self) -> None:
        """Remove the patches (accumulation must be switched off before)."""
        opt = self.opt
        if self._orig_apply is not None and "apply" in vars(opt):
            del opt.apply
        if self._patched_lr:
            restore_current_learning_rate_fn(opt)

    def ensure_built(self) -> None:
        """Build the optimizer's variables (under the strategy's scope when there is one)."""
        if not self.opt.built:
            if self.distributed:
                with self.strategy.scope():
                    self.opt.build(self.model.trainable_variables)
            else:
                self.opt.build(self.model.trainable_variables)

    def updates(self) -> int:
        """Optimizer updates so far (``iterations`` counts micro-steps while accumulating)."""
        if not self.opt.built:
            return 0
        return int(optimizer_iterations(self.opt).numpy()) // self.accumulation

    # --- accumulation -------------------------------------------------------------------
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
        variables = list(variables if variables is not None
                         else optimizer_trainable_variables(self.opt))
        accs = [self._dist_accs[optimizer_variable_index(self.opt, v)]  # type: ignore[index]
                for v in variables]
        dense = [None if g is None else tf.convert_to_tensor(g) for g in grads]
        with tf.control_dependencies([tf.group(*deps)] if deps else []):
            if role == "accumulate":
                return tf.group(*[a.assign_add(g, read_value=False)
                                  for a, g in zip(accs, dense) if g is not None])
            k = float(self.tls.k)
            total = [None if g is None else (g + a.read_value()) / k
                     for a, g in zip(accs, dense)]
        ready = [t for t in total if t is not None]
        with tf.control_dependencies(ready):
            out = self._orig_apply(total, variables)
            for a in accs:
                a.assign(tf.zeros_like(a), read_value=False)
        return out

    def use_accumulation(self, k: int) -> None:
        """Switch the optimizer to ``k`` micro-steps per update, at a batch boundary."""
        if self.distributed:
            # batchfit's own accumulation (see _apply_accumulating): the optimizer is left
            # as it is, and its iteration counter counts updates.
            if k > 1 and self._dist_accs is None:
                self.ensure_built()
                with self.strategy.scope():
                    self._dist_accs = [
                        tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False,
                                    synchronization=tf.VariableSynchronization.ON_READ,
                                    aggregation=tf.VariableAggregation.NONE)
                        for v in optimizer_trainable_variables(self.opt)]
            return
        if k == self.accumulation:
            return
        opt = self.opt
        if k > 1:
            self.ensure_built()
            accs = accumulated_gradients(opt)
            if not accs or len(accs) != len(optimizer_trainable_variables(opt)):
                # As Optimizer.build makes them, but not tracked: they are zero at every batch
                # boundary (a batch's micro-steps end with the update), so nothing is lost by
                # leaving them out of checkpoints, and the optimizer keeps the variables a
                # checkpoint of the user's own optimizer has (Keras skips loading optimizer
                # state whose variable count differs).
                with keras.name_scope(opt.name, caller=opt):
                    accs = [keras.Variable(initializer="zeros", shape=v.shape, dtype=v.dtype,
                                           trainable=False, name="gradient_accumulator")
                            for v in optimizer_trainable_variables(opt)]
                set_accumulated_gradients(opt, accs)
            elif not self._accs_zeroed:
                # Left by an earlier fit that stopped inside a batch (an error, Ctrl-C)
                # holding that batch's partial sums.
                self.zero_accumulators()
            self._accs_zeroed = True
        iterations = optimizer_iterations(opt)
        updates = int(iterations.numpy()) // self.accumulation
        iterations.assign(updates * k)
        opt.gradient_accumulation_steps = k if k > 1 else None
        self.accumulation = k

    def zero_accumulators(self) -> None:
        """Zero the gradient accumulators (after a failed accumulating step)."""
        if self.distributed:
            for acc in self._dist_accs or []:
                for c in components(acc):
                    c.assign(tf.zeros_like(c))
            return
        for acc in accumulated_gradients(self.opt) or []:
            if acc is not None:
                assign_whole(acc, tf.zeros_like(acc))
