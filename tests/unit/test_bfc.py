"""The model of TensorFlow's BFC allocator (batchfit.core.bfc) against its rules and a real trace."""

from __future__ import annotations

import doctest
import gzip
import json
from pathlib import Path

import pytest

from batchfit.core import bfc
from batchfit.core.bfc import AllocatorFull, BFCModel, bin_for, replay, rounded, variable_events

TRACE = Path(__file__).parent / "data" / "bfc_trace_seed_mlp.json.gz"


def test_docstring_examples() -> None:
    assert doctest.testmod(bfc).failed == 0


def test_rounding_and_bins() -> None:
    assert [rounded(n) for n in (0, 1, 255, 256, 257, 4096)] == [256, 256, 256, 256, 512, 4096]
    assert [bin_for(n) for n in (256, 511, 512, 1024, 1 << 40)] == [0, 0, 1, 2, 20]


def test_chunk_under_twice_the_request_is_handed_out_whole() -> None:
    m = BFCModel(1 << 20)
    hole = m.allocate(10_000)          # 10,240
    m.allocate(256)                    # keeps the hole from merging with the rest
    m.free(hole)
    p = m.allocate(6_000)              # 6,144: 10,240 < 2 * 6,144, so the whole hole
    assert p == hole and m.chunk_size(p) == 10_240
    m.free(p)
    q = m.allocate(4_000)              # 4,096: 10,240 >= 8,192, so split
    assert q == hole and m.chunk_size(q) == 4_096
    assert m.in_use == 4_096 + 256


def test_best_fit_then_lowest_address() -> None:
    m = BFCModel(1 << 20)
    a = m.allocate(8_192)
    m.allocate(256)
    b = m.allocate(4_096)
    m.allocate(256)
    c = m.allocate(4_096)
    m.allocate(256)
    for p in (a, b, c):
        m.free(p)
    assert m.allocate(3_000) == b      # the smaller holes first, the lower of two equal ones
    assert m.allocate(3_000) == c
    assert m.allocate(3_000) == a      # only the 8 KiB hole holds it now: split (>= 2x)


def test_free_merges_neighbours_but_not_across_regions() -> None:
    m = BFCModel(4_096, 4_096)
    a, b = m.allocate(2_048), m.allocate(2_048)  # region one, full
    m.free(a)
    m.free(b)
    assert m.chunk_size(m.allocate(4_096)) == 4_096  # the two merged into one chunk
    c = m.allocate(4_096)                             # the second region
    with pytest.raises(AllocatorFull):
        m.allocate(256)
    m.free(c)
    assert m.in_use == 4_096 and m.peak == 8_192


def test_freeing_twice_is_refused() -> None:
    m = BFCModel(1 << 16)
    p = m.allocate(300)
    m.free(p)
    with pytest.raises(Exception, match="no chunk in use"):
        m.free(p)


def test_replays_a_recorded_tensorflow_trace_exactly() -> None:
    """Every chunk size, address and the bytes in use of a real process, event by event."""
    events = json.loads(gzip.decompress(TRACE.read_bytes()))["events"]
    m = BFCModel(2 << 20, 1 << 30)  # the capped worker's regions: 2 MiB, then the budget
    first = m.allocate(256)         # the worker's allocator before the trace: [free][used]
    m.allocate(256)
    m.free(first)
    where: dict[int, int] = {}
    base = None
    for kind, requested, chunk, addr, in_use in events:
        if kind == "A":
            p = m.allocate(requested)
            base = addr - p if base is None else base
            assert (m.chunk_size(p), p) == (chunk, addr - base)
            where[addr] = p
        else:
            m.free(where.pop(addr))
        assert m.in_use == in_use
    assert m.peak == 121_344  # the step's measured peak (get_memory_info)


def test_variable_events_keep_only_the_variable_and_its_handle() -> None:
    m = BFCModel(1 << 20)
    kept = replay(variable_events("w", 10_000, random=True), m)
    assert kept == {"w": 10_240, "w/handle": 256}
    kept = replay(variable_events("z", 100, random=False), m)
    assert kept == {"z": 256, "z/handle": 256}
