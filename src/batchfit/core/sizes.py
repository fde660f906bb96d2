"""Parse and format memory sizes: ``"16GiB"`` to bytes and back.

Binary units (``KiB`` ... ``EiB``) are powers of 1024; decimal units (``KB`` ... ``EB``) are
powers of 1000, as on a disk label. A bare letter (``K``, ``M``, ``G``, ``T``, ``P``, ``E``)
means the **binary** unit, because memory is sized in powers
of two and that is what ``nvidia-smi``, ``free -h`` and TensorFlow's ``*_MB`` variables mean.
Units are case-insensitive (``"16gib"`` is ``"16GiB"``); a number without a unit is bytes.

Example:

>>> parse_size("1.5 GiB")
1610612736
>>> format_bytes(parse_size("512MiB"))
'512.0 MiB'
"""

from __future__ import annotations

import math
import re

from ..errors import InvalidInputError

__all__ = ["UNITS", "format_bytes", "parse_size"]

#: Multiplier of every unit ``parse_size`` accepts (keys lower-case).
UNITS: dict[str, int] = {
    "": 1, "b": 1, "byte": 1, "bytes": 1,
    # bare letters are binary (memory is sized in powers of two)
    "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4, "p": 1024**5, "e": 1024**6,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4, "pib": 1024**5,
    "eib": 1024**6,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4, "pb": 1000**5, "eb": 1000**6,
}

_SIZE_RE = re.compile(
    r"^\s*(?P<num>[+-]?(?:\d+(?:_\d+)*(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?)\s*(?P<unit>[a-z]*)\s*$",
    re.IGNORECASE,
)

_EXAMPLES = '"16GiB", "512MiB", "1.5 GiB", "16GB" (decimal), "2G" (binary) or 1048576 (bytes)'


def _bad(value: object, why: str) -> InvalidInputError:
    return InvalidInputError(f"invalid memory size {value!r}: {why}; write it like {_EXAMPLES}")


def parse_size(value: str | float) -> int:
    """Convert a memory size such as ``"16GiB"`` or ``1048576`` to a whole number of bytes.

    Accepts an ``int`` or ``float`` (bytes), or text made of a number and an optional unit,
    with or without a space between them: binary ``KiB``/``MiB``/``GiB``/``TiB``/``PiB``,
    decimal ``KB``/``MB``/``GB``/``TB``/``PB``, or a bare ``K``/``M``/``G``/``T``/``P``, which
    means the *binary* unit (``"2G"`` is 2 GiB). Case does not matter. Fractional byte counts
    are rounded to the nearest byte.

    Args:
        value: the size, e.g. ``"16GiB"``, ``"1.5 gib"``, ``"16GB"``, ``"512M"``, ``1 << 30``.

    Returns:
        The size in bytes, at least 1.

    Raises:
        InvalidInputError: for text that is not a size, an unknown unit, a boolean, a
            negative, zero, NaN or infinite value. The message names the value and shows
            valid examples.

    Example:

    >>> parse_size("16GiB"), parse_size("16GB"), parse_size("512m"), parse_size(1024)
    (17179869184, 16000000000, 536870912, 1024)
    """
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _bad(value, f"expected text or a number of bytes, got {type(value).__name__}")
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match is None:
            raise _bad(value, "not a number followed by an optional unit")
        unit = match.group("unit").lower()
        if unit not in UNITS:
            raise _bad(value, f"unknown unit {match.group('unit')!r}")
        digits = match.group("num").replace("_", "")
        number = float(digits)
        multiplier = UNITS[unit]
        if digits.lstrip("+").isdigit():
            exact = int(digits) * multiplier    # whole numbers stay exact beyond 2**53
            if exact >= 1:
                return exact
    else:
        number = float(value)
        multiplier = 1
    if math.isnan(number) or math.isinf(number):
        raise _bad(value, "not a finite number")
    if number < 0:
        raise _bad(value, "a size cannot be negative")
    if isinstance(value, int) and not isinstance(value, bool):
        result = value  # exact, even beyond float precision
    else:
        result = round(number * multiplier)
    if result < 1:
        raise _bad(value, "a size must be at least one byte")
    return int(result)


_BINARY_NAMES = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def format_bytes(n: float) -> str:
    """Render a byte count in binary units for people: ``"1.50 GiB"``, ``"512.0 MiB"``.

    Below 1 KiB the count is shown as whole bytes (``"900 B"``). Above, the value has two
    decimals when under 10 and one decimal otherwise, so widths stay short and stable.

    Args:
        n: a number of bytes (may be negative, e.g. a difference; non-finite is shown as is).

    Returns:
        The text, e.g. ``"1.50 GiB"``.

    Example:

    >>> format_bytes(1.5 * 2**30), format_bytes(512 * 2**20), format_bytes(900)
    ('1.50 GiB', '512.0 MiB', '900 B')
    """
    if isinstance(n, bool) or not isinstance(n, (int, float)):
        n = float(n)  # numpy scalars and the like
    if not math.isfinite(n):
        return f"{n} B"
    sign = "-" if n < 0 else ""
    size = abs(float(n))
    if round(size) < 1024:
        return f"{sign}{round(size):d} B"
    value = size
    for name in _BINARY_NAMES:
        value /= 1024.0
        text = f"{value:.2f}" if value < 10 else f"{value:.1f}"
        if float(text) < 1024 or name == _BINARY_NAMES[-1]:
            return f"{sign}{text} {name}"
    raise AssertionError("unreachable")  # pragma: no cover
