"""One predicate that recognises an out-of-memory error, and nothing else.

TensorFlow raises :class:`tf.errors.ResourceExhaustedError` when an allocator refuses (GPU
memory, or a capped CPU allocator). It also reaches users wrapped: inside an ``UnknownError`` or
``InvalidArgumentError`` raised out of a ``tf.py_function`` / ``tf.data`` pipeline, as the
``__cause__``/``__context__`` of another exception, or only as text ("OOM when allocating
tensor ..."). This module never imports TensorFlow itself, so callers without it can use it.
"""

from __future__ import annotations

_OOM_CLASS_NAMES = frozenset({"ResourceExhaustedError"})
_OOM_MARKERS = (
    "ResourceExhaustedError",
    "OOM when allocating",
    "Out of memory while trying to allocate",   # XLA
    "RESOURCE_EXHAUSTED",                       # XLA / gRPC status text
    "failed to allocate memory",
)
# Errors that merely carry the word but are not allocator refusals.
_NOT_OOM_CLASS_NAMES = frozenset({"KeyboardInterrupt", "SystemExit"})


def is_oom_error(exc: BaseException | None) -> bool:
    """Whether ``exc`` is (or wraps) an out-of-memory error from TensorFlow or XLA.

    Follows the ``__cause__``/``__context__`` chain, and reads the message of TensorFlow's
    ``OpError`` wrappers (``UnknownError`` from a ``py_function`` carries the original
    ``ResourceExhaustedError`` only as text). Any other error returns ``False``.

    Args:
        exc: the exception to classify (``None`` gives ``False``).

    Returns:
        ``True`` only for memory exhaustion.

    Example:

    >>> is_oom_error(RuntimeError("OOM when allocating tensor with shape[64,1024]"))
    True
    >>> is_oom_error(ValueError("Batch size 200 exceeds maximum allowed 128"))
    False
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        names = {cls.__name__ for cls in type(exc).__mro__}
        if names & _NOT_OOM_CLASS_NAMES:
            return False
        if names & _OOM_CLASS_NAMES:
            return True
        text = str(exc)
        if any(marker in text for marker in _OOM_MARKERS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
