"""The user's own ``model.fit`` at one batch size, with a validation pass (``batchfit verify``).

Runs in a fresh process under the emulated device (:mod:`batchfit.emulation.fit_job`); the
allocator's statistics are reset after the device was configured (its single-region
reservation would otherwise be the peak), so the peak is ``fit``'s own.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from ...errors import error_line
from .. import BatchFn, is_oom_error

__all__ = ["own_fit"]


def _batches(x: Any, y: Any, size: int, start: int, count: int) -> Any:
    """``count`` batches of ``size`` from host arrays, converted one at a time (as a GPU
    receives them: the whole data set never sits in the capped allocator at once), with the
    batch dimension static, as Keras gives the step for arrays (``fit(x, y, batch_size=...)``).

    A ``keras.utils.PyDataset`` (until session 15) leaves the batch dimension ``None``: the step
    then runs its general graph, which may need less. Measured: the Transformer of the examples
    at 120 under 64 MiB trained 2 of 2 that way, and ran out of memory 2 of 2 with arrays.
    """
    def one(a: Any, i: int) -> Any:
        lo = (start + i) * size
        return a[lo:lo + size]

    parts = (x,) if y is None else (x, y)

    def gen() -> Any:
        for i in range(count):
            yield tf.nest.map_structure(lambda a, i=i: one(a, i), parts)

    spec = tf.nest.map_structure(
        lambda a: tf.TensorSpec((size, *a.shape[1:]), tf.as_dtype(a.dtype)), parts)
    return tf.data.Dataset.from_generator(gen, output_signature=spec)


def _peak(device: str) -> int | None:
    try:
        return int(tf.config.experimental.get_memory_info(device)["peak"])
    except (ValueError, RuntimeError):
        return None


def own_fit(model: Any, batch_fn: BatchFn, batch_size: int, *, epochs: int, steps: int,
            device: str) -> dict[str, Any]:
    """See :meth:`batchfit.backend.Backend.own_fit`."""
    x, y = tf.nest.map_structure(np.asarray, batch_fn(batch_size * (steps + 1)))
    try:
        tf.config.experimental.reset_memory_stats(device)
    except (ValueError, RuntimeError):
        pass
    try:
        model.fit(_batches(x, y, batch_size, 0, steps), epochs=epochs, verbose=0,
                  validation_data=_batches(x, y, batch_size, steps, 1))
    except Exception as exc:  # noqa: BLE001 - reported to the parent as data
        outcome = "oom" if is_oom_error(exc) else "error"
        return {"outcome": outcome, "peak_bytes": _peak(device),
                "message": f"{type(exc).__name__}: {error_line(exc, limit=300, prefer='OOM when')}"}
    return {"outcome": "fit", "peak_bytes": _peak(device), "message": ""}
