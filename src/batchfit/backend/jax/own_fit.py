"""The user's own ``model.fit`` at one batch size on JAX, with a validation pass (``verify``).

Runs in a fresh process under the budget's environment (on a GPU, XLA's preallocated pool sized
to the budget). On a CPU JAX has no allocator cap and keeps no statistics: nothing could run out
of memory there, so a "fits" would prove nothing; the job says so instead of passing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...errors import InvalidInputError, error_line
from .. import BatchFn, is_oom_error
from .probe import device_kind, read_peak

__all__ = ["own_fit"]


def _batches(x: Any, y: Any, size: int, start: int, count: int) -> Any:
    """``count`` batches of ``size`` from host arrays, handed to ``fit`` one at a time (Keras
    is imported here, not at module level: importing this module starts no framework)."""
    import keras

    class Batches(keras.utils.PyDataset):
        def __len__(self) -> int:
            return count

        def __getitem__(self, i: int) -> Any:
            lo = (start + i) * size
            xb = keras.tree.map_structure(lambda a: a[lo:lo + size], x)
            if y is None:
                return (xb,)
            return xb, keras.tree.map_structure(lambda a: a[lo:lo + size], y)

    return Batches()


def own_fit(model: Any, batch_fn: BatchFn, batch_size: int, *, epochs: int, steps: int,
            device: str) -> dict[str, Any]:
    """See :meth:`batchfit.backend.Backend.own_fit`.

    Raises:
        InvalidInputError: on a CPU, where JAX caps no memory (nothing to verify against).
    """
    if device_kind(device) != "gpu":  # the parent refuses first (Backend.uncapped_reason)
        raise InvalidInputError("verify on the jax backend needs a GPU: JAX caps no memory "
                                "on a CPU")
    import keras

    x, y = keras.tree.map_structure(np.asarray, batch_fn(batch_size * (steps + 1)))
    try:
        model.fit(_batches(x, y, batch_size, 0, steps), epochs=epochs, verbose=0,
                  validation_data=_batches(x, y, batch_size, steps, 1))
    except Exception as exc:  # noqa: BLE001 - reported to the parent as data
        outcome = "oom" if is_oom_error(exc) else "error"
        return {"outcome": outcome, "peak_bytes": read_peak(),
                "message": f"{type(exc).__name__}: {error_line(exc, limit=300)}"}
    return {"outcome": "fit", "peak_bytes": read_peak(), "message": ""}
