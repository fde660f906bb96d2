"""The TensorFlow side of ``batchfit check``: one layer, called, traced, fitted and exported.

:class:`LayerProbe` holds one layer and its :class:`~.check_targets.LayerInput` and does every
operation the checks of :mod:`batchfit.verbs.check` need: calls at a batch size, the build with
a ``None`` batch, a run under ``tf.function``, trace counts, the sample-mixing measurement, a
``fit`` on a partial last batch and the SavedModel export (a TensorFlow-only check, whose
findings' wording is this module's). The checks decide what is a finding; this module only
runs and measures. The layer's variables and graph nodes are restored by :meth:`keep_state`.

Example:

>>> import keras
>>> from batchfit.backend.tensorflow.check_targets import LayerInput
>>> probe = LayerProbe(keras.layers.Dense(4), LayerInput(0, [(8,)], ["float32"]))
>>> probe.output_batch_sizes(probe.run(3, seed=0))
[3]
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ...results.check import error_line
from .check_targets import LayerInput, is_custom_layer_class
from .keras_compat import drop_new_nodes, node_counts, sublayers

__all__ = ["LayerProbe", "quiet_retracing_warnings"]

_REL_TOL = 1e-5  # gradient test: float noise alone reaches ~4e-7 (relative)
#: How a symbolic output without a batch dimension is reported by :meth:`LayerProbe.build`.
ABSENT = "absent"


@contextlib.contextmanager
def quiet_retracing_warnings() -> Iterator[None]:
    """TensorFlow's logger at ERROR: the checks retrace on purpose; its warning is noise."""
    import tensorflow as tf

    tf_logger = tf.get_logger()
    level = tf_logger.level
    tf_logger.setLevel("ERROR")
    try:
        yield
    finally:
        tf_logger.setLevel(level)


class _TraceCounter:
    """Counts traces of a layer: graph-mode runs of its ``call`` and of its own tf.functions."""

    def __init__(self, layer: Any) -> None:
        import tensorflow as tf

        self.layer = layer
        self.graph_calls = 0
        self.functions: list[tuple[str, Any]] = []
        poly = tf.types.experimental.PolymorphicFunction
        module = sys.modules.get(type(layer).__module__)
        for name, value in sorted(vars(module).items()) if module else []:
            if isinstance(value, poly):
                self.functions.append((name, value))
        for klass in type(layer).__mro__:
            if not is_custom_layer_class(klass):
                continue
            for name, value in vars(klass).items():
                if isinstance(value, poly):
                    self.functions.append((f"{klass.__name__}.{name}",
                                           value.__get__(layer, type(layer))))
        for name, value in sorted(vars(layer).items()):  # self._fn = tf.function(...)
            if isinstance(value, poly):
                self.functions.append((f"self.{name}", value))

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        import tensorflow as tf

        orig = self.layer.call

        def counting(*args: Any, **kwargs: Any) -> Any:
            if not tf.executing_eagerly():
                self.graph_calls += 1
            return orig(*args, **kwargs)

        object.__setattr__(self.layer, "call", counting)
        try:
            yield
        finally:
            object.__delattr__(self.layer, "call")

    def function_counts(self) -> dict[str, int]:
        out = {}
        for name, fn in self.functions:
            count = getattr(fn, "experimental_get_tracing_count", None)
            if callable(count):
                out[name] = int(count())
        return out

    def snapshot(self) -> tuple[int, dict[str, int]]:
        return self.graph_calls, self.function_counts()

    def since(self, snap: tuple[int, dict[str, int]]) -> tuple[int, dict[str, int]]:
        calls, counts = snap
        now = self.function_counts()
        deltas = {k: now[k] - counts.get(k, 0) for k in now if now[k] - counts.get(k, 0) > 0}
        return max([self.graph_calls - calls, *deltas.values()]), deltas


class LayerProbe:
    """One layer and its input: the operations the layer checks run, on TensorFlow.

    Args:
        layer: a ``keras.layers.Layer``.
        spec: the input it is checked with.
    """

    def __init__(self, layer: Any, spec: LayerInput) -> None:
        self.layer = layer
        self.spec = spec
        self._counter: _TraceCounter | None = None
        self._weights: list[tuple[Any, np.ndarray]] | None = None

    # -- state -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def keep_state(self) -> Iterator[None]:
        """Run the checks inside: warnings off, traces counted, and afterwards the layer's
        variables (if built before, or by :meth:`remember_weights`) and nodes restored."""
        counts = node_counts(self.layer)
        if getattr(self.layer, "built", False):
            self._weights = _variable_values(self.layer)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._counter = _TraceCounter(self.layer)
                with self._counter.counting():
                    yield
        finally:
            if self._weights is not None:
                for variable, value in self._weights:
                    variable.assign(value)
            drop_new_nodes(self.layer, counts)

    def remember_weights(self) -> None:
        """Once the first calls built the layer: the values to restore, unless built before."""
        if self._weights is None:
            self._weights = _variable_values(self.layer)

    def trace_snapshot(self) -> Any:
        """Trace counts now, for :meth:`traces_since`."""
        return self._counting().snapshot()

    def traces_since(self, snapshot: Any) -> tuple[int, dict[str, int]]:
        """``(traces, {tf.function name: traces})`` since ``snapshot``: the most any one
        function (or the layer's ``call`` in graph mode) was traced."""
        return self._counting().since(snapshot)

    def _counting(self) -> _TraceCounter:
        if self._counter is None:
            raise RuntimeError("LayerProbe: trace counts are read inside keep_state()")
        return self._counter

    # -- calls -------------------------------------------------------------------------------
    def call(self, x: Any, **kwargs: Any) -> Any:
        """The layer on ``x``, with the keyword arguments it gets in the model."""
        return self.layer(x, **{**self.spec.kwargs, **kwargs})

    def run(self, b: int, seed: int, training: bool = False) -> Any:
        """The layer on a random batch of ``b`` examples (seeded)."""
        return self.call(self.spec.batch(b, seed=seed), training=training)

    def build(self) -> list[int | str | None]:
        """Call the layer on ``keras.Input`` (a ``None`` batch): each output's batch dimension
        (``None`` kept; :data:`ABSENT` for an output without dimensions). Raises what it raises."""
        import keras

        out = self.call(self.spec.symbolic())
        return [(t.shape[0] if t.shape else ABSENT) for t in keras.tree.flatten(out)]

    def output_batch_sizes(self, out: Any) -> list[int | None]:
        """The batch dimension of each output of an eager call (``None`` for a scalar)."""
        import keras

        return [int(t.shape[0]) if t.shape else None for t in keras.tree.flatten(out)]

    def traced(self) -> Any:
        """``run(b, seed)`` under ``tf.function(reduce_retracing=True)`` (a new function)."""
        import tensorflow as tf

        fn = tf.function(lambda x: self.call(x, training=False), reduce_retracing=True)
        return lambda b, seed: fn(self.spec.batch(b, seed=seed))

    def is_out_of_memory(self, exc: BaseException) -> bool:
        """Whether ``exc`` is TensorFlow's ``ResourceExhaustedError``."""
        import tensorflow as tf

        return isinstance(exc, tf.errors.ResourceExhaustedError)

    def is_refusal_error(self, exc: BaseException | None) -> bool:
        """Whether ``exc`` is a ValueError or TensorFlow's ``InvalidArgumentError``."""
        import tensorflow as tf

        return isinstance(exc, (ValueError, tf.errors.InvalidArgumentError))

    # -- sample mixing -----------------------------------------------------------------------
    def has_batchnorm(self) -> bool:
        """Whether the layer is, or holds, a ``BatchNormalization``."""
        import keras

        bn = keras.layers.BatchNormalization
        layers = sublayers(self.layer, include_self=True) or [self.layer]
        return any(isinstance(sub, bn) for sub in layers)

    def mixing(self, b: int, training: bool) -> float | None:
        """Relative dependence of output sample 0 on samples 1.. of a batch of ``b``.

        The gradient of ``sum(out[0])`` with respect to the other samples; in inference, when
        that shows none, also sample 0's output with the other samples swapped for new ones.
        None if not measurable.
        """
        import keras
        import tensorflow as tf

        x = self.spec.batch(b, seed=300)
        leaves = [tf.constant(a) for a in keras.tree.flatten(x)]
        floats = [t for t in leaves if t.dtype.is_floating]
        packed = keras.tree.pack_sequence_as(self.spec.template, leaves)
        by_gradient = None
        try:
            if floats:
                with tf.GradientTape() as tape:
                    for t in floats:
                        tape.watch(t)
                    out = self.call(packed, training=training)
                    target = tf.add_n([tf.reduce_sum(tf.cast(o[0], tf.float32))
                                       for o in keras.tree.flatten(out)
                                       if o.dtype.is_floating or o.dtype.is_integer])
                grads = [g for g in tape.gradient(target, floats) if g is not None]
                if grads:
                    own = max(float(tf.reduce_max(tf.abs(g[0]))) for g in grads)
                    other = max(float(tf.reduce_max(tf.abs(g[1:]))) for g in grads)
                    by_gradient = 0.0 if other <= 1e-12 else other / max(own, 1e-12)
            if training or (by_gradient or 0.0) > _REL_TOL:
                return by_gradient  # forward comparison is noisy in training (dropout)
            # No gradient path is no proof (stop_gradient, rounding): also swap the other
            # samples and compare output sample 0.
            return max(self._forward_mixing(x, packed, leaves), by_gradient or 0.0)
        except Exception:  # noqa: BLE001 - not measurable; other checks report failures
            return by_gradient

    def _forward_mixing(self, x: Any, packed: Any, leaves: list[Any]) -> float:
        import keras

        out0 = [np.asarray(o)[0] for o in keras.tree.flatten(self.call(packed, training=False))]
        other = self.spec.batch(len(np.asarray(leaves[0])), seed=301)
        mixed = [np.concatenate([np.asarray(a)[:1], np.asarray(o)[1:]])
                 for a, o in zip(keras.tree.flatten(x), keras.tree.flatten(other))]
        out1 = [np.asarray(o)[0] for o in keras.tree.flatten(
            self.call(keras.tree.pack_sequence_as(self.spec.template, mixed), training=False))]
        diff = max(float(np.max(np.abs(a - c))) if a.size else 0.0 for a, c in zip(out0, out1))
        scale = max(float(np.max(np.abs(a))) if a.size else 0.0 for a in out0)
        return diff / max(scale, 1e-12) if diff > 1e-12 else 0.0

    # -- a model around the layer: fit and export ------------------------------------------
    def wrapper(self, name: str) -> Any:
        """A functional ``keras.Model`` of the layer alone, with a ``None`` batch."""
        import keras

        inputs = self.spec.symbolic()
        outputs = self.call(inputs)
        return keras.Model(inputs, outputs, name=f"batchfit_check_{name}")

    def prepare_fit(self, wrapper: Any) -> list[tuple[int, ...]] | None:
        """Compile ``wrapper`` (SGD at rate 0: weights unchanged) and return the per-example
        shapes of its outputs, the targets :meth:`fit` draws; None if an output is not float."""
        import keras

        outs = keras.tree.flatten(wrapper.outputs)
        if not all(o.dtype in ("float16", "float32", "float64", "bfloat16") for o in outs):
            return None
        wrapper.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0), loss="mse")
        one = [np.asarray(o) for o in keras.tree.flatten(self.run(1, seed=400))]
        return [tuple(o.shape[1:]) for o in one]

    def fit(self, wrapper: Any, targets: Sequence[tuple[int, ...]], b: int, n: int) -> None:
        """One epoch of ``wrapper.fit`` on ``n`` examples at ``batch_size=b``; raises its error."""
        x = self.spec.batch(n, seed=400 + b)
        rng = np.random.default_rng(b)
        y = [rng.standard_normal((n, *shape)).astype("float32") for shape in targets]
        wrapper.fit(x, y if len(y) > 1 else y[0], batch_size=b, epochs=1, verbose=0,
                    shuffle=False)

    def export_problem(self, wrapper: Any, sizes: Sequence[int]) -> tuple[str, str] | None:
        """``(message, fix)`` of what breaks in ``wrapper.export`` (SavedModel) and serving it
        at ``sizes``, or None when the export keeps a ``None`` batch and serves them alike."""
        import tensorflow as tf

        with tempfile.TemporaryDirectory(prefix="batchfit-check-") as tmp:
            try:
                wrapper.export(tmp, verbose=False)
                loaded = tf.saved_model.load(tmp)
            except Exception as exc:  # noqa: BLE001 - the finding
                return (f"model.export fails: {type(exc).__name__}: {error_line(exc)}",
                        _export_fix(exc))
            sig = loaded.signatures.get("serving_default")
            problem = _signature_problem(sig) if sig is not None else None
            return problem or self._serving_problem(loaded, sizes)

    def _serving_problem(self, loaded: Any, sizes: Sequence[int]) -> tuple[str, str] | None:
        import keras

        for b in sizes:
            x = self.spec.batch(b, seed=500 + b)
            try:
                served = loaded.serve(x)
            except Exception as exc:  # noqa: BLE001 - the finding
                return ((f"the exported model fails to serve batch size {b}: "
                        f"{type(exc).__name__}: {error_line(exc)}"),
                        "export with a None batch: read sizes with tf.shape(x)")
            want = keras.tree.flatten(self.call(x, training=False))
            for s, w in zip(keras.tree.flatten(served), want):
                s, w = np.asarray(s), np.asarray(w)
                if s.shape != w.shape or not np.allclose(s, w, rtol=1e-4, atol=1e-5):
                    return ((f"the exported model serves batch {b} with a different result "
                            f"(shape {s.shape} vs {w.shape} in Python)"),
                            ("keep state in tracked variables; avoid Python-side values "
                            "baked in at trace time"))
        return None


def _signature_problem(sig: Any) -> tuple[str, str] | None:
    import keras

    specs = keras.tree.flatten(sig.structured_input_signature)
    fixed = [s.shape[0] for s in specs if s.shape.rank and s.shape[0] is not None]
    if fixed:
        return (f"the exported signature fixes the batch to {fixed[0]}",
                "export with a None batch: read sizes with tf.shape(x)")
    py = sorted(_graph_ops(sig) & {"PyFunc", "EagerPyFunc", "PyFuncStateless"})
    if py:
        return ((f"the exported model calls back into Python ({', '.join(py)}: "
                "tf.py_function / tf.numpy_function): it cannot be served "
                "outside this process (TF Serving, another program)"),
                "write the computation with TensorFlow ops")
    return None


def _export_fix(exc: BaseException) -> str:
    text = str(exc)
    if "untracked" in text:
        return ("assign TensorFlow objects (tables, variables) to attributes of the layer "
                "itself, not of a plain Python helper object, so they are tracked and saved")
    if "None values not supported" in text:
        return "read the batch size with tf.shape(x)[0], not x.shape[0]"
    return "make call() traceable with a None batch and keep its state in tracked objects"


def _graph_ops(concrete: Any) -> set[str]:
    try:
        graph_def = concrete.graph.as_graph_def()
    except Exception:  # noqa: BLE001
        return set()
    ops = {n.op for n in graph_def.node}
    for fn in graph_def.library.function:
        ops |= {n.op for n in fn.node_def}
    return ops


def _variable_values(layer: Any) -> list[tuple[Any, np.ndarray]]:
    """Every variable of the layer with a copy of its value: weights, non-trainable state
    and random-seed state (which ``get_weights`` leaves out)."""
    return [(v, np.array(v.numpy(), copy=True)) for v in layer.variables]


