"""Draws random batches of the user's examples: what the noise scale measures on any backend.

Moved from :mod:`batchfit.backend.tensorflow.noise` (which re-exports it): it reads the user's
data with :class:`batchfit.backend.tensorflow.data.DataSample` and needs no framework.

Example:

>>> import numpy as np
>>> s = ExampleSampler((np.arange(10.0)[:, None], np.arange(10.0)))
>>> s.draw(4)[0].shape
(4, 1)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...core.noise import MAX_EXAMPLES, NEEDS_REAL_DATA
from ...errors import InvalidInputError
from ..tensorflow.data import DataSample, flatten_structure, pack_structure
from ..tensorflow.loader import load_data

__all__ = ["ExampleSampler"]


class ExampleSampler:
    """Draws random batches from the user's examples (materialized as NumPy arrays).

    Args:
        data: ``(x, y)`` arrays (or lists/dicts of them), a ``tf.data.Dataset``, a
            ``keras.utils.PyDataset``, a :class:`batchfit.backend.tensorflow.data.DataSample`, or a data spec
            string ``path/file.py:function``.
        max_examples: how many examples to read at most.
        seed: seed of the random draws.

    Raises:
        InvalidInputError: no data, variable-shape examples, or fewer than 2 examples.

    Example:

    >>> import numpy as np
    >>> s = ExampleSampler((np.arange(10.0)[:, None], np.arange(10.0)))
    >>> x, y = s.draw(4)
    >>> x.shape, s.num_examples
    ((4, 1), 10)
    """

    def __init__(self, data: Any, *, max_examples: int = MAX_EXAMPLES, seed: int = 0) -> None:
        if data is None:
            raise InvalidInputError(NEEDS_REAL_DATA)
        if isinstance(data, str):
            data = load_data(data)
        sample = DataSample.from_data(data, max_examples=max_examples)
        if any("different shapes" in note for note in sample.notes):
            raise InvalidInputError(
                "The examples have different shapes (variable-length data); the noise scale "
                "needs every example, so pad them to one length (keras.utils.pad_sequences or "
                "tf.data padded_batch) before measuring.")
        if sample.num_examples < 2:
            raise InvalidInputError(
                f"The data has {sample.num_examples} example; the noise scale needs many "
                "(thousands ideally).")
        x, y = sample.batch(sample.num_examples)
        self._x_leaves, self._x_template = flatten_structure(x)
        if y is None:
            self._y_leaves, self._y_template = [], None
        else:
            self._y_leaves, self._y_template = flatten_structure(y)
        self.num_examples = sample.num_examples
        self.notes = list(sample.notes)
        self._rng = np.random.default_rng(seed)

    def draw(self, size: int) -> tuple[Any, Any]:
        """``(x, y)`` with ``size`` examples drawn uniformly with replacement."""
        idx = self._rng.integers(0, self.num_examples, size=size)
        x = pack_structure(self._x_template, [a[idx] for a in self._x_leaves])
        y = None if self._y_template is None else pack_structure(
            self._y_template, [a[idx] for a in self._y_leaves])
        return x, y
