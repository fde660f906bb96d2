"""The user's own ``model.fit`` at one batch size, with a validation pass (``batchfit verify``).

Runs in a fresh process under the emulated device (:mod:`batchfit.emulation.fit_job`); the
allocator's statistics are reset after the device was configured (its single-region
reservation would otherwise be the peak), so the peak is ``fit``'s own.

The data go in as NumPy arrays, ``fit(x, y, batch_size=...)``, as a user's script under
``batchfit run`` passes them and as the probes run: Keras gathers each batch from the whole
arrays, held as one tensor in the capped allocator, in a parallel ``tf.data`` map that runs
beside the step. Batches fed one at a time (a ``keras.utils.PyDataset`` until session 15, or a
generator with a static batch dimension) need less: the Transformer of the examples at 120
under 64 MiB trained 2 of 2 that way (peak 58-62 MiB) and ran out of memory at its second step
2 of 2 on arrays of 16 batches. The arrays hold ``steps + 1`` batches (the last for
validation); a GPU would keep them in host memory, so large batches of large inputs cost the
emulation more than the device.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from ...errors import error_line
from .. import BatchFn, is_oom_error

__all__ = ["own_fit"]


def _peak(device: str) -> int | None:
    try:
        return int(tf.config.experimental.get_memory_info(device)["peak"])
    except (ValueError, RuntimeError):
        return None


def own_fit(model: Any, batch_fn: BatchFn, batch_size: int, *, epochs: int, steps: int,
            device: str) -> dict[str, Any]:
    """See :meth:`batchfit.backend.Backend.own_fit`."""
    x, y = tf.nest.map_structure(np.asarray, batch_fn(batch_size * (steps + 1)))
    n = batch_size * steps

    def cut(tree: Any, lo: int, hi: int | None) -> Any:
        return None if tree is None else tf.nest.map_structure(lambda a: a[lo:hi], tree)

    val = (cut(x, n, None),) if y is None else (cut(x, n, None), cut(y, n, None))
    try:
        tf.config.experimental.reset_memory_stats(device)
    except (ValueError, RuntimeError):
        pass
    try:
        model.fit(cut(x, 0, n), cut(y, 0, n), batch_size=batch_size, epochs=epochs, verbose=0,
                  validation_data=val)
    except Exception as exc:  # noqa: BLE001 - reported to the parent as data
        outcome = "oom" if is_oom_error(exc) else "error"
        return {"outcome": outcome, "peak_bytes": _peak(device),
                "message": f"{type(exc).__name__}: {error_line(exc, limit=300, prefer='OOM when')}"}
    return {"outcome": "fit", "peak_bytes": _peak(device), "message": ""}
