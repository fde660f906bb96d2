"""Where ``batchfit.fit``'s batches come from on JAX: arrays, a ``keras.utils.PyDataset``, or a
Python generator (or iterator) of ``(x, y)`` / ``(x, y, sample_weight)`` batches.

Arrays are sliced into ``batch_size`` batches (shuffled each epoch unless ``shuffle=False``);
a dataset's own batches are used as they come (``batch_size=None``), as ``model.fit`` does:
a ``PyDataset`` is indexed ``0 .. len - 1`` each epoch (its ``on_epoch_end`` called after), a
generator is read on across epochs (``steps_per_epoch`` batches each, or until it ends).

Example:

>>> import numpy as np
>>> src = batch_source(np.zeros((5, 2)), np.zeros((5, 1)), 2, {"shuffle": False})
>>> [len(x) for x, _, _ in src.epoch(np.random.default_rng(0))], src.steps
([2, 2, 1], 3)
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

import numpy as np

from ...errors import InvalidInputError

Batch = tuple[Any, Any, Any]


def is_dataset(x: Any) -> bool:
    """A ``PyDataset``, or a generator / iterator of batches (not arrays)."""
    import keras

    return (isinstance(x, keras.utils.PyDataset) or inspect.isgenerator(x)
            or (hasattr(x, "__next__") and not hasattr(x, "shape")))


def check_inputs(x: Any, batch_size: int | None) -> None:
    """Arrays (or dicts/lists of arrays) with ``batch_size``, or a dataset without it."""
    import jax

    if is_dataset(x):
        if batch_size is not None:
            raise InvalidInputError(
                f"batchfit.fit on JAX uses a {type(x).__name__}'s own batches: pass "
                f"batch_size=None (the dataset sets the batch), not {batch_size}")
        return
    leaves = jax.tree_util.tree_leaves(x)
    if not leaves or not all(hasattr(a, "shape") and len(a.shape) >= 1 for a in leaves):
        raise InvalidInputError(
            f"batchfit.fit on JAX takes NumPy arrays (or a dict or list of them), a "
            f"keras.utils.PyDataset or a generator of (x, y) batches for x, got "
            f"{type(x).__name__} (a tf.data.Dataset is TensorFlow's: iterate it with "
            f"as_numpy_iterator())")
    if batch_size is None:
        raise InvalidInputError("batchfit.fit on JAX needs batch_size= with array data")


def batch_size_of(tree: Any) -> int:
    """The leading dimension of a batch's first array."""
    import jax

    return int(jax.tree_util.tree_leaves(tree)[0].shape[0])


def take(data: Any, idx: np.ndarray) -> Any:
    """The examples ``idx`` of every array of ``data`` (``None`` stays ``None``)."""
    import jax

    return jax.tree_util.tree_map(lambda a: np.asarray(a)[idx], data)


class ArrayBatches:
    """``batch_size`` slices of arrays, in a new order each epoch when ``shuffle``."""

    def __init__(self, x: Any, y: Any, sample_weight: Any, batch_size: int, shuffle: bool,
                 steps: int | None) -> None:
        if y is None:
            raise InvalidInputError("batchfit.fit on JAX needs y (targets) with array x")
        self.x, self.y, self.sw = x, y, sample_weight
        self.batch_size, self.shuffle = int(batch_size), shuffle
        self.n = batch_size_of(x)
        full = -(-self.n // self.batch_size)
        self.steps: int | None = min(full, steps) if steps else full

    def epoch(self, rng: np.random.Generator) -> Iterator[Batch]:
        order = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        for step in range(self.steps or 0):
            idx = order[step * self.batch_size:(step + 1) * self.batch_size]
            yield take(self.x, idx), take(self.y, idx), take(self.sw, idx)


class DatasetBatches:
    """A ``PyDataset``'s or a generator's own batches, as NumPy arrays."""

    def __init__(self, data: Any, steps: int | None) -> None:
        import keras

        self.data = data
        self.indexed = isinstance(data, keras.utils.PyDataset)
        self.steps = steps
        if self.indexed:
            count = data.num_batches
            if count is None and steps is None:
                raise InvalidInputError("an infinite PyDataset needs steps_per_epoch=")
            self.steps = min(steps, count) if steps and count else (steps or count)
        self._iterator = None if self.indexed else iter(data)

    def _raw(self) -> Iterator[Any]:
        if self.indexed:
            for i in range(int(self.steps or 0)):
                yield self.data[i]
            self.data.on_epoch_end()
            return
        for i, item in enumerate(self._iterator):
            yield item
            if self.steps is not None and i + 1 >= self.steps:
                return

    def epoch(self, rng: np.random.Generator) -> Iterator[Batch]:
        import keras

        for item in self._raw():
            x, y, sw = keras.utils.unpack_x_y_sample_weight(
                item if isinstance(item, tuple) else (item,))
            if y is None:
                raise InvalidInputError(
                    f"batchfit.fit on JAX needs (x, y) batches: the {type(self.data).__name__} "
                    f"gave x alone")
            yield tuple(None if part is None else take(part, slice(None))
                        for part in (x, y, sw))


def batch_source(x: Any, y: Any, batch_size: int | None, fit_kwargs: dict[str, Any]) -> Any:
    """The batches ``fit`` trains on (see the module's docstring)."""
    steps = fit_kwargs.get("steps_per_epoch")
    steps = int(steps) if steps else None
    if is_dataset(x):
        if y is not None:
            raise InvalidInputError("with a dataset or generator as x, y must be None (the "
                                    "batches carry the targets)")
        return DatasetBatches(x, steps)
    return ArrayBatches(x, y, fit_kwargs.get("sample_weight"), int(batch_size or 0),
                        bool(fit_kwargs.get("shuffle", True)), steps)


def validation_source(fit_kwargs: dict[str, Any], batch_size: int | None) -> Any:
    """``validation_data``'s batches (``None`` without): a tuple of arrays in batches of
    ``validation_batch_size`` (default ``batch_size``, else 32), or a dataset's own."""
    data = fit_kwargs.get("validation_data")
    if data is None:
        return None
    steps = fit_kwargs.get("validation_steps")
    steps = int(steps) if steps else None
    if is_dataset(data):
        return DatasetBatches(data, steps)
    if not isinstance(data, tuple | list) or len(data) not in (2, 3):
        raise InvalidInputError(
            f"validation_data must be (x, y), (x, y, sample_weight), a PyDataset or a "
            f"generator; got {type(data).__name__}")
    size = fit_kwargs.get("validation_batch_size") or batch_size or 32
    return ArrayBatches(data[0], data[1], data[2] if len(data) == 3 else None, int(size),
                        False, steps)

