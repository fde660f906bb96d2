"""``@batchfit.adaptive_batch_size``: retry a custom training function smaller on out-of-memory.

For training loops of one's own (where :func:`batchfit.fit` does not apply). The decorated
function takes the batch size as its first argument; the decorator calls it with the current
size and, when it raises an out-of-memory error (:func:`batchfit.is_oom_error`), asks the shrink
policy for a smaller size and calls it again. Unlike Accelerate's ``find_executable_batch_size``
the state is explicit: ``fn.state`` (an :class:`AdaptiveBatchState`) holds the current size and
every attempt, survives between calls (the next call starts at the last size that worked) and
can be reset. Both ``@adaptive_batch_size`` and ``@adaptive_batch_size(start=...)`` pass every
positional and keyword argument through.

This module imports no TensorFlow: it works with any framework whose OOM errors the predicate
knows. The function itself must make a retry safe (rebuild or restore what a failed try
changed): the decorator cannot know the training state of a custom loop.
"""

from __future__ import annotations

import functools
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

from ..backend.oom import is_oom_error
from ..core.shrink import HalvingShrink, Observation, ShrinkPolicy, next_smaller
from ..core.validate import check_int
from ..errors import InvalidInputError, TrainingOutOfMemoryError

__all__ = ["AdaptiveBatchState", "adaptive_batch_size"]

LOGGER = logging.getLogger("batchfit")
R = TypeVar("R")


@dataclass
class AdaptiveBatchState:
    """The inspectable state of an :func:`adaptive_batch_size`-decorated function.

    Attributes:
        start: the first batch size tried.
        batch_size: the size the next call starts with (the last one that worked, or the next
            one to try after a failure).
        attempts: every try as ``(batch_size, succeeded, detail)``.
    """

    start: int
    batch_size: int
    attempts: list[tuple[int, bool, str]] = field(default_factory=list)

    def reset(self) -> None:
        """Start again from ``start`` (keeps no attempts)."""
        self.batch_size = self.start
        self.attempts.clear()

    @property
    def observations(self) -> list[Observation]:
        """The attempts as a shrink policy reads them (no peak bytes)."""
        return [(b, ok, None) for b, ok, _ in self.attempts]


def _check_start(start: object) -> int:
    return int(check_int("start", start, minimum=1))  # type: ignore[arg-type]


def _decorate(fn: Callable[..., R], start: int, policy: ShrinkPolicy,
              logger: logging.Logger) -> Callable[..., R]:
    state = AdaptiveBatchState(start=start, batch_size=start)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> R:
        if "batch_size" in kwargs:
            raise InvalidInputError(
                f"{fn.__name__} is decorated with @adaptive_batch_size, which passes the batch "
                "size as the first argument: call it without batch_size= (set the first size "
                "with start=, or change wrapper.state.batch_size)")
        while True:
            size = state.batch_size
            t0 = time.perf_counter()
            detail = None
            try:
                result = fn(size, *args, **kwargs)
            except Exception as exc:
                if not is_oom_error(exc):
                    raise
                lines = str(exc).strip().splitlines()  # empty for e.g. `raise E() from oom`
                detail = f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"
            if detail is None:
                state.attempts.append((size, True, ""))
                return result
            # Outside the handler, so the failed try's tensors (held by the traceback) can go.
            gc.collect()
            state.attempts.append((size, False, detail))
            new = next_smaller(policy, size, state.observations)
            if new is None:
                raise TrainingOutOfMemoryError(
                    f"{fn.__name__} ran out of memory even at batch size {size}: the memory "
                    f"that does not depend on the batch leaves no room ({detail})")
            state.batch_size = new
            logger.warning("batchfit: %s ran out of memory at batch size %d after %.1f s; "
                           "retrying at %d", fn.__name__, size, time.perf_counter() - t0,
                           state.batch_size)

    wrapper.state = state  # type: ignore[attr-defined]
    return wrapper


@overload
def adaptive_batch_size(fn: Callable[..., R], *, start: int = ...,
                        policy: ShrinkPolicy | None = ...,
                        logger: logging.Logger | None = ...) -> Callable[..., R]: ...
@overload
def adaptive_batch_size(fn: None = ..., *, start: int = ..., policy: ShrinkPolicy | None = ...,
                        logger: logging.Logger | None = ...
                        ) -> Callable[[Callable[..., R]], Callable[..., R]]: ...


def adaptive_batch_size(fn: Callable[..., R] | None = None, *, start: int = 128,
                        policy: ShrinkPolicy | None = None,
                        logger: logging.Logger | None = None) -> Any:
    """Call ``fn(batch_size, *args, **kwargs)``, retrying at a smaller size on out-of-memory.

    Use bare (``@adaptive_batch_size``, starting at 128) or with options
    (``@adaptive_batch_size(start=64)``); both pass all arguments through and return what
    ``fn`` returns. Errors other than out-of-memory propagate unchanged. The decorated
    function has a ``state`` attribute (:class:`AdaptiveBatchState`).

    Args:
        fn: the function (when used bare).
        start: the first batch size (default 128).
        policy: a shrink policy (default :class:`batchfit.HalvingShrink`).
        logger: where retries are logged (default ``logging.getLogger("batchfit")``).

    Raises:
        TrainingOutOfMemoryError: when even the smallest size the policy allows runs out of
            memory.

    Example:

    >>> import tensorflow as tf
    >>> @adaptive_batch_size(start=64)
    ... def train(batch_size, epochs, *, lr):
    ...     if batch_size > 16:
    ...         raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating")
    ...     return batch_size, epochs, lr
    >>> train(3, lr=0.1)
    (16, 3, 0.1)
    >>> train.state.batch_size, [a[0] for a in train.state.attempts]
    (16, [64, 32, 16])
    """
    start = _check_start(start)
    chosen = policy if policy is not None else HalvingShrink()
    if not callable(getattr(chosen, "next_size", None)):
        raise InvalidInputError(f"policy needs a next_size(failed, observations) method, "
                                f"got {chosen!r}")
    log = logger or LOGGER
    if fn is None:
        return lambda f: _decorate(f, start, chosen, log)
    if not callable(fn):
        raise InvalidInputError(
            f"adaptive_batch_size decorates a function, got {fn!r}; to set the first size "
            "write @adaptive_batch_size(start=...)")
    return _decorate(fn, start, chosen, log)
