"""``batchfit check``'s operations on one layer, on JAX.

The Keras-generic operations (calls at a batch size, the build with a ``None`` batch, the
wrapper model and its ``fit``) are the TensorFlow probe's, which only calls Keras there; what
is framework-specific is JAX's here:

- *traces*: a run of the layer's ``call`` on JAX tracers. ``jax.jit`` traces (and XLA
  compiles) one program per input shape, so on JAX every new batch size is a new trace by
  design, and ``fit`` on a dataset whose size the batch does not divide compiles a second
  program for the partial last batch: :attr:`JaxLayerProbe.fit_traces` records it and the
  check reports it (``partial_batch``'s details) instead of TensorFlow's retracing warning;
- the traced run is ``jax.jit`` of the layer's stateless call;
- sample mixing is the gradient of output sample 0 with respect to the other samples
  (``jax.grad`` through ``stateless_call``);
- ``export`` (SavedModel) and TensorFlow's ``retracing`` are not applicable: the check
  reports them so.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from ..keras_common import LayerProbe, drop_new_nodes, node_counts

_REL_TOL = 1e-5


def _is_tracer(value: Any) -> bool:
    import jax

    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(value))


class JaxLayerProbe(LayerProbe):
    """One layer and its input: the operations the layer checks run, on JAX."""

    def __init__(self, layer: Any, spec: Any) -> None:
        super().__init__(layer, spec)
        self.traces = 0
        #: Traces of the layer's call during the last :meth:`fit` (one per batch shape).
        self.fit_traces: int | None = None

    @contextlib.contextmanager
    def keep_state(self) -> Iterator[None]:
        """Warnings off, traces counted, and afterwards the layer's variables and nodes
        restored (as on TensorFlow)."""
        counts = node_counts(self.layer)
        if getattr(self.layer, "built", False):
            self._weights = _variable_values(self.layer)
        orig = self.layer.call

        def counting(*args: Any, **kwargs: Any) -> Any:
            if _is_tracer((args, kwargs)):
                self.traces += 1
            return orig(*args, **kwargs)

        object.__setattr__(self.layer, "call", counting)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
        finally:
            object.__delattr__(self.layer, "call")
            if self._weights is not None:
                for variable, value in self._weights:
                    variable.assign(value)
            drop_new_nodes(self.layer, counts)

    def remember_weights(self) -> None:
        if self._weights is None:
            self._weights = _variable_values(self.layer)

    def trace_snapshot(self) -> Any:
        return self.traces

    def traces_since(self, snapshot: Any) -> tuple[int, dict[str, int]]:
        """``(traces of call on JAX tracers since snapshot, {})``."""
        return self.traces - int(snapshot), {}

    def traced(self) -> Callable[[int, int], Any]:
        """``run(b, seed)`` under ``jax.jit`` of the layer's stateless call (a new function:
        one trace per batch shape)."""
        import jax

        layer = self.layer
        values = ([v.value for v in layer.trainable_variables],
                  [v.value for v in layer.non_trainable_variables])

        def fn(tv: Any, ntv: Any, x: Any) -> Any:
            out, _ = layer.stateless_call(tv, ntv, x, **{**self.spec.kwargs, "training": False}) \
                if _accepts_training(layer) else \
                layer.stateless_call(tv, ntv, x, **self.spec.kwargs)
            return out

        jitted = jax.jit(fn)
        return lambda b, seed: jitted(*values, self.spec.batch(b, seed=seed))

    def fit(self, wrapper: Any, targets: Sequence[tuple[int, ...]], b: int, n: int) -> None:
        """``fit`` as on TensorFlow, recording the layer's traces (one per batch shape)."""
        before = self.traces
        try:
            super().fit(wrapper, targets, b, n)
        finally:
            self.fit_traces = (self.fit_traces or 0) + self.traces - before

    def is_out_of_memory(self, exc: BaseException) -> bool:
        """Whether ``exc`` is XLA's ``RESOURCE_EXHAUSTED``."""
        from ..oom import is_oom_error

        return is_oom_error(exc)

    def is_refusal_error(self, exc: BaseException | None) -> bool:
        """Whether ``exc`` is a ``ValueError`` (or JAX's shape ``TypeError``)."""
        return isinstance(exc, (ValueError, TypeError))

    def mixing(self, b: int, training: bool) -> float | None:
        """Relative dependence of output sample 0 on samples 1.. (gradient; in inference,
        when it shows none, also by swapping the other samples)."""
        import jax
        import jax.numpy as jnp
        import keras

        layer = self.layer
        x = self.spec.batch(b, seed=300)
        leaves = [jnp.asarray(a) for a in keras.tree.flatten(x)]
        floating = [i for i, a in enumerate(leaves) if jnp.issubdtype(a.dtype, jnp.floating)]
        tv = [v.value for v in layer.trainable_variables]
        ntv = [v.value for v in layer.non_trainable_variables]
        kwargs = dict(self.spec.kwargs)
        if _accepts_training(layer):
            kwargs["training"] = training

        def target(floats: list[Any]) -> Any:
            full = list(leaves)
            for i, f in zip(floating, floats):
                full[i] = f
            packed = keras.tree.pack_sequence_as(self.spec.template, full)
            out, _ = layer.stateless_call(tv, ntv, packed, **kwargs)
            return sum(jnp.sum(o[0].astype("float32")) for o in keras.tree.flatten(out))

        by_gradient = None
        try:
            if floating:
                grads = jax.grad(target)([leaves[i] for i in floating])
                own = max(float(jnp.max(jnp.abs(g[0]))) for g in grads)
                other = max(float(jnp.max(jnp.abs(g[1:]))) for g in grads)
                by_gradient = 0.0 if other <= 1e-12 else other / max(own, 1e-12)
            if training or (by_gradient or 0.0) > _REL_TOL:
                return by_gradient
            packed = keras.tree.pack_sequence_as(self.spec.template, leaves)
            return max(self._forward_mixing(x, packed, leaves), by_gradient or 0.0)
        except Exception:  # noqa: BLE001 - not measurable; other checks report failures
            return by_gradient

    def export_problem(self, wrapper: Any, sizes: Sequence[int]) -> tuple[str, str] | None:
        """Not applicable on JAX (SavedModel export is TensorFlow's): never a problem."""
        return None


def _accepts_training(layer: Any) -> bool:
    import inspect

    try:
        return "training" in inspect.signature(type(layer).call).parameters
    except (TypeError, ValueError):
        return False


def _variable_values(layer: Any) -> list[tuple[Any, np.ndarray]]:
    return [(v, np.array(v.value, copy=True)) for v in layer.variables]
