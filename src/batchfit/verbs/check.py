"""``batchfit.check``: do a model's custom layers honour the batch contract?

For each custom (non-Keras) layer of a model, or for one layer given alone, seven checks:

1. ``dynamic_batch``: builds with a ``None`` batch (``keras.Input``), runs eagerly at batch
   sizes 1, 2, an odd one and a large one and in a traced function, and keeps the batch: the
   output's batch dimension equals the input's.
2. ``partial_batch``: ``fit`` on a dataset whose size the batch size does not divide.
3. ``static_shape``: an AST scan of ``call`` and its same-module helpers for reads of the static
   batch (:mod:`batchfit.core.static_scan`).
4. ``sample_mixing``: the gradient of ``sum(out[0])`` with respect to the other samples of the
   batch, in inference and in training, and in inference sample 0's output with the other
   samples swapped for new ones; nonzero means that sample 0's output depends on other
   samples. Expected for BatchNormalization in training (info), a warning otherwise.
5. ``retracing``: how many times the layer's Python code is traced over several batch sizes
   in ``fit``, under ``tf.function(reduce_retracing=True)`` and when called eagerly (its own
   ``tf.function`` helpers); more than Keras's usual two is a warning.
6. ``export``: ``model.export`` (SavedModel) of the layer keeps a ``None`` batch, serves batch
   sizes other than the one it was built with, and needs no Python at serving time.
7. ``batch_limit``: a layer that refuses batches above a limit raises a clear error above it
   and works below it (info, with the limit found).

A check that cannot run because an earlier one failed (no ``None``-batch build, no batch
dimension in the output) is reported as skipped, so each bug is reported by the check meant
for it. Layer weights are restored after the checks; the extra calls add no lasting nodes.

Example:

>>> import keras
>>> result = check(keras.layers.Dense(4), input_shape=(8,))
>>> result.has_errors, [f.check for f in result.findings]
(False, [])
"""

from __future__ import annotations

import platform
import re
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core.static_scan import format_location, locate_method, scan_class
from ..errors import InvalidInputError, LayerBuildError
from ..results.check import CHECKS, CheckResult, Finding, LayerReport

__all__ = ["check", "custom_layers", "is_custom_layer"]

_KERAS_ROOTS = ("keras", "tf_keras", "tensorflow")
_REL_TOL = 1e-5          # gradient test: float noise alone reaches ~4e-7 (relative)
_MAX_ELEMENTS = 1 << 23  # the batch-limit search stops before inputs of 32 MiB (float32)
_EAGER_SIZES = (2, 1, 3, 5, 6)
_USUAL_TRACES = 2
_SLOW_CALL_S = 1.0       # the batch-limit search stops doubling after a call this slow


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def check(model_or_layer: Any, input_shape: Any = None, *, sample: Any = None,
          layers: Sequence[str] | None = None, max_batch: int = 1024) -> CheckResult:
    """Check that a model's custom layers (or one layer) honour the batch contract.

    Given a ``keras.Model``, finds its custom (non-Keras) layers, including those inside nested
    models, and checks each alone on the inputs it receives in the model. Given a
    ``keras.layers.Layer``, checks that layer (Keras's own layers included) on ``input_shape``
    or ``sample``. The seven checks are described in :mod:`batchfit.verbs.check`.

    Args:
        model_or_layer: a ``keras.Model``, a ``keras.layers.Layer``, or a model spec string
            (``"path/file.py:factory"``, ``"package.module:factory"``, ``"model.keras"``).
        input_shape: for a layer, the shape of one example without the batch dimension
            (a leading ``None`` is dropped), or a list/dict of shapes for several inputs.
            Optional when ``sample`` is given or the layer is already built. For a model
            that does not expose its inputs (subclassed), the shape of its inputs, as
            ``input_shapes`` elsewhere in batchfit. ``None`` dimensions other than the batch
            in a layer's inputs are taken as 8. Default None.
        sample: for a layer, an array (or list/dict of arrays) with a batch dimension; its
            per-example shapes and dtypes are used. Default None.
        layers: check only the custom layers with these names. Default None (all).
        max_batch: the largest batch the batch-limit search tries. Default 1024.

    Returns:
        A :class:`batchfit.results.CheckResult`; ``result.has_errors`` is what CI should test.

    Raises:
        InvalidInputError: not a model or a layer, no input shape for a layer, unknown names
            in ``layers``.
        LayerBuildError: a layer fails on an ordinary batch (2 or 1 examples) for reasons of
            its own: its error is in the message.

    Example:

    >>> import keras
    >>> r = check(keras.layers.BatchNormalization(), input_shape=(4,))
    >>> [(f.check, f.severity) for f in r.findings]
    [('sample_mixing', 'info')]
    """
    import keras

    start = time.perf_counter()
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 2:
        raise InvalidInputError(f"max_batch must be an integer >= 2, got {max_batch!r}.")
    obj = model_or_layer
    if isinstance(obj, str):
        obj = load_checkable(obj)
    notes: list[str] = []
    if isinstance(obj, keras.Model) and not _is_custom_model_checked_as_layer(obj, input_shape,
                                                                            sample):
        targets = _model_targets(obj, input_shape, notes)
        name = obj.name
    elif isinstance(obj, keras.layers.Layer):
        targets = [(obj, _layer_spec(obj, input_shape, sample))]
        name = obj.name
    else:
        raise InvalidInputError(
            f"batchfit check takes a keras.Model or a keras.layers.Layer, got {_describe(obj)}.")
    if layers is not None:
        wanted = set(layers)
        unknown = wanted - {layer.name for layer, _ in targets}
        if unknown:
            raise InvalidInputError(
                f"no custom layer named {sorted(unknown)}; the custom layers are "
                f"{[layer.name for layer, _ in targets]}.")
        targets = [(layer, spec) for layer, spec in targets if layer.name in wanted]
    if not targets:
        notes.append("no custom layers found: Keras's own layers are tested by Keras. Check one "
                     "of them with batchfit.check(layer, input_shape=...).")
    findings: list[Finding] = []
    reports: list[LayerReport] = []
    import tensorflow as tf

    tf_logger = tf.get_logger()
    level = tf_logger.level
    tf_logger.setLevel("ERROR")  # the checks retrace on purpose; TF's retracing warning is noise
    try:
        for layer, spec in targets:
            report, layer_findings = _LayerCheck(layer, spec, max_batch).run()
            reports.append(report)
            findings.extend(layer_findings)
    finally:
        tf_logger.setLevel(level)
    return CheckResult(findings=findings, layers=reports, model_name=name,
                       seconds=round(time.perf_counter() - start, 2), notes=notes,
                       environment=_environment())


def is_custom_layer(layer: Any) -> bool:
    """Whether ``layer``'s class is the user's (not Keras's or TensorFlow's own).

    Example:

    >>> import keras
    >>> is_custom_layer(keras.layers.Dense(2))
    False
    """
    module = type(layer).__module__ or ""
    return module.split(".")[0] not in _KERAS_ROOTS


def custom_layers(model: Any) -> list[Any]:
    """The custom layers of ``model``, looking inside nested Keras models (not custom layers).

    Example:

    >>> from batchfit.examples.models import seed_mlp
    >>> [type(layer).__name__ for layer in custom_layers(seed_mlp())]
    ['MyCustomLayer']
    """
    import keras

    found: list[Any] = []
    seen: set[int] = set()

    def visit(container: Any) -> None:
        for layer in getattr(container, "layers", []):
            if id(layer) in seen or isinstance(layer, keras.layers.InputLayer):
                continue
            seen.add(id(layer))
            if is_custom_layer(layer):
                found.append(layer)
            elif isinstance(layer, keras.Model):
                visit(layer)

    visit(model)
    return found


def load_checkable(spec: str) -> Any:
    """Load a model or a layer from a spec (a factory may return either; compiling is optional).

    Raises:
        ModelLoadError: see :func:`batchfit.backend.tensorflow.loader.load_model`; also when the factory
            returns something that is neither a model nor a layer.
    """
    import keras

    from ..backend.tensorflow.loader import load_object

    obj, where = load_object(spec)
    if not isinstance(obj, keras.layers.Layer):
        from ..errors import ModelLoadError

        raise ModelLoadError(f"What the factory {where} returned is {_describe(obj)}; batchfit "
                             "check needs a keras.Model or a keras.layers.Layer.")
    return obj


# --------------------------------------------------------------------------------------------
# Input specs
# --------------------------------------------------------------------------------------------

@dataclass
class _Spec:
    """The input one layer is checked with: a structure of leaves, per-example shapes."""

    template: Any
    shapes: list[tuple[int, ...]]
    dtypes: list[str]
    kwargs: dict[str, Any] = field(default_factory=dict)

    def batch(self, b: int, seed: int = 0) -> Any:
        import keras

        rng = np.random.default_rng(seed)
        leaves = []
        for shape, dtype in zip(self.shapes, self.dtypes):
            if "int" in dtype:
                leaves.append(rng.integers(0, 2, size=(b, *shape)).astype(dtype))
            elif dtype == "bool":
                leaves.append(rng.random((b, *shape)) < 0.5)
            else:
                leaves.append(rng.standard_normal((b, *shape)).astype(dtype))
        return keras.tree.pack_sequence_as(self.template, leaves)

    def symbolic(self) -> Any:
        import keras

        leaves = [keras.Input(shape, dtype=dtype) for shape, dtype in zip(self.shapes,
                                                                          self.dtypes)]
        return keras.tree.pack_sequence_as(self.template, leaves)

    def elements(self) -> int:
        return sum(int(np.prod(s)) if s else 1 for s in self.shapes)

    def describe(self) -> list[Any]:
        if len(self.shapes) == 1:
            return list(self.shapes[0])
        return [list(s) for s in self.shapes]


def _fill(shape: Sequence[Any], what: str, notes: list[str] | None) -> tuple[int, ...]:
    dims = []
    for d in shape:
        if d is None:
            if notes is not None:
                notes.append(f"{what}: a None dimension other than the batch was taken as 8.")
            d = 8
        dims.append(int(d))
    return tuple(dims)


def _spec_from_tensors(struct: Any, kwargs: dict[str, Any] | None, what: str,
                       notes: list[str] | None) -> _Spec:
    import keras

    leaves = keras.tree.flatten(struct)
    shapes = [_fill(tuple(t.shape)[1:], what, notes) for t in leaves]
    dtypes = [str(getattr(t.dtype, "name", t.dtype)) for t in leaves]
    template = keras.tree.map_structure(lambda _: 0, struct)
    return _Spec(template, shapes, dtypes, dict(kwargs or {}))


def _layer_spec(layer: Any, input_shape: Any, sample: Any) -> _Spec:
    import keras

    if sample is not None:
        leaves = keras.tree.flatten(sample)
        arrays = [np.asarray(a) for a in leaves]
        if any(a.ndim < 1 or a.shape[0] < 1 for a in arrays):
            raise InvalidInputError("sample must have a batch dimension of at least 1.")
        return _Spec(keras.tree.map_structure(lambda _: 0, sample),
                     [tuple(a.shape[1:]) for a in arrays], [str(a.dtype) for a in arrays])
    if input_shape is None:
        shapes = getattr(layer, "_build_shapes_dict", None)
        if getattr(layer, "built", False) and isinstance(shapes, dict) and len(shapes) == 1:
            input_shape = next(iter(shapes.values()))
        else:
            raise InvalidInputError(
                f"Layer '{layer.name}' ({type(layer).__qualname__}) is not built: pass "
                "input_shape= (one example, without the batch dimension, e.g. (16,)) or "
                "sample= (on the CLI: --input-shape 16).")
    if isinstance(input_shape, dict):
        template = {k: 0 for k in input_shape}
        shapes = [_shape_arg(input_shape[k]) for k in keras.tree.flatten(
            {k: k for k in input_shape})]
        return _Spec(template, shapes, ["float32"] * len(shapes))
    if _is_shape(input_shape):
        return _Spec(0, [_shape_arg(input_shape)], ["float32"])
    shapes = [_shape_arg(s) for s in input_shape]
    return _Spec(list(range(len(shapes))), shapes, ["float32"] * len(shapes))


def _is_shape(s: Any) -> bool:
    return isinstance(s, int) or (isinstance(s, (tuple, list))
                                  and all(d is None or isinstance(d, int) for d in s))


def _shape_arg(s: Any) -> tuple[int, ...]:
    if isinstance(s, int):
        s = (s,)
    s = tuple(s)
    if s and s[0] is None:
        s = s[1:]
    if any(d is None or not isinstance(d, int) or d < 1 for d in s):
        raise InvalidInputError(f"input_shape {s!r}: give positive integers for every dimension "
                                "of one example (no batch dimension).")
    return s


def _is_custom_model_checked_as_layer(model: Any, input_shape: Any, sample: Any) -> bool:
    """A subclassed model with no custom sublayers: its own ``call`` is what to check."""
    return is_custom_layer(model) and not custom_layers(model)


def _model_targets(model: Any, input_shapes: Any, notes: list[str]) -> list[tuple[Any, _Spec]]:
    targets: list[tuple[Any, _Spec]] = []
    missing: list[Any] = []
    for layer in custom_layers(model):
        nodes = getattr(layer, "_inbound_nodes", [])
        spec = None
        if nodes:
            args = getattr(nodes[0], "arguments", None)
            if args is not None and len(args.args) == 1:
                kwargs = {k: v for k, v in args.kwargs.items() if not _has_tensor(v)}
                spec = _spec_from_tensors(args.args[0], kwargs, f"layer '{layer.name}'", notes)
        if spec is None:
            missing.append(layer)
        else:
            targets.append((layer, spec))
    if missing:
        recorded = _record_specs(model, missing, input_shapes, notes)
        for layer in missing:
            if id(layer) in recorded:
                targets.append((layer, recorded[id(layer)]))
            else:
                notes.append(f"layer '{layer.name}' ({type(layer).__qualname__}) was not "
                             "checked: batchfit could not see what it is called with (it is "
                             "not called, or called with several positional inputs).")
    order = {id(layer): i for i, layer in enumerate(custom_layers(model))}
    return sorted(targets, key=lambda t: order[id(t[0])])


def _has_tensor(v: Any) -> bool:
    import keras

    return any(hasattr(x, "shape") and hasattr(x, "dtype") for x in keras.tree.flatten(v))


def _record_specs(model: Any, layers: list[Any], input_shapes: Any,
                  notes: list[str]) -> dict[int, _Spec]:
    """Call a (subclassed) model once eagerly and record what each layer is called with."""
    from ..backend.tensorflow.synth import plan_synthesis

    try:
        x, _ = plan_synthesis(model, input_shapes).batch(2)
    except Exception as exc:  # noqa: BLE001 - reported as a note; the layers are skipped
        notes.append(f"could not synthesize an input for the model to see its layers' inputs "
                     f"({type(exc).__name__}: {_first_line(exc)}); pass input_shape=.")
        return {}
    recorded: dict[int, _Spec] = {}
    patched = []
    for layer in layers:
        orig = layer.call

        def recorder(*args: Any, __layer: Any = layer, __orig: Any = orig, **kwargs: Any) -> Any:
            if id(__layer) not in recorded and len(args) == 1:
                kw = {k: v for k, v in kwargs.items() if not _has_tensor(v) and k != "training"}
                recorded[id(__layer)] = _spec_from_tensors(args[0], kw,
                                                           f"layer '{__layer.name}'", notes)
            return __orig(*args, **kwargs)

        object.__setattr__(layer, "call", recorder)
        patched.append(layer)
    try:
        model(x, training=False)
    except Exception as exc:  # noqa: BLE001 - reported as a note
        notes.append(f"calling the model eagerly to see its layers' inputs failed "
                     f"({type(exc).__name__}: {_first_line(exc)}).")
    finally:
        for layer in patched:
            object.__delattr__(layer, "call")
    return recorded


# --------------------------------------------------------------------------------------------
# One layer
# --------------------------------------------------------------------------------------------

class _TraceCounter:
    """Counts traces of a layer: graph-mode runs of its ``call`` and of its own tf.functions."""

    def __init__(self, layer: Any) -> None:
        import tensorflow as tf

        self.layer = layer
        self.graph_calls = 0
        self.functions: list[tuple[str, Any]] = []
        poly = tf.types.experimental.PolymorphicFunction
        module = __import__("sys").modules.get(type(layer).__module__)
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

    def __enter__(self) -> _TraceCounter:  # noqa: PYI034
        import tensorflow as tf

        orig = self.layer.call

        def counting(*args: Any, **kwargs: Any) -> Any:
            if not tf.executing_eagerly():
                self.graph_calls += 1
            return orig(*args, **kwargs)

        object.__setattr__(self.layer, "call", counting)
        return self

    def __exit__(self, *exc: object) -> None:
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


def is_custom_layer_class(klass: type) -> bool:
    return (klass.__module__ or "").split(".")[0] not in _KERAS_ROOTS + ("builtins",)


class _LayerCheck:
    def __init__(self, layer: Any, spec: _Spec, max_batch: int) -> None:
        self.layer = layer
        self.spec = spec
        self.max_batch = max_batch
        self.name = layer.name
        cls = type(layer)
        module = cls.__module__ or ""
        self.class_name = (cls.__qualname__ if module.startswith("_batchfit_user_")
                           else f"{module}.{cls.__qualname__}")
        where = locate_method(cls, "call")
        self.location = format_location(*where) if where else ""
        self.findings: list[Finding] = []
        self.statuses: dict[str, str] = {}
        self.details: dict[str, str] = {}
        self.limit: int | None = None
        self.static_uses: list[Any] = []
        self.weights: list[Any] | None = None

    # -- bookkeeping -------------------------------------------------------------------------
    def _find(self, check: str, severity: str, message: str, fix: str = "",
              location: str | None = None) -> None:
        self.findings.append(Finding(self.name, check, severity, message,
                                     self.location if location is None else location, fix))
        order = {"error": 0, "warning": 1, "info": 2, "ok": 3}
        old = self.statuses.get(check, "ok")
        if order.get(severity, 3) < order.get(old, 3):
            self.statuses[check] = severity

    def _ok(self, check: str) -> None:
        self.statuses.setdefault(check, "ok")

    def _skip(self, check: str, reason: str) -> None:
        self.statuses[check] = f"skipped: {reason}"

    def _call(self, x: Any, **kwargs: Any) -> Any:
        return self.layer(x, **{**self.spec.kwargs, **kwargs})

    def _sizes(self, wanted: Sequence[int]) -> list[int]:
        cap = self.limit if self.limit is not None else self.max_batch
        out = []
        for s in wanted:
            s = min(s, cap)
            if s >= 1 and s not in out:
                out.append(s)
        return out

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> tuple[LayerReport, list[Finding]]:
        start = time.perf_counter()
        node_counts = _node_counts(self.layer)
        if getattr(self.layer, "built", False):
            self.weights = _variable_values(self.layer)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._run()
        finally:
            if self.weights is not None:
                for variable, value in self.weights:
                    variable.assign(value)
            _restore_nodes(self.layer, node_counts)
        order = {c: i for i, c in enumerate(CHECKS)}
        self.findings.sort(key=lambda f: order.get(f.check, 99))
        statuses = {c: self.statuses.get(c, "ok") for c in CHECKS}
        report = LayerReport(layer=self.name, class_name=self.class_name, location=self.location,
                             input_shape=self.spec.describe(), statuses=statuses,
                             details=dict(self.details),
                             seconds=round(time.perf_counter() - start, 2))
        return report, self.findings

    def _run(self) -> None:
        counter = _TraceCounter(self.layer)
        with counter:
            eager_traces, eager_fns = self._eager_retracing(counter)
            self._batch_limit()
            self._static_shape()
            symbolic_ok, keeps_batch = self._dynamic_batch()
            traced_ok, fn_traces = self._traced(counter, symbolic_ok and keeps_batch)
            if keeps_batch:
                self._sample_mixing()
            else:
                self._skip("sample_mixing", "the output has no batch dimension")
            wrapper = None
            if symbolic_ok and keeps_batch and traced_ok:
                wrapper = self._wrapper()
            reason = ("the layer does not build and run with a None batch (see dynamic_batch)"
                      if not (symbolic_ok and traced_ok) else
                      "the output has no batch dimension (see dynamic_batch)")
            fit_traces = None
            if wrapper is not None:
                fit_traces = self._partial_batch(wrapper, counter)
                self._export(wrapper)
            else:
                self._skip("partial_batch", reason)
                self._skip("export", reason)
        self._retracing(eager_traces, eager_fns, fn_traces, fit_traces)

    # 0 + 5: eager calls first, before anything else traced these sizes ---------------------
    def _eager_retracing(self, counter: _TraceCounter) -> tuple[int, dict[str, int]]:
        snap = counter.snapshot()
        ran = []
        first_error: BaseException | None = None
        for b in _EAGER_SIZES:
            try:
                self._call(self.spec.batch(b, seed=b), training=False)
                ran.append(b)
            except Exception as exc:  # noqa: BLE001 - classified below
                if b in (2, 1) and not ran:
                    first_error = first_error or exc
                    continue
                break
        if not ran:
            where = f" ({self.location})" if self.location else ""
            raise LayerBuildError(
                f"layer '{self.name}' ({self.class_name}){where} fails on an ordinary batch of 2 "
                f"(and of 1) with inputs {self._shapes_text()}: "
                f"{type(first_error).__name__}: {_first_line(first_error)}. Fix the layer, or "
                "pass the input shape it expects (input_shape=..., --input-shape).") \
                from first_error
        # Built by now: what to restore afterwards, unless it was built before the checks.
        if self.weights is None:
            self.weights = _variable_values(self.layer)
        traces, fns = counter.since(snap)
        self.details["eager sizes"] = ",".join(map(str, ran))
        return traces, fns

    def _shapes_text(self) -> str:
        return ", ".join(f"{tuple(s)} {d}" for s, d in zip(self.spec.shapes, self.spec.dtypes))

    # 7 ------------------------------------------------------------------------------------
    def _batch_limit(self) -> None:
        import tensorflow as tf

        per_sample = max(1, self.spec.elements())
        cap = max(2, min(self.max_batch, _MAX_ELEMENTS // per_sample))
        last_ok, failed, error = 0, None, None
        b = 1
        while b <= cap:
            started = time.perf_counter()
            try:
                self._call(self.spec.batch(b, seed=b), training=False)
                last_ok = b
                if time.perf_counter() - started > _SLOW_CALL_S:
                    self.details["batch_limit"] = f"none up to {b} (larger calls would be slow)"
                    break
            except tf.errors.ResourceExhaustedError:
                self.details["batch_limit"] = f"out of memory at {b}: no limit of its own below"
                break
            except Exception as exc:  # noqa: BLE001 - a refusal, classified below
                failed, error = b, exc
                break
            if b == cap:
                break
            b = min(b * 2, cap)
        if failed is None:
            self.details.setdefault("batch_limit", f"none up to {last_ok}")
            self._ok("batch_limit")
            return
        if last_ok == 0:
            self._find("batch_limit", "error",
                       f"fails at batch 1 ({type(error).__name__}: {_first_line(error)})",
                       "make the layer work for a single example")
            return
        lo, hi = last_ok, failed
        while hi - lo > 1:
            mid = (lo + hi) // 2
            try:
                self._call(self.spec.batch(mid, seed=mid), training=False)
                lo = mid
            except Exception as exc:  # noqa: BLE001
                hi, error = mid, exc
        self.limit = lo
        self.details["batch_limit"] = str(lo)
        text = f"{type(error).__name__}: {_first_line(error)}"
        clear = isinstance(error, (ValueError, tf.errors.InvalidArgumentError)) and any(
            ch.isdigit() for ch in str(error))
        if clear:
            self._find("batch_limit", "info",
                       f"refuses batches above {lo} with a clear error ({text}) and works at "
                       f"{lo} and below")
        else:
            self._find("batch_limit", "warning",
                       f"fails for batches above {lo} with an unclear error ({text})",
                       "if the limit is deliberate, raise ValueError naming it (in graph mode: "
                       "tf.debugging.assert_less_equal(tf.shape(x)[0], limit, message=...))")

    # 3 ------------------------------------------------------------------------------------
    def _static_shape(self) -> None:
        if not is_custom_layer(self.layer):
            self._skip("static_shape", "Keras's own layer")
            return
        self.static_uses = scan_class(type(self.layer))
        self.details["static_shape"] = f"{len(self.static_uses)} static batch read(s)"
        for use in self.static_uses:
            self._find("static_shape", "warning",
                       f"{use.message} (in {use.function}: {use.code})", use.fix,
                       location=use.location)
        self._ok("static_shape")

    # 1 ------------------------------------------------------------------------------------
    def _dynamic_fix(self, exc: BaseException | None) -> str:
        if exc is not None and "OperatorNotAllowedInGraph" in type(exc).__name__:
            return ("a Python `if`/`for` on a tensor only runs eagerly: use "
                    "tf.debugging.assert_less_equal(tf.shape(x)[0], limit, message=...) or "
                    "keras.ops.cond")
        if self.static_uses:
            lines = ", ".join(u.location for u in self.static_uses[:3])
            return f"read the batch size with tf.shape(x)[0] / keras.ops.shape(x)[0] (see {lines})"
        return ("make call() work with an unknown batch: read sizes with tf.shape(x) / "
                "keras.ops.shape(x), never x.shape[0]")

    def _dynamic_batch(self) -> tuple[bool, bool]:
        import keras

        try:
            out = self._call(self.spec.symbolic())
        except Exception as exc:  # noqa: BLE001 - the finding
            self._find("dynamic_batch", "error",
                       f"fails to build with a None batch dimension (keras.Input): "
                       f"{type(exc).__name__}: {_first_line(exc)}", self._dynamic_fix(exc))
            return False, True
        fixed = [t.shape[0] for t in keras.tree.flatten(out) if t.shape and t.shape[0]
                 is not None]
        if fixed or any(not t.shape for t in keras.tree.flatten(out)):
            got = fixed[0] if fixed else "absent"
            self._find("dynamic_batch", "error",
                       f"the output's batch dimension is {got} for an input batch of None: the "
                       "layer reduces or reshapes across the batch axis",
                       "keep axis 0 as the batch: reduce over axis=1 or later, reshape with "
                       "tf.shape(x)[0]")
            return True, False
        sizes = self._sizes([1, 2, 7, 64])
        for b in sizes:
            try:
                out = self._call(self.spec.batch(b, seed=100 + b), training=False)
            except Exception as exc:  # noqa: BLE001 - the finding
                self._find("dynamic_batch", "error",
                           f"fails at batch size {b}: {type(exc).__name__}: {_first_line(exc)}",
                           self._dynamic_fix(exc))
                return True, True
            got = [int(t.shape[0]) if t.shape else None for t in keras.tree.flatten(out)]
            if any(g != b for g in got):
                self._find("dynamic_batch", "error",
                           f"output batch dimension {got[0]} for an input batch of {b}",
                           "keep axis 0 as the batch: reduce over axis=1 or later")
                return True, False
        self.details["dynamic_batch"] = "None, " + ", ".join(map(str, sizes))
        self._ok("dynamic_batch")
        return True, True

    def _traced(self, counter: _TraceCounter, possible: bool) -> tuple[bool, int | None]:
        """Run under tf.function(reduce_retracing=True) over several sizes; count traces."""
        import tensorflow as tf

        if not possible:
            return False, None
        fn = tf.function(lambda x: self._call(x, training=False), reduce_retracing=True)
        snap = counter.snapshot()
        for b in self._sizes([1, 2, 7, 16, 3]):
            try:
                fn(self.spec.batch(b, seed=200 + b))
            except Exception as exc:  # noqa: BLE001 - the finding
                self._find("dynamic_batch", "error",
                           f"runs eagerly but fails in a traced function (tf.function) at batch "
                           f"{b}: {type(exc).__name__}: {_first_line(exc)}",
                           self._dynamic_fix(exc))
                return False, None
        traces, _ = counter.since(snap)
        return True, traces

    # 4 ------------------------------------------------------------------------------------
    def _sample_mixing(self) -> None:
        b = min(4, self.limit if self.limit is not None else 4)
        if b < 2:
            self._skip("sample_mixing", "the layer takes one example at a time")
            return
        x = self.spec.batch(b, seed=300)
        results = {}
        for training in (False, True):
            results[training] = self._mixing(x, training)
        self.details["sample_mixing"] = ", ".join(
            f"{'training' if t else 'inference'}: {'-' if r is None else f'{r:.1e}'}"
            for t, r in results.items())
        mixes_inf = (results[False] or 0) > _REL_TOL
        mixes_train = (results[True] or 0) > _REL_TOL
        if mixes_inf:
            self._find("sample_mixing", "warning",
                       f"in inference, output sample 0 depends on the other samples of the batch "
                       f"(relative dependence {results[False]:.1e}): results change with the batch "
                       "size and a batch of 1 behaves differently",
                       "compute per sample (reduce over axis=1 or later, never axis=0); if "
                       "mixing is intended, document it")
        elif mixes_train:
            if self._has_batchnorm():
                self._find("sample_mixing", "info",
                           "in training, output samples depend on each other through "
                           "BatchNormalization's batch statistics (expected; inference is "
                           "per sample). Small batches make those statistics noisy")
            else:
                self._find("sample_mixing", "warning",
                           f"in training, output sample 0 depends on the other samples of the "
                           f"batch (relative gradient {results[True]:.1e}): the loss changes "
                           "with the batch size and a batch of 1 behaves differently",
                           "compute per sample (reduce over axis=1 or later, never axis=0)")
        self._ok("sample_mixing")

    def _has_batchnorm(self) -> bool:
        import keras

        bn = keras.layers.BatchNormalization
        subs = getattr(self.layer, "_flatten_layers", None)
        layers = list(subs(include_self=True, recursive=True)) if subs else [self.layer]
        return any(isinstance(sub, bn) for sub in layers)

    def _mixing(self, x: Any, training: bool) -> float | None:
        """Relative dependence of output sample 0 on samples 1.. (None if not measurable)."""
        import keras
        import tensorflow as tf

        leaves = [tf.constant(a) for a in keras.tree.flatten(x)]
        floats = [t for t in leaves if t.dtype.is_floating]
        packed = keras.tree.pack_sequence_as(self.spec.template, leaves)
        by_gradient = None
        try:
            if floats:
                with tf.GradientTape() as tape:
                    for t in floats:
                        tape.watch(t)
                    out = self._call(packed, training=training)
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
            out0 = [np.asarray(o)[0] for o in keras.tree.flatten(self._call(packed,
                                                                             training=False))]
            other = self.spec.batch(len(np.asarray(leaves[0])), seed=301)
            mixed = [np.concatenate([np.asarray(a)[:1], np.asarray(o)[1:]])
                     for a, o in zip(keras.tree.flatten(x), keras.tree.flatten(other))]
            out1 = [np.asarray(o)[0] for o in keras.tree.flatten(
                self._call(keras.tree.pack_sequence_as(self.spec.template, mixed),
                           training=False))]
            diff = max(float(np.max(np.abs(a - c))) if a.size else 0.0
                       for a, c in zip(out0, out1))
            scale = max(float(np.max(np.abs(a))) if a.size else 0.0 for a in out0)
            forward = diff / max(scale, 1e-12) if diff > 1e-12 else 0.0
            return max(forward, by_gradient or 0.0)
        except Exception:  # noqa: BLE001 - not measurable; other checks report failures
            return by_gradient

    # 2 ------------------------------------------------------------------------------------
    def _wrapper(self) -> Any:
        import keras

        inputs = self.spec.symbolic()
        outputs = self._call(inputs)
        return keras.Model(inputs, outputs, name=f"batchfit_check_{self.name}")

    def _partial_batch(self, wrapper: Any, counter: _TraceCounter) -> int | None:
        import keras

        outs = keras.tree.flatten(wrapper.outputs)
        if not all(o.dtype in ("float16", "float32", "float64", "bfloat16") for o in outs):
            self._skip("partial_batch", "the layer has non-float outputs, nothing to train")
            return None
        wrapper.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0), loss="mse")
        one = [np.asarray(o) for o in keras.tree.flatten(
            self._call(self.spec.batch(1, seed=400), training=False))]
        snap = counter.snapshot()
        plan = []
        for b in self._sizes([8, 5]):
            if b >= 2:
                plan.append((b, 2 * b + max(1, b // 2)))
        if not plan:
            self._skip("partial_batch", f"the layer's batch limit ({self.limit}) is below 2")
            return None
        for b, n in plan:
            x = self.spec.batch(n, seed=400 + b)
            rng = np.random.default_rng(b)
            y = [rng.standard_normal((n, *o.shape[1:])).astype("float32") for o in one]
            try:
                wrapper.fit(x, y if len(y) > 1 else y[0], batch_size=b, epochs=1, verbose=0,
                            shuffle=False)
            except Exception as exc:  # noqa: BLE001 - the finding
                self._find("partial_batch", "error",
                           f"fit fails on {n} samples with batch_size={b} (last batch of "
                           f"{n % b}): {type(exc).__name__}: {_first_line(exc)}",
                           self._dynamic_fix(exc))
                return None
        self.details["partial_batch"] = "; ".join(f"{n} samples / batch {b}" for b, n in plan)
        self._ok("partial_batch")
        traces, _ = counter.since(snap)
        return traces

    # 6 ------------------------------------------------------------------------------------
    def _export(self, wrapper: Any) -> None:
        import keras
        import tensorflow as tf

        with tempfile.TemporaryDirectory(prefix="batchfit-check-") as tmp:
            try:
                wrapper.export(tmp, verbose=False)
                loaded = tf.saved_model.load(tmp)
            except Exception as exc:  # noqa: BLE001 - the finding
                self._find("export", "error",
                           f"model.export fails: {type(exc).__name__}: {_first_line(exc)}",
                           _export_fix(exc))
                return
            sig = loaded.signatures.get("serving_default")
            if sig is not None:
                specs = keras.tree.flatten(sig.structured_input_signature)
                fixed = [s.shape[0] for s in specs if s.shape.rank and s.shape[0] is not None]
                if fixed:
                    self._find("export", "error",
                               f"the exported signature fixes the batch to {fixed[0]}",
                               "export with a None batch: read sizes with tf.shape(x)")
                    return
                ops = _graph_ops(sig)
                py = sorted(ops & {"PyFunc", "EagerPyFunc", "PyFuncStateless"})
                if py:
                    self._find("export", "error",
                               f"the exported model calls back into Python ({', '.join(py)}: "
                               "tf.py_function / tf.numpy_function): it cannot be served "
                               "outside this process (TF Serving, another program)",
                               "write the computation with TensorFlow ops")
                    return
            for b in self._sizes([1, 3]):
                x = self.spec.batch(b, seed=500 + b)
                try:
                    served = loaded.serve(x)
                except Exception as exc:  # noqa: BLE001 - the finding
                    self._find("export", "error",
                               f"the exported model fails to serve batch size {b}: "
                               f"{type(exc).__name__}: {_first_line(exc)}",
                               "export with a None batch: read sizes with tf.shape(x)")
                    return
                want = keras.tree.flatten(self._call(x, training=False))
                for s, w in zip(keras.tree.flatten(served), want):
                    s, w = np.asarray(s), np.asarray(w)
                    if s.shape != w.shape or not np.allclose(s, w, rtol=1e-4, atol=1e-5):
                        self._find("export", "error",
                                   f"the exported model serves batch {b} with a different result "
                                   f"(shape {s.shape} vs {w.shape} in Python)",
                                   "keep state in tracked variables; avoid Python-side values "
                                   "baked in at trace time")
                        return
        self.details["export"] = "None batch; served " + ", ".join(map(str, self._sizes([1, 3])))
        self._ok("export")

    # 5 ------------------------------------------------------------------------------------
    def _retracing(self, eager: int, eager_fns: dict[str, int], traced: int | None,
                   fit: int | None) -> None:
        parts = [f"eager {eager}"]
        if traced is not None:
            parts.append(f"tf.function {traced}")
        if fit is not None:
            parts.append(f"fit {fit}")
        self.details["retracing"] = "traces: " + ", ".join(parts)
        n_sizes = len(self.details.get("eager sizes", "").split(","))
        if eager > _USUAL_TRACES:
            culprit = max(eager_fns, key=lambda k: eager_fns[k]) if eager_fns else "call"
            self._find("retracing", "warning",
                       f"called eagerly at {n_sizes} batch sizes, '{culprit}' traced {eager} "
                       f"times (Keras's usual is at most {_USUAL_TRACES}): a tf.function that "
                       "gets a new Python value or a new shape for every batch size",
                       "pass tensors, not Python ints, to tf.functions (tf.shape(x)[0], not "
                       "keras.ops.shape(x)[0], which is a Python int when eager), or use "
                       "@tf.function(reduce_retracing=True)")
        for what, n in (("under tf.function(reduce_retracing=True)", traced), ("in fit", fit)):
            if n is not None and n > _USUAL_TRACES:
                self._find("retracing", "warning",
                           f"{what}, the layer's Python code was traced {n} times over several "
                           f"batch sizes (usual: at most {_USUAL_TRACES})",
                           "avoid Python values derived from the batch (x.shape[0], int(...)) "
                           "in call; read sizes with tf.shape(x)")
        self._ok("retracing")


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

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


def _node_counts(layer: Any) -> tuple[int, int]:
    return (len(getattr(layer, "_inbound_nodes", [])), len(getattr(layer, "_outbound_nodes", [])))


def _restore_nodes(layer: Any, counts: tuple[int, int]) -> None:
    """Drop the nodes the checks added by calling the layer on new symbolic inputs."""
    for attr, n in zip(("_inbound_nodes", "_outbound_nodes"), counts):
        nodes = getattr(layer, attr, None)
        if isinstance(nodes, list) and len(nodes) > n:
            del nodes[n:]


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_KERAS_WRAPPER = ("Exception encountered when calling", "Could not automatically infer",
                  "Traceback", "File ")


def _first_line(exc: BaseException | None) -> str:
    """The error's own first sentence, without Keras's "Exception encountered when..." frame."""
    if exc is None:
        return ""
    text = _ANSI.sub("", str(exc)).split("Arguments received by")[0]
    for line in text.strip().splitlines():
        line = line.strip()
        if line and not line.startswith(_KERAS_WRAPPER):
            if len(line) > 160 and ". " in line[:300]:
                line = line[:line.index(". ") + 1]
            return line[:300]
    return type(exc).__name__


def _describe(obj: Any) -> str:
    t = type(obj)
    return f"an object of type {t.__module__}.{t.__qualname__}"


def _environment() -> dict[str, str]:
    import keras
    import tensorflow as tf

    return {"python": platform.python_version(), "tensorflow": tf.__version__,
            "keras": keras.__version__, "platform": platform.platform()}

