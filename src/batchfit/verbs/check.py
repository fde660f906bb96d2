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

Each check is one function, ``check_<name>(ctx, *prerequisites) -> Outcome``: ``ctx`` is the
layer's :class:`LayerContext` (the backend's probe of the layer, its name, where its ``call``
is), and the prerequisites are the values of the checks it depends on (the batch limit, the
static reads found, whether it builds with a ``None`` batch...). :data:`STEPS` lists them in the
order they run with what each needs, as Keras's ``run_layer_test`` is one ordered list. A check
that cannot run because an earlier one failed (no ``None``-batch build, no batch dimension in
the output) is reported as skipped, so each bug is reported by the check meant for it. This
module imports no framework: every call, trace and export goes through the backend
(:meth:`batchfit.backend.Backend.layer_probe`); the checks that only make sense on one framework
(SavedModel export and ``tf.function`` traces on TensorFlow) are reported as not applicable
where the backend does not run them. Layer weights are restored after the checks; the extra
calls add no lasting nodes.

Example:

>>> import keras
>>> result = check(keras.layers.Dense(4), input_shape=(8,))
>>> result.has_errors, [f.check for f in result.findings]
(False, [])
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..backend import Backend, get_backend
from ..core.static_scan import (
    StaticShapeUse,
    format_location,
    is_framework_class,
    locate_method,
    method_owner,
    scan_class,
)
from ..core.validate import check_int, is_int
from ..errors import InvalidInputError, LayerBuildError
from ..results.check import CHECKS, CheckResult, Finding, LayerReport, SkippedLayer, error_line

__all__ = ["STEPS", "LayerContext", "Outcome", "Step", "check", "custom_layers", "is_custom_layer",
           "run_steps"]

_REL_TOL = 1e-5          # gradient test: float noise alone reaches ~4e-7 (relative)
_MAX_ELEMENTS = 1 << 23  # the batch-limit search stops before inputs of 32 MiB (float32)
_EAGER_SIZES = (2, 1, 3, 5, 6)
_USUAL_TRACES = 2
_SLOW_CALL_S = 1.0       # the batch-limit search stops doubling after a call this slow
#: Checks that only make sense on some frameworks: a backend runs those it lists in
#: ``Backend.layer_checks()``; on the others they are reported as not applicable.
_FRAMEWORK_CHECKS = ("export", "retracing")
_NO_NONE_BATCH = "the layer does not build and run with a None batch (see dynamic_batch)"
_NO_BATCH_DIM = "the output has no batch dimension"


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def check(model_or_layer: Any, input_shape: Any = None, *, sample: Any = None,
          layers: Sequence[str] | None = None, max_batch: int = 1024) -> CheckResult:
    """Check that a model's custom layers (or one layer) honour the batch contract.

    Given a ``keras.Model``, finds its custom (non-Keras) layers, including those inside nested
    models (a functional or Sequential model, a KerasHub backbone say, is a container: its
    third-party layers are checked, Keras's own code never), and checks each alone on the
    inputs it receives in the model. Each custom layer is checked or listed in
    ``result.skipped`` with the reason. Given a
    ``keras.layers.Layer``, checks that layer (Keras's own layers included) on ``input_shape``
    or ``sample``. The seven checks are described in :mod:`batchfit.verbs.check`.

    Args:
        model_or_layer: a ``keras.Model``, a ``keras.layers.Layer``, or a model spec string
            (``"path/file.py:factory"``, ``"package.module:factory"``, ``"model.keras"``).
        input_shape: for a layer, the shape of one example without the batch dimension
            (a leading ``None`` is dropped), or a list/dict of shapes for several inputs.
            Optional when ``sample`` is given or the layer is already built. For a model
            that does not expose its inputs (subclassed), the shape of its inputs, as
            ``input_shapes`` elsewhere in batchfit; for a model with ``None`` dimensions (a
            sequence length), a dict by input name (``{"token_ids": (128,)}``): the model is
            called on inputs of these shapes and each layer, however nested, is checked on
            what it receives. ``None`` dimensions not given are taken as 8. Default None.
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
    start = time.perf_counter()
    check_int("max_batch", max_batch, minimum=2)
    backend = get_backend()
    obj = backend.load_checkable(model_or_layer) if isinstance(model_or_layer, str) \
        else model_or_layer
    notes: list[str] = []
    skipped: list[tuple[str, str, str]] = []
    name, targets = backend.check_targets(obj, input_shape, sample, notes, skipped)
    targets = _only_named(targets, layers, [s[0] for s in skipped])
    if not targets and not skipped:
        notes.append("no custom layers found: Keras's own layers are tested by Keras. Check one "
                     "of them with batchfit.check(layer, input_shape=...).")
    findings: list[Finding] = []
    reports: list[LayerReport] = []
    with backend.quiet_check_logs():
        for layer, layer_input in targets:
            report, layer_findings = _check_layer(backend, layer, layer_input, max_batch)
            reports.append(report)
            findings.extend(layer_findings)
    return CheckResult(findings=findings, layers=reports, model_name=name,
                       seconds=round(time.perf_counter() - start, 2), notes=notes,
                       environment=backend.check_environment(),
                       skipped=[SkippedLayer(*s) for s in skipped
                                if layers is None or s[0] in layers])


def is_custom_layer(layer: Any) -> bool:
    """Whether ``layer``'s class is the user's (not Keras's or TensorFlow's own).

    Example:

    >>> import keras
    >>> is_custom_layer(keras.layers.Dense(2))
    False
    """
    return get_backend().is_custom_layer(layer)


def custom_layers(model: Any) -> list[Any]:
    """The custom layers of ``model``, looking inside nested Keras models (not custom layers).

    Example:

    >>> from batchfit.examples.models import seed_mlp
    >>> [type(layer).__name__ for layer in custom_layers(seed_mlp())]
    ['MyCustomLayer']
    """
    return get_backend().custom_layers(model)


def _only_named(targets: list[tuple[Any, Any]], names: Sequence[str] | None,
                skipped: Sequence[str] = ()) -> list[tuple[Any, Any]]:
    if names is None:
        return targets
    wanted = set(names)
    unknown = wanted - {layer.name for layer, _ in targets} - set(skipped)
    if unknown:
        raise InvalidInputError(
            f"no custom layer named {sorted(unknown)}; the custom layers are "
            f"{[layer.name for layer, _ in targets]}.")
    return [(layer, spec) for layer, spec in targets if layer.name in wanted]


# --------------------------------------------------------------------------------------------
# What every check gets and gives
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerContext:
    """What the checks of one layer read: the backend's probe of it and how to report it.

    Args:
        probe: the backend's operations on the layer (:meth:`Backend.layer_probe`).
        name: the layer's name.
        class_name: ``module.QualName`` of its class (``QualName`` for a file spec's class).
        location: ``file:line`` of its ``call``, or ``""``.
        layer_class: its class (for the source scan).
        custom: whether the class is the user's (not Keras's).
        input_text: the input it is checked with, for messages.
        elements: elements of one example, over all inputs.
        max_batch: the largest batch the batch-limit search tries.
    """

    probe: Any
    name: str
    class_name: str
    location: str
    layer_class: type
    custom: bool
    input_text: str
    elements: int
    max_batch: int

    def finding(self, check: str, severity: str, message: str, fix: str = "",
                location: str | None = None) -> Finding:
        """A finding about this layer (at its ``call`` unless ``location`` is given)."""
        return Finding(self.name, check, severity, message,
                       self.location if location is None else location, fix)

    def sizes(self, wanted: Sequence[int], limit: int | None) -> list[int]:
        """``wanted`` capped at the layer's batch limit (or ``max_batch``), deduplicated."""
        cap = limit if limit is not None else self.max_batch
        out: list[int] = []
        for s in wanted:
            s = min(s, cap)
            if s >= 1 and s not in out:
                out.append(s)
        return out


@dataclass
class Outcome:
    """What one step gives: a value for the steps that depend on it, and what it found.

    Args:
        value: what dependent steps receive (None: it could not tell; they may be skipped).
        findings: findings, each naming its check.
        details: check -> a short measurement for the report.
        skipped: the reason the step skipped itself (its check is reported ``skipped``).
    """

    value: Any = None
    findings: list[Finding] = field(default_factory=list)
    details: dict[str, str] = field(default_factory=dict)
    skipped: str | None = None


@dataclass(frozen=True)
class EagerCalls:
    """The first eager calls: the batch sizes that ran, and the traces they caused."""

    sizes: list[int]
    traces: int
    functions: dict[str, int]


@dataclass(frozen=True)
class DynamicBatch:
    """Whether the layer builds with a ``None`` batch and keeps the batch dimension."""

    builds: bool
    keeps_batch: bool


# --------------------------------------------------------------------------------------------
# The checks, one function each
# --------------------------------------------------------------------------------------------

def eager_calls(ctx: LayerContext) -> Outcome:
    """Call the layer eagerly at a few sizes, before anything else traced them (builds it).

    Raises:
        LayerBuildError: it fails at 2 and at 1 examples: the layer's own problem.
    """
    probe = ctx.probe
    snap = probe.trace_snapshot()
    ran: list[int] = []
    first_error: BaseException | None = None
    for b in _EAGER_SIZES:
        try:
            probe.run(b, seed=b)
            ran.append(b)
        except Exception as exc:  # noqa: BLE001 - classified below
            if b in (2, 1) and not ran:
                first_error = first_error or exc
                continue
            break
    if not ran:
        where = f" ({ctx.location})" if ctx.location else ""
        raise LayerBuildError(
            f"layer '{ctx.name}' ({ctx.class_name}){where} fails on an ordinary batch of 2 "
            f"(and of 1) with inputs {ctx.input_text}: "
            f"{type(first_error).__name__}: {error_line(first_error)}. Fix the layer, or "
            "pass the input shape it expects (input_shape=..., --input-shape).") \
            from first_error
    probe.remember_weights()  # built by now: what to restore, unless built before the checks
    traces, fns = probe.traces_since(snap)
    return Outcome(EagerCalls(ran, traces, fns), details={"eager sizes": ",".join(map(str, ran))})


def check_batch_limit(ctx: LayerContext) -> Outcome:
    """7. Double the batch up to ``max_batch``; where the layer refuses, bisect to its limit.

    The value is the limit (None when there is none).
    """
    cap = max(2, min(ctx.max_batch, _MAX_ELEMENTS // max(1, ctx.elements)))
    last_ok, failed, error, detail = _grow_until_refused(ctx.probe, cap)
    if failed is None:
        return Outcome(details={"batch_limit": detail or f"none up to {last_ok}"})
    if last_ok == 0:
        return Outcome(findings=[ctx.finding(
            "batch_limit", "error", f"fails at batch 1 ({type(error).__name__}: "
            f"{error_line(error)})", "make the layer work for a single example")])
    lo, error = _bisect_limit(ctx.probe, last_ok, failed, error)
    text = f"{type(error).__name__}: {error_line(error)}"
    clear = ctx.probe.is_refusal_error(error) and any(ch.isdigit() for ch in str(error))
    if clear:
        found = ctx.finding("batch_limit", "info",
                            f"refuses batches above {lo} with a clear error ({text}) and works "
                            f"at {lo} and below")
    else:
        found = ctx.finding("batch_limit", "warning",
                            f"fails for batches above {lo} with an unclear error ({text})",
                            "if the limit is deliberate, raise ValueError naming it (in graph "
                            "mode: tf.debugging.assert_less_equal(tf.shape(x)[0], limit, "
                            "message=...))")
    return Outcome(lo, [found], {"batch_limit": str(lo)})


def _grow_until_refused(probe: Any, cap: int) -> tuple[int, int | None, Any, str | None]:
    """``(last size that ran, first refused or None, its error, detail)``, doubling from 1."""
    last_ok, b = 0, 1
    while b <= cap:
        started = time.perf_counter()
        try:
            probe.run(b, seed=b)
        except Exception as exc:  # noqa: BLE001 - a refusal, classified by the caller
            if probe.is_out_of_memory(exc):
                return last_ok, None, None, f"out of memory at {b}: no limit of its own below"
            return last_ok, b, exc, None
        last_ok = b
        if time.perf_counter() - started > _SLOW_CALL_S:
            return last_ok, None, None, f"none up to {b} (larger calls would be slow)"
        if b == cap:
            break
        b = min(b * 2, cap)
    return last_ok, None, None, None


def _bisect_limit(probe: Any, lo: int, hi: int, error: Any) -> tuple[int, Any]:
    """The largest size in ``[lo, hi)`` that runs (``lo`` runs, ``hi`` does not), and the
    error of the smallest that does not."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            probe.run(mid, seed=mid)
            lo = mid
        except Exception as exc:  # noqa: BLE001
            hi, error = mid, exc
    return lo, error


def check_static_shape(ctx: LayerContext) -> Outcome:
    """3. Scan the source of ``call`` (and same-module helpers) for static batch reads.

    The value is the reads found (``[]`` for Keras's own layers, which are not scanned).
    """
    if not ctx.custom:
        return Outcome([], skipped="Keras's own layer")
    owner = method_owner(ctx.layer_class, "call")
    if owner is not None and is_framework_class(owner):
        return Outcome([], skipped=f"its call is Keras's own ({owner.__module__}."
                                   f"{owner.__qualname__}), not scanned")
    uses = scan_class(ctx.layer_class)
    findings = [ctx.finding("static_shape", "warning",
                            f"{use.message} (in {use.function}: {use.code})", use.fix,
                            location=use.location) for use in uses]
    return Outcome(uses, findings, {"static_shape": f"{len(uses)} static batch read(s)"})


def _dynamic_fix(exc: BaseException | None, static_uses: Sequence[StaticShapeUse]) -> str:
    if exc is not None and "OperatorNotAllowedInGraph" in type(exc).__name__:
        return ("a Python `if`/`for` on a tensor only runs eagerly: use "
                "tf.debugging.assert_less_equal(tf.shape(x)[0], limit, message=...) or "
                "keras.ops.cond")
    if static_uses:
        lines = ", ".join(u.location for u in static_uses[:3])
        return f"read the batch size with tf.shape(x)[0] / keras.ops.shape(x)[0] (see {lines})"
    return ("make call() work with an unknown batch: read sizes with tf.shape(x) / "
            "keras.ops.shape(x), never x.shape[0]")


def check_dynamic_batch(ctx: LayerContext, limit: int | None,
                        static_uses: Sequence[StaticShapeUse]) -> Outcome:
    """1. Build with a ``None`` batch; run eagerly at 1, 2, 7 and 64 (under the limit).

    The value is a :class:`DynamicBatch`.
    """
    try:
        dims = ctx.probe.build()
    except Exception as exc:  # noqa: BLE001 - the finding
        return Outcome(DynamicBatch(False, True), [ctx.finding(
            "dynamic_batch", "error", f"fails to build with a None batch dimension "
            f"(keras.Input): {type(exc).__name__}: {error_line(exc)}",
            _dynamic_fix(exc, static_uses))])
    fixed = [d for d in dims if is_int(d)]
    if fixed or "absent" in dims:
        got = fixed[0] if fixed else "absent"
        return Outcome(DynamicBatch(True, False), [ctx.finding(
            "dynamic_batch", "error", f"the output's batch dimension is {got} for an input "
            "batch of None: the layer reduces or reshapes across the batch axis",
            "keep axis 0 as the batch: reduce over axis=1 or later, reshape with "
            "tf.shape(x)[0]")])
    sizes = ctx.sizes([1, 2, 7, 64], limit)
    for b in sizes:
        try:
            out = ctx.probe.run(b, seed=100 + b)
        except Exception as exc:  # noqa: BLE001 - the finding
            return Outcome(DynamicBatch(True, True), [ctx.finding(
                "dynamic_batch", "error",
                f"fails at batch size {b}: {type(exc).__name__}: {error_line(exc)}",
                _dynamic_fix(exc, static_uses))])
        got = ctx.probe.output_batch_sizes(out)
        if any(g != b for g in got):
            return Outcome(DynamicBatch(True, False), [ctx.finding(
                "dynamic_batch", "error", f"output batch dimension {got[0]} for an input batch "
                f"of {b}", "keep axis 0 as the batch: reduce over axis=1 or later")])
    return Outcome(DynamicBatch(True, True),
                   details={"dynamic_batch": "None, " + ", ".join(map(str, sizes))})


def check_traced(ctx: LayerContext, dynamic: DynamicBatch, limit: int | None,
                 static_uses: Sequence[StaticShapeUse]) -> Outcome:
    """1 (traced part). Run in one compiled function (``tf.function(reduce_retracing=True)``)
    over several sizes; a failure is a ``dynamic_batch`` finding.

    The value is the number of traces (None if it failed).
    """
    run = ctx.probe.traced()
    snap = ctx.probe.trace_snapshot()
    for b in ctx.sizes([1, 2, 7, 16, 3], limit):
        try:
            run(b, seed=200 + b)
        except Exception as exc:  # noqa: BLE001 - the finding
            return Outcome(None, [ctx.finding(
                "dynamic_batch", "error", f"runs eagerly but fails in a traced function "
                f"(tf.function) at batch {b}: {type(exc).__name__}: {error_line(exc)}",
                _dynamic_fix(exc, static_uses))])
    traces, _ = ctx.probe.traces_since(snap)
    return Outcome(traces)


def check_sample_mixing(ctx: LayerContext, dynamic: DynamicBatch, limit: int | None) -> Outcome:
    """4. Does output sample 0 depend on the other samples, in inference and in training?"""
    b = min(4, limit if limit is not None else 4)
    if b < 2:
        return Outcome(skipped="the layer takes one example at a time")
    results = {training: ctx.probe.mixing(b, training) for training in (False, True)}
    details = {"sample_mixing": ", ".join(
        f"{'training' if t else 'inference'}: {'-' if r is None else f'{r:.1e}'}"
        for t, r in results.items())}
    return Outcome(findings=_mixing_findings(ctx, results[False], results[True]),
                   details=details)


def _mixing_findings(ctx: LayerContext, inference: float | None,
                     training: float | None) -> list[Finding]:
    if (inference or 0) > _REL_TOL:
        return [ctx.finding(
            "sample_mixing", "warning",
            f"in inference, output sample 0 depends on the other samples of the batch "
            f"(relative dependence {inference:.1e}): results change with the batch "
            "size and a batch of 1 behaves differently",
            "compute per sample (reduce over axis=1 or later, never axis=0); if "
            "mixing is intended, document it")]
    if (training or 0) <= _REL_TOL:
        return []
    if ctx.probe.has_batchnorm():
        return [ctx.finding(
            "sample_mixing", "info",
            "in training, output samples depend on each other through "
            "BatchNormalization's batch statistics (expected; inference is "
            "per sample). Small batches make those statistics noisy")]
    return [ctx.finding(
        "sample_mixing", "warning",
        f"in training, output sample 0 depends on the other samples of the "
        f"batch (relative gradient {training:.1e}): the loss changes "
        "with the batch size and a batch of 1 behaves differently",
        "compute per sample (reduce over axis=1 or later, never axis=0)")]


def build_wrapper(ctx: LayerContext, traced: int | None) -> Outcome:
    """A functional model of the layer alone (``None`` batch), for ``fit`` and export."""
    return Outcome(ctx.probe.wrapper(ctx.name))


def check_partial_batch(ctx: LayerContext, wrapper: Any, limit: int | None,
                        static_uses: Sequence[StaticShapeUse]) -> Outcome:
    """2. ``fit`` on datasets whose size the batch size does not divide (8 and 5).

    The value is the traces ``fit`` caused (None if it did not run through).
    """
    targets = ctx.probe.prepare_fit(wrapper)
    if targets is None:
        return Outcome(skipped="the layer has non-float outputs, nothing to train")
    snap = ctx.probe.trace_snapshot()
    plan = [(b, 2 * b + max(1, b // 2)) for b in ctx.sizes([8, 5], limit) if b >= 2]
    if not plan:
        return Outcome(skipped=f"the layer's batch limit ({limit}) is below 2")
    for b, n in plan:
        try:
            ctx.probe.fit(wrapper, targets, b, n)
        except Exception as exc:  # noqa: BLE001 - the finding
            return Outcome(None, [ctx.finding(
                "partial_batch", "error", f"fit fails on {n} samples with batch_size={b} (last "
                f"batch of {n % b}): {type(exc).__name__}: {error_line(exc)}",
                _dynamic_fix(exc, static_uses))])
    traces, _ = ctx.probe.traces_since(snap)
    detail = "; ".join(f"{n} samples / batch {b}" for b, n in plan)
    compiled = getattr(ctx.probe, "fit_traces", None)  # JAX: one program per batch shape
    if compiled is not None:
        detail += (f"; fit traced the layer {compiled} times (JAX compiles one program per "
                   f"batch shape: each partial last batch is a program of its own)")
    return Outcome(traces, details={"partial_batch": detail})


def check_export(ctx: LayerContext, wrapper: Any, limit: int | None) -> Outcome:
    """6. Export the layer (SavedModel on TensorFlow) and serve batch sizes 1 and 3."""
    sizes = ctx.sizes([1, 3], limit)
    problem = ctx.probe.export_problem(wrapper, sizes)
    if problem is not None:
        message, fix = problem
        return Outcome(findings=[ctx.finding("export", "error", message, fix)])
    return Outcome(details={"export": "None batch; served " + ", ".join(map(str, sizes))})


def check_retracing(ctx: LayerContext, eager: EagerCalls, traced: int | None,
                    fit: int | None) -> Outcome:
    """5. Traces of the layer's code: eagerly (its own tf.functions), in a compiled function
    and in ``fit``; more than Keras's usual two is a warning."""
    parts = [f"eager {eager.traces}"]
    if traced is not None:
        parts.append(f"tf.function {traced}")
    if fit is not None:
        parts.append(f"fit {fit}")
    findings = []
    if eager.traces > _USUAL_TRACES:
        fns = eager.functions
        culprit = max(fns, key=lambda k: fns[k]) if fns else "call"
        findings.append(ctx.finding(
            "retracing", "warning",
            f"called eagerly at {len(eager.sizes)} batch sizes, '{culprit}' traced "
            f"{eager.traces} times (Keras's usual is at most {_USUAL_TRACES}): a tf.function "
            "that gets a new Python value or a new shape for every batch size",
            "pass tensors, not Python ints, to tf.functions (tf.shape(x)[0], not "
            "keras.ops.shape(x)[0], which is a Python int when eager), or use "
            "@tf.function(reduce_retracing=True)"))
    for what, n in (("under tf.function(reduce_retracing=True)", traced), ("in fit", fit)):
        if n is not None and n > _USUAL_TRACES:
            findings.append(ctx.finding(
                "retracing", "warning",
                f"{what}, the layer's Python code was traced {n} times over several "
                f"batch sizes (usual: at most {_USUAL_TRACES})",
                "avoid Python values derived from the batch (x.shape[0], int(...)) "
                "in call; read sizes with tf.shape(x)"))
    return Outcome(findings=findings, details={"retracing": "traces: " + ", ".join(parts)})


# --------------------------------------------------------------------------------------------
# The runner: the order, and what each check needs
# --------------------------------------------------------------------------------------------

def _if_builds(dynamic: DynamicBatch, *_: Any) -> str | None:
    return None if dynamic.builds and dynamic.keeps_batch else _NO_NONE_BATCH


def _if_keeps_batch(dynamic: DynamicBatch, *_: Any) -> str | None:
    return None if dynamic.keeps_batch else _NO_BATCH_DIM


def _if_present(value: Any, *_: Any) -> str | None:
    return None if value is not None else _NO_NONE_BATCH


@dataclass(frozen=True)
class Step:
    """One step of a layer's check: a check of :data:`CHECKS` or a step they share.

    Args:
        name: the check it reports (or ``eager``, ``traced``, ``wrapper``: shared steps).
        run: ``run(ctx, *values of needs) -> Outcome``.
        needs: the steps whose values it takes, in order.
        skip_unless: given those values, the reason to skip it (None: run it).
    """

    name: str
    run: Callable[..., Outcome]
    needs: tuple[str, ...] = ()
    skip_unless: Callable[..., str | None] | None = None


#: The steps in the order they run. Eager calls come first, before anything else traced the
#: sizes (their trace counts are retracing's); the batch limit caps the sizes of later steps.
STEPS: tuple[Step, ...] = (
    Step("eager", eager_calls),
    Step("batch_limit", check_batch_limit),
    Step("static_shape", check_static_shape),
    Step("dynamic_batch", check_dynamic_batch, ("batch_limit", "static_shape")),
    Step("traced", check_traced, ("dynamic_batch", "batch_limit", "static_shape"), _if_builds),
    Step("sample_mixing", check_sample_mixing, ("dynamic_batch", "batch_limit"),
         _if_keeps_batch),
    Step("wrapper", build_wrapper, ("traced",), _if_present),
    Step("partial_batch", check_partial_batch, ("wrapper", "batch_limit", "static_shape"),
         _if_present),
    Step("export", check_export, ("wrapper", "batch_limit"), _if_present),
    Step("retracing", check_retracing, ("eager", "traced", "partial_batch")),
)


@dataclass
class _Record:
    """Findings, statuses and details of one layer, as the steps report them."""

    findings: list[Finding] = field(default_factory=list)
    statuses: dict[str, str] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, outcome: Outcome) -> None:
        order = {"error": 0, "warning": 1, "info": 2, "ok": 3}
        for f in outcome.findings:
            self.findings.append(f)
            if order.get(f.severity, 3) < order.get(self.statuses.get(f.check, "ok"), 3):
                self.statuses[f.check] = f.severity
        self.details.update(outcome.details)
        if outcome.skipped is not None:
            self.skip(name, outcome.skipped)

    def skip(self, name: str, reason: str) -> None:
        if name in CHECKS:
            self.statuses[name] = f"skipped: {reason}"


def run_steps(ctx: LayerContext, steps: Sequence[Step] = STEPS,
              applicable: Sequence[str] = _FRAMEWORK_CHECKS,
              backend_name: str = "") -> _Record:
    """Run ``steps`` in order, each given the values of the steps it needs.

    A step whose prerequisites rule it out (``skip_unless``) is skipped with the reason, and
    its value is None for the steps after it. A framework-specific check the backend does not
    run (not in ``applicable``) is skipped as not applicable.

    Args:
        ctx: the layer's :class:`LayerContext`, passed to every step.
        steps: the steps, in order (default :data:`STEPS`).
        applicable: the framework-specific checks the backend runs
            (``Backend.layer_checks()``); default: all.
        backend_name: the backend's name, for "not applicable" reasons.

    Returns:
        The findings, statuses (check -> severity or ``"skipped: <reason>"``; checks with
        neither are ok) and details of the layer.

    Example:

    >>> steps = (Step("batch_limit", lambda ctx: Outcome(8, details={"batch_limit": "8"})),
    ...          Step("sample_mixing", lambda ctx, limit: Outcome(skipped=f"limit {limit}"),
    ...               ("batch_limit",)))
    >>> run_steps(None, steps).statuses
    {'sample_mixing': 'skipped: limit 8'}
    """
    values: dict[str, Any] = {}
    record = _Record()
    for step in steps:
        args = [values[n] for n in step.needs]
        reason = step.skip_unless(*args) if step.skip_unless else None
        if reason is None and step.name in _FRAMEWORK_CHECKS and step.name not in applicable:
            reason = f"not applicable on the {backend_name} backend"
        if reason is not None:
            values[step.name] = None
            record.skip(step.name, reason)
            continue
        outcome = step.run(ctx, *args)
        values[step.name] = outcome.value
        record.add(step.name, outcome)
    return record


def _check_layer(backend: Backend, layer: Any, layer_input: Any,
                 max_batch: int) -> tuple[LayerReport, list[Finding]]:
    start = time.perf_counter()
    cls = type(layer)
    module = cls.__module__ or ""
    class_name = (cls.__qualname__ if module.startswith("_batchfit_user_")
                  else f"{module}.{cls.__qualname__}")
    where = locate_method(cls, "call")
    probe = backend.layer_probe(layer, layer_input)
    ctx = LayerContext(probe=probe, name=layer.name, class_name=class_name,
                       location=format_location(*where) if where else "", layer_class=cls,
                       custom=backend.is_custom_layer(layer),
                       input_text=layer_input.shapes_text(), elements=layer_input.elements(),
                       max_batch=max_batch)
    with probe.keep_state():
        record = run_steps(ctx, STEPS, backend.layer_checks(), backend.name)
    order = {c: i for i, c in enumerate(CHECKS)}
    findings = sorted(record.findings, key=lambda f: order.get(f.check, 99))
    report = LayerReport(layer=ctx.name, class_name=class_name, location=ctx.location,
                         input_shape=layer_input.describe(),
                         statuses={c: record.statuses.get(c, "ok") for c in CHECKS},
                         details=dict(record.details),
                         seconds=round(time.perf_counter() - start, 2))
    return report, findings
