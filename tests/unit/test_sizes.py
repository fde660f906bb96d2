"""Unit tests of batchfit.core.sizes: parsing and formatting memory sizes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchfit.core.sizes import format_bytes, parse_size
from batchfit.errors import InvalidInputError

GiB, MiB, KiB = 2**30, 2**20, 2**10


@pytest.mark.parametrize(("text", "expected"), [
    ("16GiB", 16 * GiB),
    ("512MiB", 512 * MiB),
    ("1.5 GiB", 3 * GiB // 2),
    ("16GB", 16 * 10**9),
    ("512M", 512 * MiB),          # bare letters are binary
    ("2G", 2 * GiB),
    ("1048576", 1048576),
    (" 4 kib ", 4 * KiB),
    ("16gb", 16 * 10**9),
    ("1T", 2**40),
    ("1tb", 10**12),
    ("100 bytes", 100),
    ("7b", 7),
    (".5G", GiB // 2),
    ("1e3", 1000),
    ("1_000 MB", 10**9),
    (1024, 1024),
    (2.0 * MiB, 2 * MiB),
    (2**70, 2**70),               # ints stay exact beyond float precision
])
def test_parse_size_accepts(text: str | float, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", [
    "", "GiB", "abc", "16 GiBs", "1,5GiB", "-1GiB", "-5", "0", "0 MiB", "nan", "inf",
    "1.2.3G", "0.1", True, False, -3, 0, float("nan"), float("inf"), 0.2, None, [1],
])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(InvalidInputError) as info:
        parse_size(bad)  # type: ignore[arg-type]
    message = str(info.value)
    assert repr(bad) in message and "16GiB" in message    # names the value, shows examples
    assert isinstance(info.value, ValueError)


@given(st.integers(min_value=1, max_value=2**62))
def test_parse_size_plain_integers_are_bytes(n: int) -> None:
    assert parse_size(n) == n
    assert parse_size(str(n)) == n


@pytest.mark.parametrize(("n", "text"), [
    (1.5 * GiB, "1.50 GiB"),
    (512 * MiB, "512.0 MiB"),
    (900, "900 B"),
    (0, "0 B"),
    (1023, "1023 B"),
    (1024, "1.00 KiB"),
    (10 * MiB, "10.0 MiB"),
    (1024 * GiB, "1.00 TiB"),
    (1023.9999 * MiB, "1.00 GiB"),  # rounding never shows "1024.0 MiB"
    (-1.5 * GiB, "-1.50 GiB"),
])
def test_format_bytes(n: float, text: str) -> None:
    assert format_bytes(n) == text


@given(st.integers(min_value=1024, max_value=2**60))
def test_format_then_parse_is_close(n: int) -> None:
    back = parse_size(format_bytes(n))
    assert abs(back - n) <= 0.005 * n
