"""A model of TensorFlow's BFC allocator: what a sequence of allocations occupies in it.

TensorFlow's best-fit-with-coalescing allocator (``tsl/framework/bfc_allocator.cc``; the CPU
allocator with ``TF_CPU_ALLOCATOR_USE_BFC``, and every GPU's) counts as *in use* the size of
the chunk it hands out, not the bytes asked for, and the chunk can be larger than the request:

- every request is rounded up to a multiple of 256 bytes;
- free chunks sit in 21 bins of doubling size (256 B, 512 B, ...); a request takes the
  smallest free chunk that holds it (ties: the lowest address), searching from its own bin up;
- the chunk is split only when it is at least twice the rounded request (or the rest is at
  least 128 MiB); otherwise the whole chunk is handed out, up to twice the request;
- a freed chunk merges with free neighbours.

So the bytes in use depend on the sizes *and the order* of the allocations and frees: an
optimizer slot created where an initializer's temporaries were freed can take a chunk of
nearly twice its size. :class:`BFCModel` replays a sequence of allocations and frees in one
region (the budget reserved at once, as batchfit's probe workers and a GPU without
``allow_growth`` do) and reports the bytes in use and the peak.

Example:

>>> from batchfit.core.bfc import BFCModel
>>> bfc = BFCModel(1 << 20)
>>> a = bfc.allocate(1000)          # rounded up to 1024
>>> b = bfc.allocate(3000)          # 3072
>>> bfc.free(a)
>>> c = bfc.allocate(600)           # the 1024-byte hole is under twice 768: taken whole
>>> bfc.in_use, bfc.peak
(4096, 4096)
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from ..errors import InvalidInputError

#: Every allocation is rounded up to a multiple of this (``kMinAllocationSize``).
MIN_ALLOCATION = 256
#: Number of bins (``kNumBins``); bin ``i`` holds free chunks of at least ``256 << i`` bytes.
NUM_BINS = 21
#: A chunk larger than the request by at least this is split anyway (the default
#: ``max_internal_fragmentation_bytes`` when no ``fragmentation_fraction`` is set).
MAX_INTERNAL_FRAGMENTATION = 128 << 20


def rounded(num_bytes: int) -> int:
    """``num_bytes`` rounded up as the allocator rounds a request (at least 256).

    >>> rounded(1), rounded(256), rounded(257)
    (256, 256, 512)
    """
    return max(MIN_ALLOCATION, -(-int(num_bytes) // MIN_ALLOCATION) * MIN_ALLOCATION)


def bin_for(size: int) -> int:
    """The bin of a chunk of ``size`` bytes: ``floor(log2(size / 256))``, at most 20."""
    return min(NUM_BINS - 1, (max(size, MIN_ALLOCATION) >> 8).bit_length() - 1)


@dataclass
class _Chunk:
    size: int
    in_use: bool = False


class AllocatorFull(InvalidInputError):
    """The modelled region has no free chunk for a request (the budget is too small)."""


class BFCModel:
    """A BFC allocator's regions, replaying allocations and frees.

    Args:
        *region_bytes: the size of each region, in the order the allocator created them
            (free chunks of equal size are taken from the earlier region first). A GPU
            without ``allow_growth`` holds one region, its budget; batchfit's capped CPU
            workers hold the allocator's first 2 MiB region and then the rest of the budget.
    """

    def __init__(self, *region_bytes: int) -> None:
        if not region_bytes:
            raise InvalidInputError("give the size of at least one region")
        self._chunks: dict[int, _Chunk] = {}
        self._starts: list[int] = []  # chunk start addresses, sorted
        self._bins: list[list[tuple[int, int]]] = [[] for _ in range(NUM_BINS)]
        self._region_starts: set[int] = set()
        base = 0
        for region in region_bytes:
            size = (int(region) // MIN_ALLOCATION) * MIN_ALLOCATION
            if size < MIN_ALLOCATION:
                raise InvalidInputError(f"a region needs at least {MIN_ALLOCATION} bytes")
            self._chunks[base] = _Chunk(size)
            self._starts.append(base)
            self._region_starts.add(base)
            self._insert_free(base)
            base += size + MIN_ALLOCATION  # regions never touch: chunks never merge across
        self.region_bytes = sum(c.size for c in self._chunks.values())
        self.in_use = 0
        self.peak = 0

    # -- free lists ---------------------------------------------------------------------------
    def _insert_free(self, ptr: int) -> None:
        c = self._chunks[ptr]
        bisect.insort(self._bins[bin_for(c.size)], (c.size, ptr))

    def _remove_free(self, ptr: int) -> None:
        c = self._chunks[ptr]
        b = self._bins[bin_for(c.size)]
        i = bisect.bisect_left(b, (c.size, ptr))
        if i == len(b) or b[i] != (c.size, ptr):
            raise InvalidInputError(f"chunk {ptr} is not in a free list")
        del b[i]

    def _next(self, ptr: int) -> int | None:
        i = bisect.bisect_right(self._starts, ptr)
        return self._starts[i] if i < len(self._starts) else None

    def _prev(self, ptr: int) -> int | None:
        i = bisect.bisect_left(self._starts, ptr)
        return self._starts[i - 1] if i > 0 else None

    # -- the allocator ------------------------------------------------------------------------
    def allocate(self, num_bytes: int) -> int:
        """Allocate ``num_bytes``; returns the chunk's address (offset in the region).

        Raises:
            AllocatorFull: no free chunk holds the rounded request.
        """
        need = rounded(num_bytes)
        for b in range(bin_for(need), NUM_BINS):
            free = self._bins[b]
            i = bisect.bisect_left(free, (need, -1))
            if i == len(free):
                continue
            size, ptr = free.pop(i)
            if size >= 2 * need or size - need >= MAX_INTERNAL_FRAGMENTATION:
                self._split(ptr, need)
            c = self._chunks[ptr]
            c.in_use = True
            self.in_use += c.size
            self.peak = max(self.peak, self.in_use)
            return ptr
        raise AllocatorFull(f"no free chunk of {need} bytes in the modelled region "
                            f"({self.in_use} of {self.region_bytes} bytes in use)")

    def _split(self, ptr: int, size: int) -> None:
        c = self._chunks[ptr]
        rest = ptr + size
        self._chunks[rest] = _Chunk(c.size - size)
        c.size = size
        bisect.insort(self._starts, rest)
        self._insert_free(rest)

    def free(self, ptr: int) -> None:
        """Free the chunk at ``ptr``, merging it with free neighbours."""
        c = self._chunks.get(ptr)
        if c is None or not c.in_use:
            raise InvalidInputError(f"no chunk in use at {ptr}")
        c.in_use = False
        self.in_use -= c.size
        nxt = self._next(ptr)
        if nxt is not None and nxt not in self._region_starts and \
                not self._chunks[nxt].in_use:
            self._remove_free(nxt)
            self._absorb(ptr, nxt)
        prv = self._prev(ptr)
        if prv is not None and ptr not in self._region_starts and \
                not self._chunks[prv].in_use:
            self._remove_free(prv)
            self._absorb(prv, ptr)
            ptr = prv
        self._insert_free(ptr)

    def _absorb(self, ptr: int, nxt: int) -> None:
        """Chunk ``ptr`` takes over its neighbour ``nxt`` (neither in a bin)."""
        self._chunks[ptr].size += self._chunks.pop(nxt).size
        del self._starts[bisect.bisect_left(self._starts, nxt)]

    def chunk_size(self, ptr: int) -> int:
        """Bytes the chunk at ``ptr`` occupies (what the allocator counts in use)."""
        return self._chunks[ptr].size

    def reset_peak(self) -> None:
        """Start a new peak from the bytes in use now (``reset_memory_stats``)."""
        self.peak = self.in_use


__all__ = ["MAX_INTERNAL_FRAGMENTATION", "MIN_ALLOCATION", "NUM_BINS", "AllocatorFull",
           "BFCModel", "bin_for", "rounded"]


# -- the allocations of a Keras training process, as a sequence ------------------------------
#: Transient small tensors of a random initializer (seed casts, key/counter), as measured on
#: TensorFlow 2.21: sizes in bytes, each taking one 256-byte chunk.
_SEED_SMALLS = (8, 16, 16, 8, 8, 8, 16)


def variable_events(key: str, nbytes: int, random: bool) -> list[tuple[str, str, int]]:
    """Allocations and frees that create one variable of ``nbytes`` (its buffer kept as ``key``).

    A constant initial value (zeros, ones: the optimizer's slots, biases, BatchNorm
    statistics) is one ``Fill``; a random one (``glorot_uniform``, normal, ...) computes the
    draw, a product and a sum, each of the full size, and the variable adopts the sum's
    buffer, the other two freed. Each variable also keeps its resource handle (200 bytes).
    """
    ev: list[tuple[str, str, int]] = []
    if random:
        a, b, c, d, e, f, g = (f"{key}/s{i}" for i in range(7))
        ev += [("a", a, 8), ("a", b, 16), ("f", a, 0), ("a", c, 16), ("a", d, 8), ("f", c, 0),
               ("f", b, 0), ("a", e, 8), ("a", f, 8), ("a", g, 16),
               ("a", f"{key}/draw", nbytes), ("a", f"{key}/s", 4), ("a", f"{key}/mul", nbytes),
               ("f", f"{key}/s", 0), ("a", key, nbytes), ("f", f"{key}/mul", 0),
               ("f", e, 0), ("f", f, 0), ("f", g, 0), ("f", f"{key}/draw", 0), ("f", d, 0)]
    else:
        ev += [("a", f"{key}/s", 8), ("a", key, nbytes), ("f", f"{key}/s", 0)]
    ev.append(("a", f"{key}/handle", 200))
    return ev


def orthogonal_events(key: str, nbytes: int, square_bytes: int, transpose: bool
                      ) -> list[tuple[str, str, int]]:
    """Allocations and frees of a variable made by Keras's ``Orthogonal`` initializer.

    A normal draw (three buffers of the full size, as :func:`variable_events`), its QR
    decomposition (``q`` of the full size, ``r`` of ``square_bytes``), ``q`` times the signs
    of ``r``'s diagonal, a transpose when the matrix is wide, then the gain's product, which
    the variable adopts. Measured: an LSTM's recurrent kernel (TensorFlow 2.21).
    """
    draw = variable_events(f"{key}/n", nbytes, True)[:-1]  # the draw, kept as {key}/n
    ev = draw + [("a", f"{key}/q", nbytes), ("a", f"{key}/r", square_bytes),
                 ("a", f"{key}/d", square_bytes // max(1, _isqrt(square_bytes // 4))),
                 ("a", f"{key}/sign", square_bytes // max(1, _isqrt(square_bytes // 4))),
                 ("a", f"{key}/qs", nbytes), ("f", f"{key}/q", 0)]
    last = f"{key}/qs"
    if transpose:
        ev += [("a", f"{key}/t", nbytes), ("f", last, 0)]
        last = f"{key}/t"
    ev += [("a", key, nbytes), ("f", last, 0), ("f", f"{key}/n", 0), ("f", f"{key}/r", 0),
           ("f", f"{key}/d", 0), ("f", f"{key}/sign", 0), ("a", f"{key}/handle", 200)]
    return ev


def _isqrt(n: int) -> int:
    import math

    return math.isqrt(max(0, n))


def step_events(program: list[tuple[int, bool]], reallocated: list[tuple[str, int]]
                ) -> list[tuple[str, str, int]]:
    """One execution of a compiled step: its buffers, then the variables it re-allocates.

    ``program``: the program's own allocations in the compiler's order, ``(bytes, is_output)``
    (the batch and the variables, its parameters, are already allocated). ``reallocated``:
    ``(key, bytes)`` of the variables whose new value comes back in a new buffer: the old
    buffer is freed as the step starts and the new one allocated after the program's (the
    metrics' scalars, measured). Temporaries are freed at the end; outputs stay with the
    caller.
    """
    ev: list[tuple[str, str, int]] = [("f", key, 0) for key, _ in reallocated]
    ev += [("a", f"p{i}", n) for i, (n, _) in enumerate(program)]
    ev += [("a", key, n) for key, n in reallocated]
    ev += [("f", f"p{i}", 0) for i, (_, out) in enumerate(program) if not out]
    return ev


def replay(events: list[tuple[str, str, int]], model: BFCModel,
           where: dict[str, int] | None = None) -> dict[str, int]:
    """Run ``events`` (``("a", key, bytes)`` / ``("f", key, 0)``) through ``model``.

    ``where`` (key -> address) carries the allocations of an earlier replay into this one.
    Returns the chunk size each kept key occupies (``key -> bytes``) for the keys still
    allocated at the end.
    """
    where = {} if where is None else where
    for kind, key, nbytes in events:
        if kind == "a":
            where[key] = model.allocate(nbytes)
        else:
            model.free(where.pop(key))
    return {k: model.chunk_size(p) for k, p in where.items()}
