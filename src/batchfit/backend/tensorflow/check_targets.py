"""What ``batchfit check`` checks: the custom layers of a model and the input each one gets.

Given a Keras model, its custom (non-Keras) layers, nested models included, each with the
input it receives in the model (read from its first inbound node, or recorded by calling a
subclassed model once eagerly); given a layer, that layer with an input built from
``input_shape`` or ``sample``. The input is a :class:`LayerInput`: per-example shapes and
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

from ...core.validate import is_int
from ...errors import InvalidInputError, ModelLoadError
from ...results.check import error_line
from .keras_compat import build_shapes, inbound_nodes

__all__ = ["LayerInput", "check_targets", "custom_layers", "is_custom_layer",
           "is_custom_layer_class", "load_checkable"]

_KERAS_ROOTS = ("keras", "tf_keras", "tensorflow")


def is_custom_layer(layer: Any) -> bool:
    """Whether ``layer``'s class is the user's (not Keras's or TensorFlow's own)."""
    module = type(layer).__module__ or ""
    return module.split(".")[0] not in _KERAS_ROOTS


def is_custom_layer_class(klass: type) -> bool:
    """Whether ``klass`` is the user's (not Keras's, TensorFlow's or a builtin)."""
    return (klass.__module__ or "").split(".")[0] not in _KERAS_ROOTS + ("builtins",)


def custom_layers(model: Any) -> list[Any]:
    """The custom layers of ``model``, looking inside nested Keras models (not custom layers)."""
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


def check_targets(obj: Any, input_shape: Any, sample: Any,
                  notes: list[str]) -> tuple[str, list[tuple[Any, LayerInput]]]:
    """``(name, [(layer, input), ...])``: what to check in ``obj``, a model or a layer.

    A model gives its custom layers (a subclassed model without custom sublayers is checked
    as one layer); a layer gives itself. Remarks (a layer that could not be seen) go to
    ``notes``.

    Raises:
        InvalidInputError: ``obj`` is neither a model nor a layer; a layer has no input shape.
    """
    import keras

    if isinstance(obj, keras.Model) and not _is_custom_model_checked_as_layer(obj):
        return obj.name, _model_targets(obj, input_shape, notes)
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
    return is_custom_layer(model) and not custom_layers(model)


def _model_targets(model: Any, input_shapes: Any,
                   notes: list[str]) -> list[tuple[Any, LayerInput]]:
    targets: list[tuple[Any, LayerInput]] = []
    missing: list[Any] = []
    for layer in custom_layers(model):
        nodes = inbound_nodes(layer)
        spec = None
        if nodes:
            args = getattr(nodes[0], "arguments", None)
            if args is not None and len(args.args) == 1:
                kwargs = {k: v for k, v in args.kwargs.items() if not _has_tensor(v)}
                spec = _input_from_tensors(args.args[0], kwargs, f"layer '{layer.name}'", notes)
        if spec is None:
            missing.append(layer)
        else:
            targets.append((layer, spec))
    if missing:
        recorded = _record_inputs(model, missing, input_shapes, notes)
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
