"""Argument checks, in one place: each names the argument, what it must be, and what it got.

Every public entry point checks its arguments here before any work starts, so a bad value is an
:class:`~batchfit.errors.InvalidInputError` (exit 2 in the CLI) in the first millisecond, not an
error from TensorFlow after minutes of probing. ``bool`` is never taken as an integer (``True``
is an ``int`` in Python, and ``steps=True`` is a mistake, not 1). NumPy integers are taken where
a caller would compute a size with NumPy.

Example:

>>> from batchfit.core.validate import check_int, check_fraction
>>> check_int("steps", 3, minimum=1)
3
>>> check_fraction("headroom", 0.1, low=0.0, high=1.0, include_low=True)
0.1
>>> check_int("steps", True, minimum=1)
Traceback (most recent call last):
...
batchfit.errors.InvalidInputError: steps must be an integer >= 1, got True
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any

from ..errors import InvalidInputError


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer (Python or NumPy), and not a ``bool``."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """Whether ``value`` is a real number (int, float, NumPy scalar), and not a ``bool``."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(name: str, value: Any, *, minimum: int = 1, maximum: int | None = None,
              optional: bool = False, hint: str = "") -> int | None:
    """``value`` as an ``int`` when it is an integer in ``[minimum, maximum]``.

    Args:
        name: the argument's name, as the caller wrote it (``"steps"``, ``"--steps"``).
        value: what the caller passed.
        minimum: the smallest value allowed (default 1).
        maximum: the largest value allowed (default: none).
        optional: ``None`` is allowed (and returned).
        hint: an example or reason appended to the message (``"e.g. 8 for tensor cores"``).

    Raises:
        InvalidInputError: ``value`` is not such an integer.
    """
    if value is None and optional:
        return None
    ok = is_int(value) and value >= minimum and (maximum is None or value <= maximum)
    if not ok:
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        extra = f" ({hint})" if hint else ""
        raise InvalidInputError(f"{name} must be an integer {bound}{' or None' if optional else ''}"
                                f"{extra}, got {value!r}")
    return int(value)


def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 include_low: bool = False, include_high: bool = False,
                 optional: bool = False, hint: str = "") -> float | None:
    """``value`` as a ``float`` when it is a finite number within the given bounds.

    Bounds are exclusive unless ``include_low`` / ``include_high`` say otherwise.

    Raises:
        InvalidInputError: ``value`` is not such a number.
    """
    if value is None and optional:
        return None
    ok = is_number(value) and float(value) == float(value)  # NaN is never in range
    if ok and low is not None:
        ok = float(value) >= low if include_low else float(value) > low
    if ok and high is not None:
        ok = float(value) <= high if include_high else float(value) < high
    if not ok:
        raise InvalidInputError(f"{name} must be {_range_text(low, high, include_low, include_high)}"
                                f"{' or None' if optional else ''}"
                                f"{f' ({hint})' if hint else ''}, got {value!r}")
    return float(value)


def check_fraction(name: str, value: Any, *, low: float = 0.0, high: float = 1.0,
                   include_low: bool = False, include_high: bool = False,
                   hint: str = "") -> float:
    """``value`` as a ``float`` in the interval; a fraction by default, ``(0, 1)``."""
    result = check_number(name, value, low=low, high=high, include_low=include_low,
                          include_high=include_high, hint=hint)
    return float(result)  # type: ignore[arg-type]


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """``value`` when it is one of ``choices`` (strings).

    Raises:
        InvalidInputError: it is not; the message lists the choices.
    """
    options = tuple(choices)
    if not isinstance(value, str) or value not in options:
        raise InvalidInputError(f"{name} must be one of {', '.join(options)}, got {value!r}")
    return value


def _range_text(low: float | None, high: float | None, include_low: bool,
                include_high: bool) -> str:
    if low is not None and high is not None:
        return (f"a number in {'[' if include_low else '('}{low:g}, {high:g}"
                f"{']' if include_high else ')'}")
    if low is not None:
        return f"a number {'>=' if include_low else '>'} {low:g}"
    if high is not None:
        return f"a number {'<=' if include_high else '<'} {high:g}"
    return "a number"


__all__ = ["check_choice", "check_fraction", "check_int", "check_number", "is_int",
           "is_number"]
