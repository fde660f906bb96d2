"""Environment switches that turn a measured behaviour of the probe processes off.

Each is on unless its variable is ``0``: ``BATCHFIT_COMPILE_CACHE`` (processes share compiled
XLA programs), ``BATCHFIT_STALL_WATCH`` (a probe waiting on the capped allocator is stopped
early), ``BATCHFIT_FORK_SERVER`` (workers are forked from a preloaded server),
``BATCHFIT_REUSE_WORKER`` (ascending fits run in one process), ``BATCHFIT_FRESH_NEAR_EDGE``
(a search probe predicted near the budget runs in a fresh process, not a reused one),
``BATCHFIT_PREPARE_AHEAD`` (a process started ahead of a probe whose size is known traces its
step for that size while the current probe runs). They exist to measure each behaviour against
its absence.
"""

from __future__ import annotations

import os

from ..errors import InvalidInputError

SWITCHES = ("BATCHFIT_COMPILE_CACHE", "BATCHFIT_STALL_WATCH", "BATCHFIT_FORK_SERVER",
            "BATCHFIT_REUSE_WORKER", "BATCHFIT_FRESH_NEAR_EDGE", "BATCHFIT_PREPARE_AHEAD")


def switched_on(name: str) -> bool:
    """Whether the switch ``name`` is on: unset or anything but ``0``.

    Example:

    >>> import os

from ..errors import InvalidInputError
    >>> os.environ["BATCHFIT_REUSE_WORKER"] = "0"
    >>> switched_on("BATCHFIT_REUSE_WORKER"), switched_on("BATCHFIT_STALL_WATCH")
    (False, True)
    >>> del os.environ["BATCHFIT_REUSE_WORKER"]
    """
    if name not in SWITCHES:
        raise InvalidInputError(f"unknown switch {name!r}; known: {', '.join(SWITCHES)}")
    return os.environ.get(name, "1").strip() != "0"
