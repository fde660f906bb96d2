"""Batches of exactly ``b`` examples built from a sample of the user's own data.

A probe must train on batches that look like the real ones: the same input structure, dtypes and
shapes, and for variable-length data the *longest* examples, because they set the memory peak.
:class:`DataSample` materializes a bounded number of examples from ``(x, y)`` arrays (or nested
lists/dicts of arrays), a ``tf.data.Dataset`` (batched or not) or a ``keras.utils.PyDataset``,
keeps them as plain NumPy arrays (so the sample pickles and can be sent to a worker process) and
builds batches of any size by cycling through the examples.

Example:

>>> import numpy as np
>>> from batchfit.backend.tensorflow.data import batch_from_data
>>> x, y = batch_from_data((np.zeros((10, 3)), np.arange(10)), 25)
>>> x.shape, y.shape
((25, 3), (25,))
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...core.validate import check_int
from ...errors import InvalidInputError
from .keras_compat import upstream_dataset

#: How many examples :meth:`DataSample.from_data` materializes at most.
MAX_EXAMPLES = 4096

_SUPPORTED = ("(x, y) or (x, y, sample_weight) with x and y NumPy arrays (or lists/dicts of "
              "arrays), a tf.data.Dataset yielding (x, y) or (x, y, sample_weight), "
              "or a keras.utils.PyDataset")

# Dataset classes (TensorFlow internals, matched by name) whose elements are batches, and those
# whose elements are single examples. Walking a dataset's ``_input_dataset`` chain, the first
# class met that is in one of these sets decides.
_BATCHING = {"_BatchDataset", "_PaddedBatchDataset", "_RebatchDataset", "_ParallelBatchDataset",
             "_GroupByWindowDataset", "_DenseToRaggedDataset", "_TensorDataset",
             "BatchDataset", "PaddedBatchDataset", "TensorDataset"}
_UNBATCHING = {"_UnbatchDataset", "_TensorSliceDataset", "_RangeDataset",
               "UnbatchDataset", "TensorSliceDataset", "RangeDataset"}
# Classes whose elements have nothing to do with their input's (from_generator is
# from_tensors(...).flat_map(...)): met first, batching is unknown.
_OPAQUE = {"_FlatMapDataset", "_InterleaveDataset", "_ParallelInterleaveDataset",
           "_GeneratorDataset", "_WindowDataset", "_ScanDataset", "FlatMapDataset",
           "InterleaveDataset", "ParallelInterleaveDataset"}


# --------------------------------------------------------------------------------------------
# Nested structures (lists, tuples, dicts of leaves) without TensorFlow: a template replaces
# each leaf by its index, so it pickles and re-packs in the same order.
# --------------------------------------------------------------------------------------------

def flatten_structure(struct: Any) -> tuple[list[Any], Any]:
    """Split a nested list/tuple/dict into its leaves and a picklable template.

    Dicts are walked in sorted key order (as Keras does); ``None`` stays in the template.

    Args:
        struct: a leaf, or a list/tuple/dict nesting leaves.

    Returns:
        ``(leaves, template)``: the leaves in order, and the structure with each leaf replaced
        by its index (re-pack it with :func:`pack_structure`).

    Example:

    >>> leaves, t = flatten_structure({"b": 2, "a": [1, 3]})
    >>> leaves, pack_structure(t, [10, 30, 20])
    ([1, 3, 2], {'a': [10, 30], 'b': 20})
    """
    leaves: list[Any] = []

    def walk(s: Any) -> Any:
        if isinstance(s, dict):
            return {k: walk(s[k]) for k in sorted(s, key=str)}
        if isinstance(s, (list, tuple)):
            items = [walk(v) for v in s]
            return tuple(items) if isinstance(s, tuple) else items
        if s is None:
            return None
        leaves.append(s)
        return _Leaf(len(leaves) - 1)

    return leaves, walk(struct)


def pack_structure(template: Any, leaves: list[Any]) -> Any:
    """Rebuild a structure from a :func:`flatten_structure` template and new leaves.

    Args:
        template: the template returned by :func:`flatten_structure`.
        leaves: one new leaf per leaf of the template, in the same order.

    Returns:
        The structure with the new leaves.

    Example:

    >>> pack_structure(flatten_structure((1, [2]))[1], ["a", "b"])
    ('a', ['b'])
    """
    if isinstance(template, _Leaf):
        return leaves[template.index]
    if isinstance(template, dict):
        return {k: pack_structure(v, leaves) for k, v in template.items()}
    if isinstance(template, tuple):
        return tuple(pack_structure(v, leaves) for v in template)
    if isinstance(template, list):
        return [pack_structure(v, leaves) for v in template]
    return template


class _Leaf:
    """Placeholder for a leaf in a structure template (picklable)."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __getstate__(self) -> int:
        return self.index

    def __setstate__(self, state: int) -> None:
        self.index = state

    def __repr__(self) -> str:
        return f"<leaf {self.index}>"


# --------------------------------------------------------------------------------------------

class DataSample:
    """A bounded, picklable sample of the user's examples, as NumPy arrays.

    Build one with :meth:`from_data`; :meth:`batch` then returns ``(x, y)`` with exactly ``b``
    examples, cycling through the sample (so any batch size works with a small sample). When
    the examples have different shapes (variable-length sequences), only the largest example is
    kept and repeated: the longest example sets the memory a batch needs.

    Attributes:
        notes: plain-language notes on what was done to the data (weights dropped, longest
            example chosen, sample capped...).
        num_examples: how many examples are kept.

    Example:

    >>> import numpy as np
    >>> s = DataSample.from_data((np.ones((4, 2)), np.zeros(4)))
    >>> x, y = s.batch(6)
    >>> x.shape, y.shape, s.num_examples
    ((6, 2), (6,), 4)
    """

    def __init__(self, x_leaves: list[np.ndarray], x_template: Any,
                 y_leaves: list[np.ndarray], y_template: Any, notes: list[str]) -> None:
        """Hold stacked examples (use :meth:`from_data` rather than this constructor).

        Args:
            x_leaves: the input arrays, each with the examples along axis 0.
            x_template: the input structure (from :func:`flatten_structure`).
            y_leaves: the target arrays, each with the examples along axis 0.
            y_template: the target structure, ``None`` when there are no targets.
            notes: notes to pass on to the user.

        Raises:
            InvalidInputError: if there are no examples or the leaves disagree on their count.
        """
        counts = {int(a.shape[0]) for a in [*x_leaves, *y_leaves]}
        if not x_leaves or len(counts) != 1 or 0 in counts:
            raise InvalidInputError(
                "DataSample needs at least one example and the same number of examples in every "
                f"array; got counts {sorted(counts)}.")
        self._x_leaves = x_leaves
        self._x_template = x_template
        self._y_leaves = y_leaves
        self._y_template = y_template
        self.notes: list[str] = list(notes)
        self.num_examples: int = counts.pop()

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_data(cls, data: Any, *, max_examples: int = MAX_EXAMPLES,
                  batched: bool | None = None) -> DataSample:
        """Materialize up to ``max_examples`` examples from the user's data.

        Args:
            data: ``(x, y)`` / ``(x, y, sample_weight)`` with x and y NumPy arrays (or anything
                ``np.asarray`` takes, or lists/dicts of them); a bare array or dict (inputs
                only, for models whose loss comes from ``add_loss``); a ``tf.data.Dataset``
                yielding ``(x, y)`` or ``(x, y, sample_weight)``, batched or not; or a
                ``keras.utils.PyDataset``. Sample weights are dropped (noted).
            max_examples: cap on the examples kept (the first ones).
            batched: whether a dataset's elements are batches. Default: detected from the
                dataset's pipeline (``.batch()``, ``.padded_batch()``, ``.unbatch()``...),
                else from its first element.

        Returns:
            A :class:`DataSample`.

        Raises:
            InvalidInputError: for empty data, x and y of different lengths, an unsupported
                type, or examples that cannot be stacked.

        Example:

        >>> import numpy as np
        >>> DataSample.from_data(({"a": np.ones((3, 2))}, np.ones(3))).batch(2)[0]["a"].shape
        (2, 2)
        """
        check_int("max_examples", max_examples, minimum=1)
        if data is None:
            raise InvalidInputError(f"No data given (None). Expected {_SUPPORTED}.")
        if isinstance(data, DataSample):
            return data
        if _is_tf_dataset(data):
            return _from_dataset(data, max_examples, batched)
        if _is_py_dataset(data):
            return _collect(_iter_py_dataset(data), max_examples, "keras.utils.PyDataset", [],
                            batched=True)
        if _is_iterator(data):
            raise InvalidInputError(
                f"Unsupported data type {_type_name(data)}: a generator/iterator can only be read "
                "once. Wrap it in tf.data.Dataset.from_generator(...) or pass arrays. "
                f"Expected {_SUPPORTED}.")
        return _from_arrays(data, max_examples)

    # -- use ---------------------------------------------------------------------------------

    def batch(self, batch_size: int) -> tuple[Any, Any]:
        """Return ``(x, y)`` with exactly ``batch_size`` examples, cycling through the sample.

        Args:
            batch_size: number of examples, >= 1.

        Returns:
            ``(x, y)`` in the structure of the original data; ``y`` is ``None`` when the data
            had no targets.

        Raises:
            InvalidInputError: if ``batch_size`` is not a positive integer.

        Example:

        >>> import numpy as np
        >>> DataSample.from_data((np.arange(3)[:, None], np.arange(3))).batch(5)[1]
        array([0, 1, 2, 0, 1])
        """
        b = int(check_int("batch_size", batch_size, minimum=1))  # type: ignore[arg-type]
        idx = np.arange(b) % self.num_examples
        if b == self.num_examples:
            take = list
        else:
            take = (lambda leaves: [np.take(a, idx, axis=0) for a in leaves])
        x = pack_structure(self._x_template, take(self._x_leaves))
        y = None if self._y_template is None else pack_structure(self._y_template,
                                                                take(self._y_leaves))
        return x, y

    @property
    def example_bytes(self) -> int:
        """Bytes of one example (inputs and targets), as held in NumPy."""
        return int(sum(a[:1].nbytes for a in [*self._x_leaves, *self._y_leaves]))

    def __repr__(self) -> str:
        shapes = [tuple(a.shape[1:]) for a in self._x_leaves]
        return f"DataSample({self.num_examples} examples, input shapes {shapes})"


def batch_from_data(data: Any, batch_size: int) -> tuple[Any, Any]:
    """Build a batch of exactly ``batch_size`` examples from the user's data.

    Shorthand for ``DataSample.from_data(data).batch(batch_size)``; build the
    :class:`DataSample` once yourself when you need several batch sizes.

    Args:
        data: see :meth:`DataSample.from_data`.
        batch_size: number of examples, >= 1.

    Returns:
        ``(x, y)`` in the structure of the data (``y`` is ``None`` without targets).

    Raises:
        InvalidInputError: see :meth:`DataSample.from_data`.

    Example:

    >>> import numpy as np
    >>> batch_from_data((np.zeros((2, 4)), np.zeros(2)), 3)[0].shape
    (3, 4)
    """
    return DataSample.from_data(data).batch(batch_size)


# --------------------------------------------------------------------------------------------
# Arrays
# --------------------------------------------------------------------------------------------

def _from_arrays(data: Any, max_examples: int) -> DataSample:
    notes: list[str] = []
    if isinstance(data, tuple):
        if len(data) == 0:
            raise InvalidInputError(f"Empty data tuple (). Expected {_SUPPORTED}.")
        if len(data) == 1:
            x, y = data[0], None
        elif len(data) == 2:
            x, y = data
        elif len(data) == 3:
            x, y, _ = data
            notes.append("sample weights dropped: they do not change the memory of a step "
                         "much; probes train without them.")
        else:
            raise InvalidInputError(
                f"Data tuple of length {len(data)}; expected (x, y) or (x, y, sample_weight).")
    elif isinstance(data, (dict, list, np.ndarray)) or hasattr(data, "__array__"):
        x, y = data, None
        notes.append("no targets given: y is None (fine for models whose loss comes from "
                     "add_loss); pass (x, y) otherwise.")
    else:
        raise InvalidInputError(f"Unsupported data type {_type_name(data)}. Expected {_SUPPORTED}.")
    x_leaves, x_t = flatten_structure(x)
    y_leaves, y_t = flatten_structure(y) if y is not None else ([], None)
    if not x_leaves:
        raise InvalidInputError(f"Data has no input arrays (x is {x!r}). Expected {_SUPPORTED}.")
    x_arrays = [_as_array(a, "x") for a in x_leaves]
    y_arrays = [_as_array(a, "y") for a in y_leaves]
    lengths = {f"x{_leaf_label(i, len(x_arrays))}": a.shape[0] for i, a in enumerate(x_arrays)}
    lengths.update({f"y{_leaf_label(i, len(y_arrays))}": a.shape[0] for i, a in enumerate(y_arrays)})
    if len(set(lengths.values())) != 1:
        shown = ", ".join(f"{k}: {v}" for k, v in lengths.items())
        raise InvalidInputError(
            f"x and y must have the same number of examples (length of axis 0); got {shown}.")
    n = next(iter(lengths.values()))
    if n == 0:
        raise InvalidInputError("Data is empty (0 examples); pass at least one example.")
    if n > max_examples:
        notes.append(f"using the first {max_examples} of {n} examples.")
    x_arrays = [np.ascontiguousarray(a[:max_examples]) for a in x_arrays]
    y_arrays = [np.ascontiguousarray(a[:max_examples]) for a in y_arrays]
    return DataSample(x_arrays, x_t, y_arrays, y_t, notes)


def _leaf_label(i: int, n: int) -> str:
    return f"[{i}]" if n > 1 else ""


def _as_array(a: Any, what: str) -> np.ndarray:
    if hasattr(a, "to_tensor") and not isinstance(a, np.ndarray):  # tf.RaggedTensor
        a = a.to_tensor()
    try:
        arr = np.asarray(a)
    except Exception as e:
        raise InvalidInputError(
            f"Cannot turn {what} of type {_type_name(a)} into a NumPy array ({e}). "
            f"Expected {_SUPPORTED}.") from e
    if arr.ndim == 0:
        raise InvalidInputError(
            f"{what} is a scalar ({_type_name(a)}); each array needs the examples along axis 0.")
    # Text (a tf.string tensor's .numpy(), a pandas column) is an object array of bytes/str:
    # Keras takes it as is. Any other object array is ragged or not numbers.
    if arr.dtype == object and not all(isinstance(v, (bytes, str)) for v in arr.flat):
        raise InvalidInputError(
            f"{what} became a NumPy array of Python objects (shape {arr.shape}): ragged lists? "
            "Pad them to one length (e.g. keras.utils.pad_sequences) or use a tf.data.Dataset.")
    return arr


# --------------------------------------------------------------------------------------------
# tf.data / PyDataset
# --------------------------------------------------------------------------------------------

def _is_tf_dataset(data: Any) -> bool:
    mod = type(data).__module__ or ""
    if not mod.startswith("tensorflow"):
        return False
    import tensorflow as tf

    return isinstance(data, tf.data.Dataset)


def _is_py_dataset(data: Any) -> bool:
    mod = type(data).__module__ or ""
    if "keras" not in mod and not hasattr(data, "__getitem__"):
        return False
    try:
        import keras
    except ImportError:  # pragma: no cover - keras is a dependency
        return False
    return isinstance(data, keras.utils.PyDataset)


def _is_iterator(data: Any) -> bool:
    return hasattr(data, "__next__") and not isinstance(data, (tuple, list, dict, np.ndarray))


def _iter_py_dataset(ds: Any) -> Any:
    n = len(ds)
    for i in range(n):
        yield ds[i]


def _dataset_batched(ds: Any) -> bool | None:
    """True/False when the pipeline says whether elements are batches, None when unknown."""
    d = ds
    for _ in range(200):
        name = type(d).__name__
        if name in _BATCHING:
            return True
        if name in _UNBATCHING:
            return False
        if name in _OPAQUE:
            return None
        nxt = upstream_dataset(d)  # zip / concatenate: the first one
        if nxt is None:
            return None
        d = nxt
    return None


def _from_dataset(ds: Any, max_examples: int, batched: bool | None) -> DataSample:
    import tensorflow as tf

    notes: list[str] = []
    detected = _dataset_batched(ds) if batched is None else batched

    def elements() -> Any:
        for el in ds:
            yield tf.nest.map_structure(_to_numpy, el)

    it = elements()
    try:
        first = next(it)
    except StopIteration:
        raise InvalidInputError("The tf.data.Dataset is empty: it yielded no element.") from None
    if detected is None:
        leaves = [np.asarray(a) for a in tf.nest.flatten(first)]
        lead = {a.shape[0] for a in leaves if a.ndim > 0}
        detected = bool(leaves) and all(a.ndim > 0 for a in leaves) and len(lead) == 1
        notes.append(
            "the dataset's pipeline does not say whether it is batched; from its first element "
            f"it was taken as {'batched' if detected else 'unbatched (one example per element)'}"
            f" (pass batched={not detected} to DataSample.from_data if that is wrong).")

    def chain() -> Any:
        yield first
        yield from it

    if detected:
        return _collect(chain(), max_examples, "tf.data.Dataset", notes, batched=True)
    return _collect(chain(), max_examples, "tf.data.Dataset", notes, batched=False)


def _to_numpy(t: Any) -> Any:
    if hasattr(t, "to_tensor"):  # RaggedTensor: pad to the longest
        t = t.to_tensor()
    if type(t).__name__ == "SparseTensor":
        import tensorflow as tf

        t = tf.sparse.to_dense(t)
    return t.numpy() if hasattr(t, "numpy") else t


def _split_element(el: Any, notes: list[str], source: str) -> tuple[Any, Any]:
    """(x, y) from a dataset element; drops sample weights."""
    if isinstance(el, tuple):
        if len(el) == 1:
            return el[0], None
        if len(el) == 2:
            return el[0], el[1]
        if len(el) == 3:
            msg = ("sample weights dropped: they do not change the memory of a step much; "
                   "probes train without them.")
            if msg not in notes:
                notes.append(msg)
            return el[0], el[1]
        raise InvalidInputError(
            f"The {source} yields tuples of length {len(el)}; expected (x, y) or "
            "(x, y, sample_weight).")
    return el, None


def _collect(elements: Any, max_examples: int, source: str, notes: list[str], *,
             batched: bool) -> DataSample:
    """Read up to ``max_examples`` examples from ``elements``: batches if ``batched`` (each
    array's first axis is the batch, split into examples), else one example per element."""
    examples: list[tuple[list[np.ndarray], list[np.ndarray]]] = []
    templates: tuple[Any, Any] | None = None
    for el in elements:
        x, y = _split_element(el, notes, source)
        x_leaves, x_t = flatten_structure(x)
        y_leaves, y_t = flatten_structure(y) if y is not None else ([], None)
        if templates is None:
            templates = (x_t, y_t)
        if batched:
            xs = [_as_array(a, "x") for a in x_leaves]
            ys = [_as_array(a, "y") for a in y_leaves]
            sizes = {a.shape[0] for a in xs + ys}
            if len(sizes) != 1:
                raise InvalidInputError(
                    f"A batch of the {source} has x and y of different lengths "
                    f"{sorted(sizes)}: every array of a batch needs the same number of "
                    f"examples.")
            for i in range(sizes.pop()):
                # a[i, ...] stays an array (a[i] of a 1-D text array is a bare bytes object)
                examples.append(([a[i, ...] for a in xs], [a[i, ...] for a in ys]))
                if len(examples) >= max_examples:
                    break
        else:
            examples.append(([np.asarray(a) for a in x_leaves],
                             [np.asarray(a) for a in y_leaves]))
        if len(examples) >= max_examples:
            notes.append(f"read the first {max_examples} examples of the {source}.")
            break
    if templates is None or not examples:
        raise InvalidInputError(f"The {source} is empty: it yielded no examples.")
    return _stack(examples, templates, notes, source)


def _stack(examples: list[tuple[list[np.ndarray], list[np.ndarray]]], templates: tuple[Any, Any],
           notes: list[str], source: str) -> DataSample:
    def sig(ex: tuple[list[np.ndarray], list[np.ndarray]]) -> tuple[Any, ...]:
        return tuple(a.shape for a in ex[0] + ex[1])

    shapes = {sig(ex) for ex in examples}
    if len({len(s) for s in shapes}) != 1:
        raise InvalidInputError(f"The {source} yields elements of different structures.")
    if len(shapes) > 1:
        def size(ex: tuple[list[np.ndarray], list[np.ndarray]]) -> int:
            return int(sum(a.size for a in ex[0] + ex[1]))

        best = max(range(len(examples)), key=lambda i: (size(examples[i]), -i))
        shown = [a.shape for a in examples[best][0]]
        notes.append(
            f"examples have different shapes ({len(shapes)} distinct among {len(examples)} "
            f"read); using the largest one (input shape{'s' if len(shown) > 1 else ''} "
            f"{shown[0] if len(shown) == 1 else shown}) repeated: the longest example sets "
            "the memory a batch needs.")
        examples = [examples[best]]
    n_x = len(examples[0][0])
    n_y = len(examples[0][1])
    try:
        x_leaves = [np.stack([ex[0][i] for ex in examples]) for i in range(n_x)]
        y_leaves = [np.stack([ex[1][i] for ex in examples]) for i in range(n_y)]
    except ValueError as e:  # pragma: no cover - shapes were checked above
        raise InvalidInputError(f"Cannot stack the examples of the {source}: {e}") from e
    return DataSample(x_leaves, templates[0], y_leaves, templates[1], notes)


def _type_name(obj: Any) -> str:
    t = type(obj)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"
