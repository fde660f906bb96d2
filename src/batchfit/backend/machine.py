"""The machine's own speed: a fixed NumPy workload, timed before and after a measurement.

On a shared machine the speed of everything drifts (other work, clock changes). Timing the same
small workload before and after the throughput windows tells how far the machine itself moved
meanwhile, so a difference between batch sizes smaller than that is not read as the model's.
Nothing here imports a Keras backend.

Example:

>>> from batchfit.backend.machine import reference_rate
>>> reference_rate(seconds=0.01, windows=1) > 0
True
"""

from __future__ import annotations

import statistics
import time

from ..errors import InvalidInputError

__all__ = ["reference_rate"]


def reference_rate(seconds: float = 0.2, windows: int = 3) -> float:
    """Median rate (sorts per second) of a fixed single-threaded NumPy workload.

    A sort of 65,536 fixed floats: one thread, so its rate follows the machine's load and clock,
    not a BLAS thread pool's start-up (a 256x256 product, multi-threaded, read 60/s before
    TensorFlow was imported and 3,700/s after, on the same idle-ish 2-core machine: measured).

    Args:
        seconds: wall time of each window.
        windows: how many windows; the median is returned.
    """
    import numpy as np

    if not seconds > 0 or windows < 1:
        raise InvalidInputError(f"need seconds > 0 and windows >= 1, got {seconds!r}, {windows!r}")
    a = np.random.default_rng(0).standard_normal(1 << 16)
    rates = []
    for _ in range(windows):
        n, t0 = 0, time.perf_counter()
        while True:
            np.sort(a)
            n += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds:
                break
        rates.append(n / elapsed)
    return statistics.median(rates)
