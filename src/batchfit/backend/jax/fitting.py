"""The resilient fit on JAX: an out-of-memory step replayed as micro-batches, no state lost.

Keras's JAX trainer runs ``jax.jit(train_step, donate_argnums=0)``: the state's buffers are
given to the step. When the step fails while it runs (``RESOURCE_EXHAUSTED``), they are gone:
measured with Keras 3.15.1 / JAX 0.10.2, every weight of the model then reads "Array has been
deleted" (``tests/jax/test_jax_fit.py`` shows it). So this loop never donates: it keeps the
state (trainable, non-trainable, optimizer and metric variables) as arrays of its own,
computes each micro-batch's gradient with a jitted ``value_and_grad`` of the model's loss
(``stateless_call`` + ``stateless_compute_loss``, training mode) and applies the (accumulated)
gradient with ``optimizer.stateless_apply``. A step that fails leaves the state exactly as it
was, the decisions are :class:`batchfit.core.fit_control.FitController`'s (shrink, plan, grow),
and the failed batch is replayed as micro-batches whose gradients, weighted by their sizes,
sum to the whole batch's: one optimizer update per batch, the effective batch kept. The cost
of not donating: the step's inputs and outputs hold the state twice (docs/jax.md).

Scope on JAX (each refused with a clear error otherwise): arrays (or dicts/lists of arrays)
with ``batch_size``; ``epochs``, ``shuffle``, ``verbose``, ``callbacks``, ``initial_epoch``,
``validation_data`` (evaluated by ``model.evaluate`` at each epoch's end, without
shrinking); one device. History holds ``loss`` (and ``val_*``); compiled metrics other than
the loss are not computed by this loop; callbacks see the model's variables synced at each
epoch's end.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ...errors import InvalidInputError
from ..oom import is_oom_error
from .compiled import build_state, state_groups
from .probe import failure_line

SUPPORTED_KWARGS = ("epochs", "shuffle", "verbose", "callbacks", "initial_epoch",
                    "validation_data")


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
    """Arrays (or dicts/lists of arrays) with a ``batch_size``: what this loop slices."""
    import jax

    leaves = jax.tree_util.tree_leaves(x)
    if not leaves or not all(hasattr(a, "shape") and len(a.shape) >= 1 for a in leaves):
        raise InvalidInputError(
            f"batchfit.fit on JAX takes NumPy arrays (or a dict or list of them) for x, got "
            f"{type(x).__name__}; a tf.data.Dataset or a generator is not supported on JAX yet")
    if batch_size is None:
        raise InvalidInputError("batchfit.fit on JAX needs batch_size= with array data")
    return x, batch_size


class _Steps:
    """The jitted gradient and update functions of one model (no buffer donated)."""

    def __init__(self, model: Any) -> None:
        import jax

        kwargs = {"training": True} if model._call_has_training_arg else {}

        def loss(tv: Any, ntv: Any, mv: Any, x: Any, y: Any) -> Any:
            y_pred, ntv2, losses = model.stateless_call(tv, ntv, x, return_losses=True,
                                                        **kwargs)
            if losses:
                model._losses_override.clear()
                model._losses_override = losses
            value, _ = model.stateless_compute_loss(tv, ntv2, mv, x=x, y=y, y_pred=y_pred,
                                                    sample_weight=None, training=True)
            if losses:
                model._losses_override.clear()
            return value, ntv2

        self.grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
        self.apply = jax.jit(lambda ov, grads, tv: model.optimizer.stateless_apply(ov, grads,
                                                                                   tv))


class JaxFitLoop:
    """One ``batchfit.fit`` run on JAX (see the module's docstring)."""

    def __init__(self, model: Any, x: Any, y: Any, *, control: Any, batch_size: int,
                 logger: Any) -> None:
        import jax

        self.model, self.x, self.y = model, x, y
        self.control, self.batch_size, self.logger = control, int(batch_size), logger
        self.n = int(jax.tree_util.tree_leaves(x)[0].shape[0])
        build_state(model, _take(x, np.arange(1)), _take(y, np.arange(1)))
        self.steps = _Steps(model)
        tv, ntv, ov, mv = state_groups(model)
        self.state = {"tv": _copy(tv), "ntv": _copy(ntv), "ov": _copy(ov), "mv": _copy(mv)}
        self.updates = 0

    def batch(self, idx: np.ndarray) -> float:
        """Train on the examples ``idx`` (one batch): replanned after each out-of-memory."""
        n = len(idx)
        self.control.see_batch("train", n)
        while True:
            plan = self.control.plan("train", n)
            t0 = time.perf_counter()
            try:
                loss = self._run(idx, plan.sizes)
            except Exception as exc:
                if not is_oom_error(exc):
                    raise
                failed = max(plan.sizes)
                self.control.failed("train", failed)
                self.control.shrink("train", failed, n, failure_line(exc),
                                    time.perf_counter() - t0, optimizer_step=self.updates,
                                    fixed_bytes=self._state_bytes)
                continue
            if self.control.measuring("train"):
                self.control.measured("train", max(plan.sizes), None)
            self.control.advance("train")
            return loss

    def _run(self, idx: np.ndarray, sizes: tuple[int, ...]) -> float:
        """The micro-batches of ``sizes``; the state changes only when all of them ran."""
        import jax

        s = self.state
        accumulate = self.control.accumulates("train", len(sizes))
        tv, ntv, ov = s["tv"], s["ntv"], s["ov"]
        total, loss_sum, start = None, 0.0, 0
        for size in sizes:
            part = idx[start:start + size]
            start += size
            (loss, ntv), grads = self.steps.grad(tv, ntv, s["mv"], _take(self.x, part),
                                                 _take(self.y, part))
            loss_sum += float(loss) * size
            if accumulate:
                w = size / len(idx)
                scaled = jax.tree_util.tree_map(lambda g, w=w: g * w, grads)
                total = scaled if total is None else jax.tree_util.tree_map(
                    lambda a, b: a + b, total, scaled)
            else:
                tv, ov = self.steps.apply(ov, grads, tv)
                jax.block_until_ready(tv)
        if accumulate:
            tv, ov = self.steps.apply(ov, total, tv)
        jax.block_until_ready((tv, ov, ntv))  # an error of the step surfaces here, not later
        s["tv"], s["ntv"], s["ov"] = tv, ntv, ov
        self.updates += 1 if accumulate else len(sizes)
        return loss_sum / len(idx)

    def sync(self) -> None:
        """Write the loop's state into the model's variables (fresh copies: the model's
        own steps may donate them)."""
        import jax.numpy as jnp

        tv, ntv, ov, mv = state_groups(self.model)
        for group, values in ((tv, self.state["tv"]), (ntv, self.state["ntv"]),
                              (ov, self.state["ov"]), (mv, self.state["mv"])):
            for variable, value in zip(group, values):
                # a copy: assign keeps the array itself, and a donating step would delete it
                variable.assign(jnp.array(value, copy=True))

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
    if y is None:
        raise InvalidInputError("batchfit.fit on JAX needs y (targets) with array x")
    loop = JaxFitLoop(model, x, y, control=control, batch_size=int(fit_batch or 0),
                      logger=logger)
    epochs = int(fit_kwargs.get("epochs", 1))
    first = int(fit_kwargs.get("initial_epoch", 0))
    shuffle = bool(fit_kwargs.get("shuffle", True))
    callbacks = keras.callbacks.CallbackList(
        fit_kwargs.get("callbacks"), add_history=True, add_progbar=False, model=model,
        epochs=epochs, steps=-(-loop.n // loop.batch_size), verbose=0)
    rng = np.random.default_rng(0)
    callbacks.on_train_begin()
    for epoch in range(first, epochs):
        control.epoch_begin(epoch)
        callbacks.on_epoch_begin(epoch)
        order = rng.permutation(loop.n) if shuffle else np.arange(loop.n)
        losses, counts = [], []
        for step, start in enumerate(range(0, loop.n, loop.batch_size)):
            idx = order[start:start + loop.batch_size]
            callbacks.on_train_batch_begin(step)
            losses.append(loop.batch(idx))
            counts.append(len(idx))
            callbacks.on_train_batch_end(step, {"loss": losses[-1]})
        loop.sync()
        logs = {"loss": float(np.average(losses, weights=counts))}
        validation = fit_kwargs.get("validation_data")
        if validation is not None:
            xv, yv = validation[0], validation[1]
            val = model.evaluate(xv, yv, batch_size=loop.batch_size, verbose=0,
                                 return_dict=True)
            loop.sync()  # evaluate's own step may have donated the variables' buffers
            logs.update({f"val_{k}": float(v) for k, v in val.items()})
        control.epoch_end(optimizer_step=lambda: loop.updates)
        callbacks.on_epoch_end(epoch, logs)
    callbacks.on_train_end()
    return model.history, 0


def _copy(variables: Any) -> list[Any]:
    import jax.numpy as jnp

    return [jnp.array(v.value, copy=True) for v in variables]


def _take(data: Any, idx: np.ndarray) -> Any:
    import jax

    return jax.tree_util.tree_map(lambda a: np.asarray(a)[idx], data)
