"""The resilient fit on JAX: an out-of-memory step replayed as micro-batches, no state lost.

Keras's JAX trainer runs ``jax.jit(train_step, donate_argnums=0)``: the state's buffers are
given to the step. When the step fails while it runs (``RESOURCE_EXHAUSTED``), they are gone:
measured with Keras 3.15.1 / JAX 0.10.2, every weight of the model then reads "Array has been
deleted" (``tests/jax/test_jax_fit.py`` shows it). So this loop never donates: it keeps the
state (trainable, non-trainable, optimizer and metric variables) as arrays of its own,
computes each micro-batch's loss, gradient and metric updates with one jitted function
(``value_and_grad`` of the model's own ``compute_loss_and_updates``, then its metric update,
as Keras's ``train_step`` does) and applies the (accumulated) gradient with
``optimizer.stateless_apply``. A step that fails leaves the state exactly as it was, the
decisions are :class:`batchfit.core.fit_control.FitController`'s (shrink, plan, grow), and the
failed batch is replayed as micro-batches whose gradients, weighted by their sizes, sum to the
whole batch's: one optimizer update per batch, the effective batch kept. The cost of not
donating: the step's inputs and outputs hold the state twice (docs/jax.md).

Under a ``keras.distribution.DataParallel`` (given, or set globally) the state is replicated
over the mesh and each micro-batch is sharded along its batch axis (XLA sums the gradients
across devices): ``batch_size`` is global, each replica's share is split into the same number
of micro-batches (:meth:`FitController.plan_replicas`) and the policy reasons per replica, as
under TensorFlow's ``MirroredStrategy``. A micro-batch whose size the devices do not divide
runs replicated (every device the whole of it): same result, no parallelism.

Data (:mod:`.fit_data`): arrays with ``batch_size``, a ``keras.utils.PyDataset`` or a generator
of ``(x, y[, sample_weight])`` batches. History holds the loss and the compiled metrics (and
``val_*``: ``validation_data`` is evaluated at each epoch's end by the same loop, the model's
own ``compute_loss_and_updates`` in inference mode, shrinking its own micro-batch on
out-of-memory); callbacks see running metrics at each batch's end, and the current variables when they
read ``self.model`` (synced as Keras's JAX ``fit`` syncs them: :meth:`JaxFitLoop.offer`);
``model.stop_training`` (``EarlyStopping``) ends the fit.
"""

from __future__ import annotations

import time
from itertools import pairwise
from typing import Any

import numpy as np

from ...core.fit_control import split_counts
from ...errors import InvalidInputError
from ..oom import is_oom_error
from .compiled import build_state, state_groups
from .distribute import Placement
from .fit_data import batch_size_of, batch_source, check_inputs, take, validation_source
from .probe import failure_line

SUPPORTED_KWARGS = ("epochs", "shuffle", "verbose", "callbacks", "initial_epoch",
                    "validation_data", "validation_batch_size", "validation_steps",
                    "steps_per_epoch", "sample_weight")
GROUPS = ("tv", "ntv", "ov", "mv")


def check_fit_model(model: Any) -> None:
    """Refuse what this loop cannot train: no optimizer, or one that accumulates itself."""
    from ..keras_common import check_model

    check_model(model)
    opt = getattr(model, "optimizer", None)
    if opt is None:
        raise InvalidInputError("batchfit.fit needs a compiled model (model.compile(...)).")
    if getattr(opt, "gradient_accumulation_steps", None):
        raise InvalidInputError(
            "the optimizer already uses gradient_accumulation_steps; batchfit.fit accumulates "
            "micro-batches itself: compile without it")
    if opt.__class__.__name__ == "LossScaleOptimizer":
        raise InvalidInputError("batchfit.fit on JAX does not support LossScaleOptimizer yet")


def fit_inputs(x: Any, batch_size: int | None) -> tuple[Any, int | None]:
    """Arrays (or dicts/lists of arrays) with a ``batch_size``, or a dataset's own batches."""
    check_inputs(x, batch_size)
    return x, batch_size


class _Steps:
    """The jitted step (loss, gradients, metric updates) and update of one model (no buffer
    donated)."""

    def __init__(self, model: Any) -> None:
        import jax

        grad_fn = jax.value_and_grad(model.compute_loss_and_updates, has_aux=True)

        def step(tv: Any, ntv: Any, mv: Any, ov: Any, x: Any, y: Any, sw: Any) -> Any:
            (_, (loss, y_pred, ntv, mv)), grads = grad_fn(tv, ntv, mv, x, y, sw, training=True,
                                                          optimizer_variables=ov)
            _, mv = model._update_metrics_variables(mv, loss, x, y, y_pred, sw)
            return loss, grads, ntv, mv

        def evaluate(tv: Any, ntv: Any, mv: Any, x: Any, y: Any, sw: Any) -> Any:
            _, (loss, y_pred, _, mv) = model.compute_loss_and_updates(tv, ntv, mv, x, y, sw,
                                                                    training=False)
            _, mv = model._update_metrics_variables(mv, loss, x, y, y_pred, sw)
            return mv

        self.step = jax.jit(step)
        self.evaluate = jax.jit(evaluate)
        self.apply = jax.jit(lambda ov, grads, tv: model.optimizer.stateless_apply(ov, grads,
                                                                                   tv))


class JaxFitLoop:
    """One ``batchfit.fit`` run on JAX (see the module's docstring)."""

    def __init__(self, model: Any, *, control: Any, distribution: Any = None) -> None:
        self.model, self.control = model, control
        self.place = Placement(distribution)
        self.distributed = distribution is not None
        self.state: dict[str, list[Any]] = {}
        self.updates = 0
        self.steps: _Steps | None = None
        self._shardings: list[list[Any]] = []

    def start(self, x: Any, y: Any) -> None:
        """Build the model (from one example of the first batch) and copy its state."""
        import jax.numpy as jnp

        one = np.arange(1)
        build_state(self.model, take(x, one), take(y, one))
        self.steps = _Steps(self.model)
        groups = state_groups(self.model)
        self._shardings = [[v.value.sharding for v in g] for g in groups]
        self.state = {k: self.place.state([jnp.array(v.value, copy=True) for v in g])
                      for k, g in zip(GROUPS, groups)}

    def reset_metrics(self) -> None:
        """An epoch starts: the metrics count from their initial values again."""
        if self.state:
            self.state["mv"] = self._fresh_metrics()

    def _fresh_metrics(self) -> list[Any]:
        import jax.numpy as jnp

        self.model.reset_metrics()
        return self.place.state([jnp.array(v.value, copy=True)
                                 for v in self.model.metrics_variables])

    def plan(self, n: int, phase: str = "train") -> tuple[list[np.ndarray], int]:
        """The batch's examples as micro-batches (index arrays), and the (per-replica) size
        that must fit. Under replicas, micro-batch ``i`` holds part ``i`` of every share."""
        if not self.distributed:
            plan = self.control.plan(phase, n)
            bounds = np.cumsum((0, *plan.sizes))
            return [np.arange(a, b) for a, b in pairwise(bounds)], max(plan.sizes)
        shares = split_counts(n, self.place.replicas)
        rp = self.control.plan_replicas(phase, shares)
        offsets = np.cumsum((0, *shares))[:-1]
        parts = []
        for i in range(rp.steps):
            parts.append(np.concatenate([
                np.arange(o + sum(p[:i]), o + sum(p[:i + 1]))
                for o, p in zip(offsets, rp.pieces)]))
        return [p for p in parts if len(p)], rp.micro

    def batch(self, x: Any, y: Any, sw: Any = None) -> dict[str, float]:
        """Train on one batch, replanned after each out-of-memory; the running metrics."""
        if not self.state:
            self.start(x, y)
        n = batch_size_of(x)
        self.control.see_batch("train", n)
        while True:
            parts, micro = self.plan(n)
            t0 = time.perf_counter()
            try:
                self._run(x, y, sw, parts)
            except Exception as exc:
                if not is_oom_error(exc):
                    raise
                self.control.failed("train", micro)
                self.control.shrink("train", micro, n, failure_line(exc),
                                    time.perf_counter() - t0, optimizer_step=self.updates,
                                    fixed_bytes=self._state_bytes)
                continue
            if self.control.measuring("train"):
                self.control.measured("train", micro, None)
            self.control.advance("train")
            return self.logs()

    def _run(self, x: Any, y: Any, sw: Any, parts: list[np.ndarray]) -> None:
        """The micro-batches ``parts``; the state changes only when all of them ran."""
        import jax

        s, n = self.state, sum(len(p) for p in parts)
        accumulate = self.control.accumulates("train", len(parts))
        tv, ntv, ov, mv = s["tv"], s["ntv"], s["ov"], s["mv"]
        total = None
        for part in parts:
            size = len(part)
            xb, yb, swb = (self.place.batch(take(d, part), size) for d in (x, y, sw))
            _, grads, ntv, mv = self.steps.step(tv, ntv, mv, ov, xb, yb, swb)
            if accumulate:
                scaled = jax.tree_util.tree_map(lambda g, w=size / n: g * w, grads)
                total = scaled if total is None else jax.tree_util.tree_map(
                    lambda a, b: a + b, total, scaled)
            else:
                tv, ov = self.steps.apply(ov, grads, tv)
                jax.block_until_ready(tv)
        if accumulate:
            tv, ov = self.steps.apply(ov, total, tv)
        jax.block_until_ready((tv, ov, ntv, mv))  # an error of the step surfaces here
        s["tv"], s["ntv"], s["ov"], s["mv"] = tv, ntv, ov, mv
        self.updates += 1 if accumulate else len(parts)

    def evaluate(self, batches: Any) -> dict[str, float]:
        """The metrics over ``batches`` at the current weights (``val_`` names), each batch
        replayed as smaller micro-batches after an out-of-memory (the evaluation's own)."""
        self.control.eval_begin()
        mv = self._fresh_metrics()
        for x, y, sw in batches:
            mv = self._eval_batch(x, y, sw, mv)
        return {f"val_{k}": v for k, v in self.logs(mv).items()}

    def _eval_batch(self, x: Any, y: Any, sw: Any, mv: list[Any]) -> list[Any]:
        import jax

        n = batch_size_of(x)
        self.control.see_batch("eval", n)
        while True:
            parts, micro = self.plan(n, "eval")
            t0 = time.perf_counter()
            try:
                new = mv
                for part in parts:
                    xb, yb, swb = (self.place.batch(take(d, part), len(part)) for d in (x, y, sw))
                    new = self.steps.evaluate(self.state["tv"], self.state["ntv"], new, xb, yb,
                                              swb)
                jax.block_until_ready(new)
            except Exception as exc:
                if not is_oom_error(exc):
                    raise
                self.control.failed("eval", micro)
                self.control.shrink("eval", micro, n, failure_line(exc),
                                    time.perf_counter() - t0, optimizer_step=self.updates,
                                    fixed_bytes=self._state_bytes)
                continue
            if self.control.measuring("eval"):
                self.control.measured("eval", micro, None)
            self.control.advance("eval")
            return new  # type: ignore[no-any-return]

    def logs(self, mv: list[Any] | None = None) -> dict[str, float]:
        """The metrics (loss included) of ``mv`` (default: so far this epoch)."""
        import keras

        mapping = list(zip(self.model.metrics_variables,
                           self.state["mv"] if mv is None else mv))
        with keras.StatelessScope(state_mapping=mapping):
            results = self.model.get_metrics_result()
        return {k: float(v) for k, v in results.items()}

    def offer(self) -> None:
        """Offer the state to callbacks as Keras's JAX ``fit`` does: a callback reading
        ``self.model`` syncs it into the variables (``model.jax_state_sync``, Keras 3.15's
        ``_jax_state`` / ``_jax_state_synced``; private). The variables then share the loop's
        arrays, which it never donates; :meth:`sync` copies before any Keras step runs."""
        s = self.state
        self.model._jax_state = {"trainable_variables": s["tv"],
                                 "non_trainable_variables": s["ntv"],
                                 "optimizer_variables": s["ov"], "metrics_variables": s["mv"]}
        self.model._jax_state_synced = False

    def sync(self) -> None:
        """Write the loop's state into the model's variables (fresh copies, placed as the
        model's own were: the model's own steps may donate them)."""
        import jax
        import jax.numpy as jnp

        self.model._jax_state, self.model._jax_state_synced = None, True
        if not self.state:
            return
        for group, key, shardings in zip(state_groups(self.model), GROUPS, self._shardings):
            for variable, value, sharding in zip(group, self.state[key], shardings):
                variable.assign(jax.device_put(jnp.array(value, copy=True), sharding))

    def _state_bytes(self) -> float:
        import jax

        return float(sum(a.nbytes for a in jax.tree_util.tree_leaves(self.state)))


def run_fit(model: Any, x: Any, y: Any, *, control: Any, strategy: Any,
            fit_batch: int | None, logger: Any, fit_kwargs: dict[str, Any]
            ) -> tuple[Any, int]:
    """``batchfit.fit``'s loop on JAX; returns ``(history, 0)``."""
    import keras

    unknown = sorted(set(fit_kwargs) - set(SUPPORTED_KWARGS))
    if unknown:
        raise InvalidInputError(
            f"batchfit.fit on JAX does not support {', '.join(unknown)} yet (it takes "
            f"{', '.join(SUPPORTED_KWARGS)}); use KERAS_BACKEND=tensorflow for the others")
    source = batch_source(x, y, fit_batch, fit_kwargs)
    validation = validation_source(fit_kwargs, fit_batch)
    loop = JaxFitLoop(model, control=control, distribution=strategy)
    epochs = int(fit_kwargs.get("epochs", 1))
    callbacks = keras.callbacks.CallbackList(
        fit_kwargs.get("callbacks"), add_history=True, add_progbar=False, model=model,
        epochs=epochs, steps=source.steps, verbose=0)
    rng = np.random.default_rng(0)
    model.stop_training = False
    callbacks.on_train_begin()
    for epoch in range(int(fit_kwargs.get("initial_epoch", 0)), epochs):
        control.epoch_begin(epoch)
        callbacks.on_epoch_begin(epoch)
        loop.reset_metrics()
        logs: dict[str, float] = {}
        for step, (xb, yb, swb) in enumerate(source.epoch(rng)):
            callbacks.on_train_batch_begin(step)
            logs = loop.batch(xb, yb, swb)
            loop.offer()
            callbacks.on_train_batch_end(step, logs)
        if not logs:
            raise InvalidInputError(f"the training data gave no batch in epoch {epoch} (a "
                                    f"generator that ran out: pass steps_per_epoch=)")
        if validation is not None:
            logs = {**logs, **loop.evaluate(validation.epoch(rng))}
        loop.sync()
        control.epoch_end(optimizer_step=lambda: loop.updates)
        callbacks.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    callbacks.on_train_end()
    return model.history, 0
