"""The model's own JAX training step, run on a copy of its state: what probes and timing run.

Keras's JAX trainer trains with ``jax.jit(model.train_step, donate_argnums=0)`` over the state
``(trainable, non_trainable, optimizer, metrics)``. :class:`StepRunner` jits the same
function, compiles it per batch shape explicitly (so compile time is measured apart from the
steps) and runs it on a *copy* of the model's state: the copy's buffers are the ones donated
and updated, and the model's own variables are never touched, so a probe or a timed window
leaves the model exactly as it was, with nothing to restore.

Example:

>>> import keras, numpy as np
>>> m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
>>> m.compile("adam", "mse")
>>> before = [np.array(v.value) for v in m.weights]
>>> runner = StepRunner(m, lambda b: (np.ones((b, 3), "float32"), np.ones((b, 1), "float32")))
>>> logs = runner.steps(4, 2)
>>> all(np.array_equal(a, np.array(v.value)) for a, v in zip(before, m.weights))
True
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .compiled import abstract, build_state, state_groups

BatchFn = Callable[[int], "tuple[Any, Any]"]


def block(tree: Any) -> Any:
    """Wait until every array of ``tree`` is computed (JAX dispatches asynchronously)."""
    import jax

    return jax.block_until_ready(tree)


class StepRunner:
    """Compiles and runs ``model.train_step`` per batch size on copies of the model's state.

    Args:
        model: a compiled Keras model (JAX backend).
        batch_fn: ``batch_fn(b) -> (x, y)``.
        distribution: a ``keras.distribution.DataParallel``: the state copies replicated over
            its devices, each batch (global) sharded along its batch axis, as Keras's own
            ``fit`` runs under it (default ``None``: one device).
    """

    def __init__(self, model: Any, batch_fn: BatchFn, distribution: Any = None) -> None:
        from .distribute import Placement

        self.model = model
        self.batch_fn = batch_fn
        self.place = Placement(distribution)
        x1, y1 = batch_fn(1)
        build_state(model, x1, y1)
        self.jitted = bool(getattr(model, "jit_compile", True)) and not model.run_eagerly
        self._compiled: dict[Any, Any] = {}
        #: Seconds each batch shape took to compile (JAX compiles one program per shape).
        self.compile_seconds: dict[int, float] = {}

    def fresh_state(self) -> tuple[Any, ...]:
        """A copy of the model's current state (new buffers: donating them is harmless)."""
        import jax.numpy as jnp

        return tuple(self.place.state([jnp.array(v.value, copy=True) for v in group])
                     for group in state_groups(self.model))

    def compiled(self, b: int, data: Any) -> Callable[..., Any]:
        """The step compiled for the shapes of ``data`` (compiled once per shape)."""
        import jax

        if not self.jitted:
            return self.model.train_step
        key = jax.tree_util.tree_structure(data), tuple(
            (tuple(a.shape), str(a.dtype)) for a in jax.tree_util.tree_leaves(data))
        if key not in self._compiled:
            state, args = tuple(abstract(g) for g in state_groups(self.model)), abstract(data)
            if self.place.replicas > 1:  # lowered with the arrays' own shardings
                state, args = self.fresh_state(), data
            t0 = time.perf_counter()
            self._compiled[key] = (jax.jit(self.model.train_step, donate_argnums=0)
                                   .lower(state, args).compile())
            self.compile_seconds[b] = time.perf_counter() - t0
        return self._compiled[key]  # type: ignore[no-any-return]

    def batch(self, b: int) -> Any:
        """``(x, y)`` of ``b`` examples as JAX arrays (on the default device, or sharded over
        the distribution's devices)."""
        import jax
        import jax.numpy as jnp

        x, y = self.batch_fn(b)
        if self.place.replicas > 1:
            return self.place.batch((x, y), b)
        return jax.tree_util.tree_map(jnp.asarray, (x, y))

    def steps(self, b: int, n: int, state: Any = None) -> Any:
        """Run ``n`` steps at ``b`` on a fresh copy of the state; returns the last logs."""
        data = self.batch(b)
        fn = self.compiled(b, data)
        state = self.fresh_state() if state is None else state
        logs = None
        for _ in range(n):
            logs, state = fn(state, data)
        return block(logs)
