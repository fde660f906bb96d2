"""What ``batchfit check`` checks: the custom layers of a model and the input each one gets.

Given a Keras model, its custom (non-Keras) layers, each with the input it receives in the
model; given a layer, that layer with an input built from ``input_shape`` or ``sample``.
A nested functional or Sequential model (a KerasHub backbone inside its task model, say) is a
container, not a layer: its ``call`` is Keras's own, so batchfit descends into its layers,
recursively, and checks the third-party ones. A layer's input is read from its first inbound
node; where that has a ``None`` dimension other than the batch (a sequence length), or there is
no node (a subclassed model), the model is called once eagerly on synthesized inputs of the
shapes given by input name (``input_shape={"token_ids": (128,)}``, ``--input-shape
token_ids=128``) and each layer's input is recorded, however deeply it is nested. The input is a :class:`LayerInput`: per-example shapes and
dtypes in the structure the layer takes, from which batches of any size are drawn.

Example:

>>> import keras
>>> layer, spec = check_targets(keras.layers.Dense(4), (8,), None, [])[1][0]
>>> spec.shapes, spec.batch(3).shape
([(8,)], (3, 8))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...core.static_scan import is_framework_class, method_owner
from ...core.validate import is_int
from ...errors import InvalidInputError, ModelLoadError
from ...results.check import error_line
from .keras_compat import build_shapes, inbound_nodes, is_graph_model

__all__ = ["LayerInput", "check_targets", "custom_layers", "is_custom_layer",
           "is_custom_layer_class", "load_checkable"]

_KERAS_ROOTS = ("keras", "tf_keras", "tensorflow")
_UNSEEN = ("batchfit could not see what it is called with (it is not called, or called with "
           "several positional inputs)")


def is_custom_layer(layer: Any) -> bool:
    """Whether ``layer``'s class is the user's (not Keras's or TensorFlow's own)."""
    module = type(layer).__module__ or ""
    return module.split(".")[0] not in _KERAS_ROOTS


def is_custom_layer_class(klass: type) -> bool:
    """Whether ``klass`` is the user's (not Keras's, TensorFlow's or a builtin)."""
    return (klass.__module__ or "").split(".")[0] not in _KERAS_ROOTS + ("builtins",)


def custom_layers(model: Any) -> list[Any]:
    """The custom layers of ``model``, looking inside nested Keras models: Keras's own, and
    functional or Sequential ones of any class (their ``call`` is Keras's, unless the class
    overrides it: then the model is a custom layer too); a subclassed model of the user's, with
    a ``call`` of its own, is a custom layer."""
    import keras

    found: list[Any] = []
    seen: set[int] = set()

    def visit(container: Any) -> None:
        for layer in getattr(container, "layers", []):
            if id(layer) in seen or isinstance(layer, keras.layers.InputLayer):
                continue
            seen.add(id(layer))
            if is_graph_model(layer):
                if _own_call(layer):
                    found.append(layer)  # a graph model with a call of its own: check it too
                visit(layer)
            elif is_custom_layer(layer):
                found.append(layer)
            elif isinstance(layer, keras.Model):
                visit(layer)

    visit(model)
    return found


def _own_call(layer: Any) -> bool:
    """Whether ``layer``'s ``call`` is third-party code (not inherited from Keras)."""
    owner = method_owner(type(layer), "call")
    return owner is not None and not is_framework_class(owner)


def load_checkable(spec: str) -> Any:
    """Load a model or a layer from a spec (a factory may return either; compiling is optional).

    Raises:
        ModelLoadError: see :func:`batchfit.backend.tensorflow.loader.load_model`; also when the
            factory returns something that is neither a model nor a layer.
    """
    import keras

    from .loader import load_object

    obj, where = load_object(spec)
    if not isinstance(obj, keras.layers.Layer):
        raise ModelLoadError(f"What the factory {where} returned is {describe(obj)}; batchfit "
                             "check needs a keras.Model or a keras.layers.Layer.")
    return obj


def describe(obj: Any) -> str:
    """``an object of type module.QualName``, for messages."""
    t = type(obj)
    return f"an object of type {t.__module__}.{t.__qualname__}"


def check_targets(obj: Any, input_shape: Any, sample: Any, notes: list[str],
                  skipped: list[tuple[str, str, str]] | None = None,
                  ) -> tuple[str, list[tuple[Any, LayerInput]]]:
    """``(name, [(layer, input), ...])``: what to check in ``obj``, a model or a layer.

    A model gives its custom layers (a subclassed model without custom sublayers is checked
    as one layer); a layer gives itself. Remarks go to ``notes``; each custom layer that
    cannot be checked goes to ``skipped`` as ``(name, class, reason)``.

    Raises:
        InvalidInputError: ``obj`` is neither a model nor a layer; a layer has no input shape.
    """
    import keras

    if isinstance(obj, keras.Model) and not _is_custom_model_checked_as_layer(obj):
        return obj.name, _model_targets(obj, input_shape, notes,
                                        skipped if skipped is not None else [])
    if isinstance(obj, keras.layers.Layer):
        return obj.name, [(obj, _layer_input(obj, input_shape, sample))]
    raise InvalidInputError(
        f"batchfit check takes a keras.Model or a keras.layers.Layer, got {describe(obj)}.")


# --------------------------------------------------------------------------------------------
# Input specs
# --------------------------------------------------------------------------------------------

@dataclass
class LayerInput:
    """The input one layer is checked with: a structure of leaves, per-example shapes."""

    template: Any
    shapes: list[tuple[int, ...]]
    dtypes: list[str]
    kwargs: dict[str, Any] = field(default_factory=dict)

    def batch(self, b: int, seed: int = 0) -> Any:
        """A batch of ``b`` random examples (integers 0/1 for integer inputs)."""
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
        """``keras.Input`` placeholders with a ``None`` batch."""
        import keras

        leaves = [keras.Input(shape, dtype=dtype) for shape, dtype in zip(self.shapes,
                                                                          self.dtypes)]
        return keras.tree.pack_sequence_as(self.template, leaves)

    def elements(self) -> int:
        """Elements of one example, over all inputs."""
        return sum(int(np.prod(s)) if s else 1 for s in self.shapes)

    def describe(self) -> list[Any]:
        """The per-example shape (a list of them for several inputs), for the report."""
        if len(self.shapes) == 1:
            return list(self.shapes[0])
        return [list(s) for s in self.shapes]

    def shapes_text(self) -> str:
        """``(16,) float32, ...``, for messages."""
        return ", ".join(f"{tuple(s)} {d}" for s, d in zip(self.shapes, self.dtypes))


def _fill(shape: Sequence[Any], what: str, notes: list[str] | None) -> tuple[int, ...]:
    dims = []
    for d in shape:
        if d is None:
            if notes is not None:
                notes.append(f"{what}: a None dimension other than the batch was taken as 8.")
            d = 8
        dims.append(int(d))
    return tuple(dims)


def _input_from_tensors(struct: Any, kwargs: dict[str, Any] | None, what: str,
                        notes: list[str] | None) -> LayerInput:
    import keras

    leaves = keras.tree.flatten(struct)
    shapes = [_fill(tuple(t.shape)[1:], what, notes) for t in leaves]
    dtypes = [str(getattr(t.dtype, "name", t.dtype)) for t in leaves]
    template = keras.tree.map_structure(lambda _: 0, struct)
    return LayerInput(template, shapes, dtypes, dict(kwargs or {}))


def _layer_input(layer: Any, input_shape: Any, sample: Any) -> LayerInput:
    import keras

    if sample is not None:
        leaves = keras.tree.flatten(sample)
        arrays = [np.asarray(a) for a in leaves]
        if any(a.ndim < 1 or a.shape[0] < 1 for a in arrays):
            raise InvalidInputError("sample must have a batch dimension of at least 1.")
        return LayerInput(keras.tree.map_structure(lambda _: 0, sample),
                          [tuple(a.shape[1:]) for a in arrays], [str(a.dtype) for a in arrays])
    if input_shape is None:
        shapes = build_shapes(layer)
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
        return LayerInput(template, shapes, ["float32"] * len(shapes))
    if _is_shape(input_shape):
        return LayerInput(0, [_shape_arg(input_shape)], ["float32"])
    shapes = [_shape_arg(s) for s in input_shape]
    return LayerInput(list(range(len(shapes))), shapes, ["float32"] * len(shapes))


def _is_shape(s: Any) -> bool:
    return is_int(s) or (isinstance(s, (tuple, list))
                         and all(d is None or is_int(d) for d in s))


def _shape_arg(s: Any) -> tuple[int, ...]:
    if is_int(s):
        s = (s,)
    s = tuple(s)
    if s and s[0] is None:
        s = s[1:]
    if any(d is None or not is_int(d) or d < 1 for d in s):
        raise InvalidInputError(f"input_shape {s!r}: give positive integers for every dimension "
                                "of one example (no batch dimension).")
    return tuple(int(d) for d in s)


def _is_custom_model_checked_as_layer(model: Any) -> bool:
    """A subclassed model with no custom sublayers: its own ``call`` is what to check."""
    return is_custom_layer(model) and not is_graph_model(model) and not custom_layers(model)


def class_name(layer: Any) -> str:
    """``module.QualName`` of the layer's class."""
    return f"{type(layer).__module__}.{type(layer).__qualname__}"


def _node_input(layer: Any) -> tuple[LayerInput | None, bool, list[str]]:
    """The input of the layer's first inbound node: ``(spec, has a None non-batch dimension,
    names of the tensor keyword arguments left out)``; spec None when there is no node or it
    takes several positional inputs."""
    import keras

    nodes = inbound_nodes(layer)
    args = getattr(nodes[0], "arguments", None) if nodes else None
    if args is None or len(args.args) != 1:
        return None, False, []
    kwargs = {k: v for k, v in args.kwargs.items() if not _has_tensor(v)}
    dropped = sorted(k for k in args.kwargs if k not in kwargs)
    has_none = any(d is None for t in keras.tree.flatten(args.args[0])
                   for d in tuple(t.shape)[1:])
    return _input_from_tensors(args.args[0], kwargs, "", None), has_none, dropped


def _model_targets(model: Any, input_shapes: Any, notes: list[str],
                   skipped: list[tuple[str, str, str]]) -> list[tuple[Any, LayerInput]]:
    layers = custom_layers(model)
    specs: dict[int, LayerInput] = {}
    partial: dict[int, Any] = {}
    dropped: dict[str, list[str]] = {}
    to_record = []
    for layer in layers:
        spec, has_none, left_out = _node_input(layer)
        if left_out:
            dropped[layer.name] = left_out
        if spec is not None and not has_none:
            specs[id(layer)] = spec
        else:
            partial[id(layer)] = spec
            to_record.append(layer)
    if to_record:
        recorded = _record_inputs(model, to_record, _call_shapes(model, input_shapes, notes),
                                  notes)
        for layer in to_record:
            if id(layer) in recorded:
                specs[id(layer)] = recorded[id(layer)]
            elif partial[id(layer)] is not None:
                args = inbound_nodes(layer)[0].arguments
                kwargs = {k: v for k, v in args.kwargs.items() if not _has_tensor(v)}
                specs[id(layer)] = _input_from_tensors(args.args[0], kwargs,
                                                       f"layer '{layer.name}'", notes)
            else:
                skipped.append((layer.name, class_name(layer), _UNSEEN))
    for name, left_out in dropped.items():
        notes.append(f"layer '{name}' is checked alone on its one positional input, without "
                     f"the tensors it also gets in the model ({', '.join(left_out)}).")
    return [(layer, specs[id(layer)]) for layer in layers if id(layer) in specs]


def _call_shapes(model: Any, input_shapes: Any, notes: list[str]) -> Any:
    """The shapes to call ``model`` with, by input name: those given, and for the other inputs
    with a ``None`` dimension the one shape given (when all given agree and the rank fits),
    else 8 for each ``None`` dimension (with a note)."""
    try:
        inputs = list(getattr(model, "inputs", None) or [])
    except Exception:  # noqa: BLE001 - a subclassed model has no inputs
        inputs = []
    if not inputs or (input_shapes is not None and not isinstance(input_shapes, dict)):
        return input_shapes
    given = {str(k): tuple(v) if isinstance(v, (tuple, list)) else (v,)
             for k, v in (input_shapes or {}).items()}
    shapes = set(given.values())
    common = next(iter(shapes)) if len(shapes) == 1 else None
    out: dict[str, Any] = dict(given)
    for t in inputs:
        name = str(getattr(t, "name", ""))
        declared = tuple(t.shape)[1:]
        if not name or name in given or None not in declared:
            continue
        if common is not None and len(common) == len(declared) and all(
                d is None or d == c for d, c in zip(declared, common)):
            out[name] = common
            notes.append(f"input '{name}' was given no shape: it took {common}, the shape "
                         "given for the other inputs.")
        else:
            out[name] = tuple(8 if d is None else d for d in declared)
            notes.append(f"input '{name}': a None dimension other than the batch was taken "
                         f"as 8 (give it with input_shape={{'{name}': ...}} or --input-shape "
                         f"{name}=...).")
    return out


def _has_tensor(v: Any) -> bool:
    import keras

    return any(hasattr(x, "shape") and hasattr(x, "dtype") for x in keras.tree.flatten(v))


def _record_inputs(model: Any, layers: list[Any], input_shapes: Any,
                   notes: list[str]) -> dict[int, LayerInput]:
    """Call a (subclassed) model once eagerly and record what each layer is called with."""
    from .synth import plan_synthesis

    try:
        x, _ = plan_synthesis(model, input_shapes).batch(2)
    except Exception as exc:  # noqa: BLE001 - reported as a note; the layers are skipped
        notes.append(f"could not synthesize an input for the model to see its layers' inputs "
                     f"({type(exc).__name__}: {error_line(exc)}); pass input_shape=.")
        return {}
    recorded: dict[int, LayerInput] = {}
    patched = []
    for layer in layers:
        orig = layer.call

        def recorder(*args: Any, __layer: Any = layer, __orig: Any = orig, **kwargs: Any) -> Any:
            if id(__layer) not in recorded and len(args) == 1:
                kw = {k: v for k, v in kwargs.items() if not _has_tensor(v) and k != "training"}
                recorded[id(__layer)] = _input_from_tensors(args[0], kw,
                                                            f"layer '{__layer.name}'", notes)
            return __orig(*args, **kwargs)

        object.__setattr__(layer, "call", recorder)
        patched.append(layer)
    try:
        model(x, training=False)
    except Exception as exc:  # noqa: BLE001 - reported as a note
        notes.append(f"calling the model eagerly to see its layers' inputs failed "
                     f"({type(exc).__name__}: {error_line(exc)}).")
    finally:
        for layer in patched:
            object.__delattr__(layer, "call")
    return recorded
