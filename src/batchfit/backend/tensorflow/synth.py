"""Synthetic inputs and targets for a probe, derived from the model itself.

Without a sample of the user's data, batchfit still needs batches that the model trains on:
inputs of the model's shapes and dtypes (integer token and segment ids kept inside the
vocabulary of the Embedding they feed, so no index error; masks as masks: ones, with trailing
zeros of padding on some rows), and targets that suit the compiled loss (integer labels
for sparse categorical crossentropy, one-hot rows for categorical crossentropy, 0/1 for binary
crossentropy, ±1 for hinge...). Memory depends on shapes, not values, so this is enough to
measure it. Every guess made is recorded as a plain-language note.

:func:`plan_synthesis` inspects the model once and returns a picklable :class:`SynthesisPlan`;
:func:`synthesize_batch` and :func:`describe_synthesis` are the one-call forms (they cache the
plan per model, so calling them for each batch size is cheap).

Example:

>>> import keras
>>> from batchfit.backend.tensorflow.synth import synthesize_batch
>>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
>>> model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
>>> x, y = synthesize_batch(model, 8)
>>> x.shape, y.shape, int(y.max()) < 3
((8, 4), (8,), True)
"""

from __future__ import annotations

import collections.abc
import re
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...core.validate import check_int
from ...errors import InvalidInputError, error_line
from .data import DataSample, flatten_structure, pack_structure
from .keras_compat import build_shapes, inbound_nodes, keras_history_layer, sublayers

# Target kinds, by normalized loss name.
_LOSS_KINDS: dict[str, str] = {}
for _kind, _names in {
    # Circle (y_true: (batch,) labels) and CTC (y_true: (batch, max_length) labels) take
    # integer labels of the output's shape without its last axis, as sparse losses do.
    "sparse": ["sparse_categorical_crossentropy", "sparse_categorical_focal_crossentropy",
               "circle", "ctc"],
    "onehot": ["categorical_crossentropy", "categorical_focal_crossentropy",
               "categorical_hinge"],
    "prob": ["kl_divergence", "kld", "kullback_leibler_divergence", "kl_div"],
    "binary": ["binary_crossentropy", "binary_focal_crossentropy", "bce", "dice", "tversky"],
    "sign": ["hinge", "squared_hinge"],
    "count": ["poisson"],
    "positive": ["mean_squared_logarithmic_error", "msle",
                 "mean_absolute_percentage_error", "mape"],
    "real": ["mean_squared_error", "mse", "mean_absolute_error", "mae", "huber", "huber_loss",
             "log_cosh", "logcosh", "cosine_similarity"],
}.items():
    for _n in _names:
        _LOSS_KINDS[_n] = _kind

_KIND_TEXT = {
    "sparse": "integer class labels in [0, {c})",
    "onehot": "one-hot rows over {c} classes",
    "prob": "probability rows over {c} classes",
    "binary": "0/1 labels",
    "sign": "-1/+1 labels",
    "count": "non-negative counts (Poisson, mean 1)",
    "positive": "positive real values in [0.1, 1)",
    "real": "real values (standard normal)",
    "unknown": "real-valued targets in [0,1)",
    "zeros": "zeros (no loss on this output)",
}


@dataclass(frozen=True)
class InputSpec:
    """One model input, without the batch dimension.

    Attributes:
        name: the input's name (the dict key for dict inputs, else the ``keras.Input`` name).
        shape: the shape of one example (no batch dimension).
        dtype: the dtype name (``"float32"``, ``"int32"``...).
        int_high: for integer inputs (and float inputs that feed an Embedding), the exclusive
            upper bound of the synthesized whole numbers (the smallest vocabulary among the
            Embedding layers the input feeds), else ``None``.
        role: ``"mask"`` for an integer or boolean input named as a mask (``padding_mask``,
            ``attention_mask``, ``*_mask``) or passed to a layer as a ``*mask`` argument: it
            gets ones, each row of a sequence mask followed by zeros of padding (at least one
            1 per row, the first row unpadded); else ``None``.
    """

    name: str
    shape: tuple[int | None, ...]
    dtype: str
    int_high: int | None = None
    role: str | None = None


@dataclass(frozen=True)
class TargetSpec:
    """The synthesized target of one model output, without the batch dimension.

    Attributes:
        name: the output's name.
        shape: shape of one example's target.
        kind: one of ``sparse, onehot, prob, binary, sign, count, positive, real, unknown,
            zeros``.
        dtype: dtype of the target array.
        num_classes: number of classes for the classification kinds, else ``None``.
        loss: the loss's name as found, or ``None``.
    """

    name: str
    shape: tuple[int, ...]
    kind: str
    dtype: str = "float32"
    num_classes: int | None = None
    loss: str | None = None


@dataclass(frozen=True)
class SynthesisPlan:
    """Everything needed to synthesize batches for a model, as plain picklable data.

    Attributes:
        inputs: one :class:`InputSpec` per model input, in flattened order.
        input_template: the model's input structure (see
            :func:`batchfit.backend.tensorflow.data.flatten_structure`).
        targets: one :class:`TargetSpec` per model output, or ``None`` when the model takes
            no targets (its loss comes from ``add_loss``).
        target_template: the model's output structure, or ``None``.
        notes: plain-language notes on the guesses made.
    """

    inputs: tuple[InputSpec, ...]
    input_template: Any
    targets: tuple[TargetSpec, ...] | None
    target_template: Any
    notes: tuple[str, ...] = field(default=())

    def batch(self, batch_size: int, seed: int = 0) -> tuple[Any, Any]:
        """Synthesize ``(x, y)`` with ``batch_size`` examples.

        Args:
            batch_size: number of examples, >= 1.
            seed: random seed; the same seed gives the same batch.

        Returns:
            ``(x, y)``: ``x`` in the model's input structure (an array for a single input),
            ``y`` in its output structure, or ``None`` when the model takes no targets.

        Raises:
            InvalidInputError: if ``batch_size`` is not a positive integer.

        Example:

        >>> import keras
        >>> m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        >>> m.compile(optimizer="sgd", loss="mse")
        >>> plan_synthesis(m).batch(3)[1].shape
        (3, 1)
        """
        b = int(check_int("batch_size", batch_size, minimum=1))  # type: ignore[arg-type]
        rng = np.random.default_rng(seed)
        xs = [_make_input(spec, b, rng) for spec in self.inputs]
        x = pack_structure(self.input_template, xs)
        if self.targets is None:
            return x, None
        ys = [_make_target(t, b, rng) for t in self.targets]
        return x, pack_structure(self.target_template, ys)


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------

def input_specs(model: Any, input_shapes: Any = None) -> list[InputSpec]:
    """Describe the model's inputs, with every non-batch dimension known.

    The inputs come from ``model.input`` (functional models, and Sequential models that start
    with ``keras.Input``). Dimensions that are ``None`` other than the batch must be given in
    ``input_shapes``. A subclassed model exposes no inputs: pass ``input_shapes`` (its inputs are
    then taken as float32, or as integer tokens when the model has an Embedding layer) or pass
    your own ``data=``.

    Integer inputs get ``int_high``: the ``input_dim`` of the Embedding layer(s) they feed
    (followed through the functional graph, through layers that keep integer dtypes, into nested
    models and into custom layers that own Embeddings), so token ids get their vocabulary and
    segment ids theirs; when that cannot be told, the smallest ``input_dim`` of all the model's
    Embeddings; with no Embedding at all, 2. Integer and boolean masks (by name, or passed as a
    ``*mask`` argument) get ``role="mask"``: ones with trailing padding, never ids.

    Args:
        model: a ``keras.Model``.
        input_shapes: per-example shapes (without batch) to fill ``None`` dimensions: a dict
            keyed by input name (or position), a single tuple for a single-input model, or a
            list of tuples in input order. A shape may also be a bare int (``128``) for a
            one-dimensional input.

    Returns:
        One :class:`InputSpec` per input, in the model's flattened input order.

    Raises:
        InvalidInputError: if the model exposes no inputs and no ``input_shapes`` were given, if
            a ``None`` dimension is left unfilled, or if ``input_shapes`` does not match.

    Example:

    >>> import keras
    >>> inp = keras.Input((None,), dtype="int32", name="tokens")
    >>> out = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling1D()(
    ...     keras.layers.Embedding(7, 4)(inp)))
    >>> input_specs(keras.Model(inp, out), {"tokens": (16,)})
    [InputSpec(name='tokens', shape=(16,), dtype='int32', int_high=7, role=None)]
    """
    return list(_input_specs(model, input_shapes)[0])


def plan_synthesis(model: Any, input_shapes: Any = None) -> SynthesisPlan:
    """Inspect the model once: its inputs, its outputs and the compiled loss.

    Output shapes come from ``model.output`` when fully known, else from
    ``model.compute_output_spec`` on a batch of 1, else from calling the model eagerly on a
    synthesized batch of 1 (which works for subclassed models with Python control flow).

    Args:
        model: a compiled ``keras.Model``.
        input_shapes: see :func:`input_specs`.

    Returns:
        A :class:`SynthesisPlan`.

    Raises:
        InvalidInputError: see :func:`input_specs`; also when the model cannot run on a
            synthesized batch of 1 (so no output shape can be known).

    Example:

    >>> import keras
    >>> m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4)])
    >>> m.compile(optimizer="sgd", loss="categorical_crossentropy")
    >>> [t.kind for t in plan_synthesis(m).targets]
    ['onehot']
    """
    key = _cache_key(model, input_shapes)
    try:
        cached = _PLAN_CACHE.get(model)
    except TypeError:  # not weak-referenceable / hashable
        cached = None
    if cached is not None and cached[0] == key:
        return cached[1]
    plan = _plan(model, input_shapes)
    try:
        _PLAN_CACHE[model] = (key, plan)
    except TypeError:
        pass
    return plan


def synthesize_batch(model: Any, batch_size: int, *, input_shapes: Any = None,
                     seed: int = 0) -> tuple[Any, Any]:
    """Synthesize a training batch ``(x, y)`` for the model.

    Inputs follow the model's input shapes and dtypes (integer inputs stay inside the vocabulary
    of the Embedding they feed); targets suit the compiled loss: integer labels in ``[0, C)`` of
    shape ``output.shape[:-1]`` for sparse categorical crossentropy, one-hot (probability) rows
    for categorical crossentropy / KL divergence, 0/1 floats for binary (focal) crossentropy,
    ±1 for hinge, non-negative counts for Poisson, standard normal values for regression losses
    and uniform ``[0, 1)`` values for unknown or custom losses. Without a compiled loss (the
    model uses ``add_loss``), ``y`` is ``None``. See :func:`describe_synthesis` for the notes.

    Args:
        model: a compiled ``keras.Model``.
        batch_size: number of examples, >= 1.
        input_shapes: see :func:`input_specs`.
        seed: random seed; the same seed gives the same batch.

    Returns:
        ``(x, y)`` NumPy arrays: ``x`` an array for a single-input model, else a list/dict
        matching the model's inputs; ``y`` likewise for the outputs, or ``None``.

    Raises:
        InvalidInputError: see :func:`plan_synthesis`.

    Example:

    >>> import keras
    >>> m = keras.Sequential([keras.Input((5,)), keras.layers.Dense(1, activation="sigmoid")])
    >>> m.compile(optimizer="sgd", loss="binary_crossentropy")
    >>> x, y = synthesize_batch(m, 4, seed=1)
    >>> sorted(set(y.ravel().tolist())) <= [0.0, 1.0]
    True
    """
    return plan_synthesis(model, input_shapes).batch(batch_size, seed=seed)


def describe_synthesis(model: Any, input_shapes: Any = None) -> list[str]:
    """Plain-language notes on how inputs and targets are synthesized for the model.

    Args:
        model: a compiled ``keras.Model``.
        input_shapes: see :func:`input_specs`.

    Returns:
        One sentence per input and output, plus any guess made (unknown loss, vocabulary
        bound, assumed dtype...).

    Raises:
        InvalidInputError: see :func:`plan_synthesis`.

    Example:

    >>> import keras
    >>> m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> m.compile(optimizer="sgd", loss=lambda y, p: (y - p) ** 2)
    >>> any("unknown loss" in n for n in describe_synthesis(m))
    True
    """
    return list(plan_synthesis(model, input_shapes).notes)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------

_PLAN_CACHE: weakref.WeakKeyDictionary[Any, tuple[Any, SynthesisPlan]] = \
    weakref.WeakKeyDictionary()



def batch_fn_for(model: Any, data: Any, input_shapes: Any, seed: int,
                 load_data: Any) -> tuple[Any, list[str]]:
    """Every backend's ``make_batch_fn``: batches synthesized from ``model``'s inputs and loss
    when ``data`` is ``None``, else drawn from the user's sample (a ``'file.py:function'`` spec
    is read with ``load_data``); returns ``(batch_fn, notes)``."""
    if data is None:
        notes = list(describe_synthesis(model, input_shapes=input_shapes))
        return ((lambda b: synthesize_batch(model, b, input_shapes=input_shapes, seed=seed)),
                notes)
    if isinstance(data, str):
        data = load_data(data)
    sample = data if isinstance(data, DataSample) else DataSample.from_data(data)
    return sample.batch, list(sample.notes)

def _cache_key(model: Any, input_shapes: Any) -> tuple[Any, ...]:
    return (repr(input_shapes), id(getattr(model, "loss", None)),
            repr(getattr(model, "loss", None)), bool(getattr(model, "compiled", False)))


def _model_input_struct(model: Any) -> Any:
    """The model's symbolic input structure, or None when it exposes none."""
    try:
        struct = model.input
    except (AttributeError, ValueError):
        struct = None
    if struct is None:
        try:
            inputs = model.inputs
        except (AttributeError, ValueError):
            inputs = None
        if inputs:
            struct = inputs[0] if len(inputs) == 1 else list(inputs)
    return struct


def _input_specs(model: Any, input_shapes: Any) -> tuple[list[InputSpec], Any, list[str]]:
    import keras

    if not isinstance(model, keras.Model):
        raise InvalidInputError(
            f"Expected a keras.Model, got {type(model).__module__}.{type(model).__qualname__}.")
    notes: list[str] = []
    struct = _model_input_struct(model)
    if struct is None:
        return _specs_without_graph(model, input_shapes, notes)
    tensors, template = flatten_structure(struct)
    names, aliases = _input_names(struct, tensors)
    given = {aliases.get(k, k): v for k, v in _normalize_shapes(input_shapes, names).items()}
    embeddings = _all_embeddings(model)
    consumers = _consumer_map(model)
    specs = []
    for i, (t, name) in enumerate(zip(tensors, names)):
        declared = tuple(t.shape[1:])
        dtype = str(getattr(t.dtype, "name", t.dtype))
        shape = _fill_shape(name, declared, given.get(name, given.get(str(i))), len(tensors))
        if dtype == "string":
            raise InvalidInputError(
                f"Input '{name}' takes strings: batchfit cannot synthesize text. Pass data= "
                "with a sample of your own inputs.")
        int_high = None
        mask_how = _mask_use(name, t, consumers) if _is_int(dtype) or dtype == "bool" else None
        if mask_how is not None:
            padded = (", with trailing zeros of padding on every row but the first (at least "
                      "half the steps kept)") if len(shape) == 1 and shape[0] >= 2 else ""
            notes.append(f"input '{name}' {shape} {dtype}: a mask ({mask_how}): ones{padded}.")
            specs.append(InputSpec(name=name, shape=shape, dtype=dtype, role="mask"))
            continue
        if _is_int(dtype):
            int_high, how = _int_high_for(t, consumers, embeddings)
            notes.append(f"input '{name}' {shape} {dtype}: random integers in [0, {int_high}) "
                         f"({how}).")
        elif dtype == "bool":
            notes.append(f"input '{name}' {shape} bool: random booleans.")
        else:
            high, how = _int_high_for(t, consumers, embeddings, strict=True)
            if high != 2 or how.startswith("the vocabulary"):
                int_high = high
                notes.append(f"input '{name}' {shape} {dtype} feeds an Embedding: random whole "
                             f"numbers in [0, {int_high}) ({how}).")
            else:
                notes.append(f"input '{name}' {shape} {dtype}: standard normal values.")
        specs.append(InputSpec(name=name, shape=shape, dtype=dtype, int_high=int_high))
    unknown = set(given) - set(names) - {str(i) for i in range(len(names))}
    if unknown:
        raise InvalidInputError(
            f"input_shapes names {sorted(unknown)}, which the model does not have; its inputs "
            f"are {names}.")
    return specs, template, notes


def _input_names(struct: Any, tensors: list[Any]) -> tuple[list[str], dict[str, str]]:
    """Display names of the inputs, and aliases (tensor / InputLayer names) -> display name."""
    aliases: dict[str, str] = {}
    if isinstance(struct, dict):
        names = [str(k) for k in sorted(struct, key=str)]  # flatten order: sorted keys
    else:
        names = []
        for i, t in enumerate(tensors):
            n = str(getattr(t, "name", None) or f"input_{i}")
            layer_name = getattr(keras_history_layer(t), "name", None)
            if n.startswith("keras_tensor") and layer_name:
                n = str(layer_name)  # unnamed keras.Input: show "input_layer", not a tensor id
            names.append(n)
        if len(set(names)) != len(names):
            names = [f"{n}_{i}" for i, n in enumerate(names)]
    for n, t in zip(names, tensors):
        tensor_name = getattr(t, "name", None)
        layer_name = getattr(keras_history_layer(t), "name", None)
        for alias in (tensor_name, layer_name):
            if alias and str(alias) not in names:
                aliases.setdefault(str(alias), n)
    return names, aliases


def _specs_without_graph(model: Any, input_shapes: Any,
                         notes: list[str]) -> tuple[list[InputSpec], Any, list[str]]:
    """Subclassed (or never-built Sequential) model: inputs from ``input_shapes``, or from the
    shape the model was first called with."""
    if input_shapes is None:
        built = _built_input_shape(model)
        if built is not None:
            notes.append(f"the model does not expose its inputs; using the shape it was built "
                         f"with, {built} per example (pass input_shapes= to change it).")
            input_shapes = built
    if input_shapes is None:
        kind = type(model).__name__
        raise InvalidInputError(
            f"The model ({kind}) does not expose its inputs (a subclassed model, or a Sequential "
            "without keras.Input), so batchfit cannot synthesize a batch for it. Pass data= "
            "with a sample of your own (x, y), or input_shapes= with the shape of one example, "
            "e.g. input_shapes=(32, 32, 3) in Python or --input-shape 32,32,3 on the CLI.")
    if isinstance(input_shapes, dict):
        names = sorted((str(k) for k in input_shapes), key=str)
        by_name = {str(k): v for k, v in input_shapes.items()}
        shapes = [by_name[n] for n in names]
        template = flatten_structure({n: 0 for n in names} if len(names) > 1 else 0)[1]
    elif _is_shape(input_shapes):
        names, shapes = ["input"], [input_shapes]
        template = flatten_structure(0)[1]
    else:
        shapes = list(input_shapes)
        names = [f"input_{i}" for i in range(len(shapes))]
        template = flatten_structure(list(range(len(shapes))))[1]
    embeddings = _all_embeddings(model)
    specs = []
    for name, shape in zip(names, shapes):
        shape = _as_shape(name, shape)
        if embeddings:
            high = min(e.input_dim for e in embeddings)
            specs.append(InputSpec(name, shape, "int32", high))
            notes.append(
                f"input '{name}' {shape}: the model does not expose its inputs; it has Embedding "
                f"layers, so random int32 token ids in [0, {high}) (the smallest vocabulary) "
                "were assumed. Pass data= if that is wrong.")
        else:
            specs.append(InputSpec(name, shape, "float32", None))
            notes.append(f"input '{name}' {shape}: the model does not expose its inputs; float32 "
                         "standard normal values assumed. Pass data= if that is wrong.")
    return specs, template, notes


def _built_input_shape(model: Any) -> tuple[int, ...] | None:
    """Per-example shape a single-input subclassed model was built/called with, if known."""
    shapes = build_shapes(model)
    if not getattr(model, "built", False) or not isinstance(shapes, dict) or len(shapes) != 1:
        return None
    shape = next(iter(shapes.values()))
    if not isinstance(shape, (tuple, list)) or len(shape) < 2:
        return None
    rest = tuple(shape[1:])
    if not all(isinstance(d, int) and d > 0 for d in rest):
        return None
    return rest


def _is_shape(s: Any) -> bool:
    return isinstance(s, (int, np.integer)) or (
        isinstance(s, (tuple, list)) and all(isinstance(d, (int, np.integer)) for d in s))


def _as_shape(name: str, s: Any) -> tuple[int, ...]:
    if isinstance(s, (int, np.integer)) and not isinstance(s, bool):
        s = (int(s),)
    if not isinstance(s, (tuple, list)) or not all(
            isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0 for d in s):
        raise InvalidInputError(
            f"input_shapes for '{name}' must be a tuple of positive ints (one example, no batch "
            f"dimension), got {s!r}.")
    return tuple(int(d) for d in s)


def _normalize_shapes(input_shapes: Any, names: list[str]) -> dict[str, tuple[int, ...]]:
    if input_shapes is None:
        return {}
    if isinstance(input_shapes, dict):
        return {str(k): _as_shape(str(k), v) for k, v in input_shapes.items()}
    if _is_shape(input_shapes):
        if len(names) != 1:
            raise InvalidInputError(
                f"input_shapes={input_shapes!r} is a single shape, but the model has "
                f"{len(names)} inputs {names}: pass a dict, e.g. "
                f"input_shapes={{'{names[0]}': (128,)}}.")
        return {names[0]: _as_shape(names[0], input_shapes)}
    if isinstance(input_shapes, (list, tuple)):
        if len(input_shapes) != len(names):
            raise InvalidInputError(
                f"input_shapes lists {len(input_shapes)} shapes, but the model has "
                f"{len(names)} inputs {names}.")
        return {n: _as_shape(n, s) for n, s in zip(names, input_shapes)}
    raise InvalidInputError(
        f"input_shapes must be a dict {{name: shape}}, a shape tuple or a list of shapes; got "
        f"{type(input_shapes).__name__}.")


def _fill_shape(name: str, declared: tuple[Any, ...], given: tuple[int, ...] | None,
                n_inputs: int) -> tuple[int, ...]:
    shown = "(" + ", ".join("None" if d is None else str(d) for d in declared) + \
        ("," if len(declared) == 1 else "") + ")"
    if given is not None:
        if len(given) != len(declared):
            raise InvalidInputError(
                f"input_shapes gives {given} for input '{name}', whose shape is {shown} "
                f"(rank {len(declared)}, batch dimension excluded).")
        for g, d in zip(given, declared):
            if d is not None and g != d:
                raise InvalidInputError(
                    f"input_shapes gives {given} for input '{name}', which conflicts with its "
                    f"declared shape {shown}.")
        return tuple(int(g) for g in given)
    if any(d is None for d in declared):
        example = tuple(128 if d is None else d for d in declared)
        ex_cli = ",".join(str(d) for d in example)
        py = f"{{'{name}': {example}}}" if n_inputs > 1 else f"{example} or {{'{name}': {example}}}"
        raise InvalidInputError(
            f"Input '{name}' has shape {shown}: a dimension other than the batch is None, so "
            "batchfit cannot tell how large one example is (and memory depends on it). Give the "
            f"size to measure for: input_shapes={py} in Python, or --input-shape {name}={ex_cli} "
            "on the CLI; or pass data= with a sample of your own (the longest example is used).")
    return tuple(int(d) for d in declared)


def _is_int(dtype: str) -> bool:
    return dtype.startswith(("int", "uint"))


# --------------------------------------------------------------------------------------------
# Integer inputs: follow the graph to the Embedding layers
# --------------------------------------------------------------------------------------------

def _all_layers(model: Any) -> list[Any]:
    try:
        layers = sublayers(model)
    except Exception:  # noqa: BLE001 - private API; fall back to the public one
        layers = None
    return layers if layers is not None else list(getattr(model, "layers", []))


def _all_embeddings(model: Any) -> list[Any]:
    import keras

    return [layer for layer in _all_layers(model) if isinstance(layer, keras.layers.Embedding)]


def _consumer_map(model: Any) -> dict[int, list[tuple[Any, Any]]]:
    """id(KerasTensor) -> [(layer, node)] of the layers that take it as an input."""
    consumers: dict[int, list[tuple[Any, Any]]] = {}
    for layer in _all_layers(model):
        for node in inbound_nodes(layer):
            for t in getattr(node, "input_tensors", []) or []:
                consumers.setdefault(id(t), []).append((layer, node))
    return consumers


def _int_high_for(tensor: Any, consumers: dict[int, list[tuple[Any, Any]]],
                  embeddings: list[Any], strict: bool = False) -> tuple[int, str]:
    import keras

    found: list[int] = []
    opaque = False
    seen: set[int] = set()
    stack = [tensor]
    while stack:
        t = stack.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        for layer, node in consumers.get(id(t), []):
            if isinstance(layer, keras.layers.Embedding):
                found.append(int(layer.input_dim))
            elif isinstance(layer, keras.layers.CategoryEncoding):
                found.append(int(layer.num_tokens))
            elif isinstance(layer, keras.Model) and getattr(layer, "inputs", None) is not None:
                flat_in = list(node.input_tensors)
                inner = list(layer.inputs)
                pos = [i for i, x in enumerate(flat_in) if x is t]
                for i in pos:
                    if i < len(inner):
                        stack.append(inner[i])
            else:
                owned = [s for s in _sublayers(layer) if isinstance(s, keras.layers.Embedding)]
                if owned:
                    found.append(min(int(e.input_dim) for e in owned))
                    continue
                outs = list(getattr(node, "output_tensors", []) or [])
                int_outs = [o for o in outs if _is_int(str(getattr(o.dtype, "name", o.dtype)))]
                stack.extend(int_outs)
                if not int_outs and not type(layer).__module__.startswith("keras."):
                    opaque = True  # a custom layer takes the integers: it may index a table
    if found:
        return min(found), ("the vocabulary of the Embedding it feeds" if len(found) == 1
                            else "the smallest vocabulary of the Embeddings it feeds")
    if not strict and embeddings and (opaque or not consumers):
        high = min(int(e.input_dim) for e in embeddings)
        return high, "the smallest vocabulary of the model's Embedding layers"
    return 2, "no Embedding found on its path; values kept tiny to stay in range"


_MASK_NAME = re.compile(r"(^|_)mask$", re.IGNORECASE)


def _mask_use(name: str, tensor: Any, consumers: dict[int, list[tuple[Any, Any]]]) -> str | None:
    """How an input is a mask: ``"named 'padding_mask'"``, or passed as a ``*mask`` keyword
    argument of a layer (followed into nested models); None if it is not one."""
    import keras

    if _MASK_NAME.search(name):
        return f"named '{name}'"
    seen: set[int] = set()
    stack = [tensor]
    while stack:
        t = stack.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        for layer, node in consumers.get(id(t), []):
            args = getattr(node, "arguments", None)
            for key, value in (getattr(args, "kwargs", None) or {}).items():
                if _MASK_NAME.search(str(key)) and any(
                        v is t for v in keras.tree.flatten(value)):
                    return f"passed as the '{key}' argument of layer '{layer.name}'"
            if isinstance(layer, keras.Model) and getattr(layer, "inputs", None) is not None:
                inner = list(layer.inputs)
                for i, x in enumerate(node.input_tensors):
                    if x is t and i < len(inner):
                        stack.append(inner[i])
    return None


def _sublayers(layer: Any) -> list[Any]:
    try:
        return sublayers(layer) or []
    except Exception:  # noqa: BLE001 - private API
        return []


# --------------------------------------------------------------------------------------------
# Outputs and targets
# --------------------------------------------------------------------------------------------

def _plan(model: Any, input_shapes: Any) -> SynthesisPlan:
    specs, in_template, notes = _input_specs(model, input_shapes)
    one = SynthesisPlan(tuple(specs), in_template, None, None, ())
    x1, _ = one.batch(1)
    loss = getattr(model, "loss", None)
    if loss is None:
        notes.append("no compiled loss (the model's loss comes from add_loss, or none): y is "
                     "None.")
        return SynthesisPlan(tuple(specs), in_template, None, None, tuple(notes))
    out_struct = _output_shapes(model, x1)
    out_leaves, out_template = flatten_structure(out_struct)
    out_names = _output_names(model, out_struct, len(out_leaves))
    losses = _losses_per_output(loss, out_struct, out_names, len(out_leaves))
    targets = []
    for shape, name, lo in zip(out_leaves, out_names, losses):
        t = _target_spec(name, tuple(shape.shape[1:]), lo)
        targets.append(t)
        text = _KIND_TEXT[t.kind].format(c=t.num_classes)
        label = f"output '{name}'" if len(out_leaves) > 1 else "targets"
        shown = "(batch" + ("".join(f", {d}" for d in t.shape) if t.shape else ",") + ")"
        if t.kind == "unknown":
            notes.append(f"unknown loss '{t.loss}': {label} are {text} of shape {shown}; pass "
                         "data= for realistic targets.")
        elif t.kind == "zeros":
            notes.append(f"{label}: no loss is compiled for it; zeros of shape {shown}.")
        else:
            notes.append(f"loss '{t.loss}': {label} are {text} of shape {shown}.")
    return SynthesisPlan(tuple(specs), in_template, tuple(targets), out_template, tuple(notes))


class _Shape:
    """Just a shape (a leaf of the output structure)."""

    def __init__(self, shape: tuple[Any, ...]) -> None:
        self.shape = tuple(shape)


def _output_shapes(model: Any, x1: Any) -> Any:
    """The model's output structure with concrete shapes for a batch of 1."""
    import keras

    try:
        struct = model.output
        leaves = keras.tree.flatten(struct)
        if leaves and all(all(d is not None for d in t.shape[1:]) for t in leaves):
            return keras.tree.map_structure(lambda t: _Shape(t.shape), struct)
    except (AttributeError, ValueError):
        pass
    try:
        spec_in = keras.tree.map_structure(
            lambda a: keras.KerasTensor(a.shape, dtype=str(a.dtype)), x1)
        out = model.compute_output_spec(spec_in)
        leaves = keras.tree.flatten(out)
        if leaves and all(all(d is not None for d in t.shape) for t in leaves):
            return keras.tree.map_structure(lambda t: _Shape(t.shape), out)
    except Exception:  # noqa: BLE001, S110 - symbolic tracing may fail (Python control flow)
        pass
    try:
        out = model(x1, training=False)
    except Exception as e:
        raise InvalidInputError(
            f"The model failed on a synthesized batch of 1 ({type(e).__name__}: "
            f"{error_line(e, limit=None)}), so its output shape "
            "is unknown. Pass data= with a sample of your own (x, y).") from e
    return keras.tree.map_structure(lambda t: _Shape(tuple(t.shape)), out)


def _output_names(model: Any, struct: Any, n: int) -> list[str]:
    if isinstance(struct, dict):
        return [str(k) for k in sorted(struct, key=str)]
    names = list(getattr(model, "output_names", None) or [])
    if len(names) == n:
        return [str(x) for x in names]
    return ["output"] if n == 1 else [f"output_{i}" for i in range(n)]


def _losses_per_output(loss: Any, struct: Any, names: list[str], n: int) -> list[Any]:
    if isinstance(loss, collections.abc.Mapping):
        loss = dict(loss.items())
        return [loss.get(name) for name in names]
    if isinstance(loss, collections.abc.Sequence) and not isinstance(loss, str):
        items = list(loss)
        if len(items) == 1 and n == 1:
            return items
        if len(items) != n:
            raise InvalidInputError(
                f"The model has {n} outputs {names} but {len(items)} compiled losses.")
        return items
    return [loss] * n


def _snake(name: str) -> str:
    s = re.sub(r"(?<=[A-Z])([A-Z][a-z])", r"_\1", name)  # "KLDivergence" -> "KL_Divergence"
    s = re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", s)
    return s.lower()


def loss_name(loss: Any) -> str | None:
    """The name of a compiled loss: a string, a function or a ``keras.losses.Loss``.

    Args:
        loss: what was passed to ``model.compile(loss=...)`` for one output.

    Returns:
        A snake_case name (``"sparse_categorical_crossentropy"``, ``"my_loss"``...), or
        ``None`` when there is no loss.

    Example:

    >>> import keras
    >>> loss_name(keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    'sparse_categorical_crossentropy'
    """
    if loss is None:
        return None
    if isinstance(loss, str):
        return _snake(loss)
    fn = getattr(loss, "fn", None)
    if fn is not None and callable(fn):  # keras LossFunctionWrapper
        return _snake(getattr(fn, "__name__", type(fn).__name__))
    mod = type(loss).__module__ or ""
    if mod.startswith("keras") and not isinstance(loss, type) and hasattr(loss, "call"):
        return _snake(type(loss).__name__)
    if hasattr(loss, "__name__"):
        return str(loss.__name__)
    return _snake(type(loss).__name__)


def _target_spec(name: str, shape: tuple[int, ...], loss: Any) -> TargetSpec:
    lname = loss_name(loss)
    if lname is None:
        return TargetSpec(name, shape, "zeros")
    kind = _LOSS_KINDS.get(lname, "unknown")
    classes = int(shape[-1]) if shape else 1
    if kind == "sparse":
        label_shape = shape[:-1] if shape else ()
        return TargetSpec(name, tuple(label_shape), kind, "int32", max(classes, 1), lname)
    if kind in ("onehot", "prob"):
        return TargetSpec(name, shape, kind, "float32", max(classes, 1), lname)
    return TargetSpec(name, shape, kind, "float32", None, lname)


def _make_mask(shape: tuple[int, ...], dtype: str, rng: np.random.Generator) -> np.ndarray:
    """Ones; a sequence mask ``(batch, steps)`` gets trailing zeros of padding on each row but
    the first, keeping at least half the steps (and at least one)."""
    if len(shape) != 2 or shape[1] < 2:
        return np.ones(shape, dtype=dtype)
    steps = shape[1]
    lengths = rng.integers(max(1, steps // 2), steps + 1, size=shape[0])
    lengths[0] = steps
    return (np.arange(steps)[None, :] < lengths[:, None]).astype(dtype)


def _make_input(spec: InputSpec, b: int, rng: np.random.Generator) -> np.ndarray:
    shape = (b, *spec.shape)
    if spec.role == "mask":
        return _make_mask(shape, spec.dtype, rng)
    if _is_int(spec.dtype) or spec.int_high is not None:
        return rng.integers(0, spec.int_high or 2, size=shape).astype(spec.dtype)
    if spec.dtype == "bool":
        return rng.random(shape) < 0.5
    dt = spec.dtype if spec.dtype in ("float16", "float32", "float64") else "float32"
    return rng.standard_normal(shape).astype(dt)


def _make_target(t: TargetSpec, b: int, rng: np.random.Generator) -> np.ndarray:
    shape = (b, *t.shape)
    if t.kind == "sparse":
        return rng.integers(0, t.num_classes or 1, size=shape).astype("int32")
    if t.kind == "onehot":
        c = t.num_classes or 1
        labels = rng.integers(0, c, size=shape[:-1])
        return np.eye(c, dtype="float32")[labels]
    if t.kind == "prob":
        p = rng.random(shape).astype("float32") + 1e-3
        return p / p.sum(axis=-1, keepdims=True)
    if t.kind == "binary":
        return (rng.random(shape) < 0.5).astype("float32")
    if t.kind == "sign":
        return np.where(rng.random(shape) < 0.5, -1.0, 1.0).astype("float32")
    if t.kind == "count":
        return rng.poisson(1.0, size=shape).astype("float32")
    if t.kind == "positive":
        return rng.uniform(0.1, 1.0, size=shape).astype("float32")
    if t.kind == "real":
        return rng.standard_normal(shape).astype("float32")
    if t.kind == "zeros":
        return np.zeros(shape, dtype="float32")
    return rng.random(shape).astype("float32")
