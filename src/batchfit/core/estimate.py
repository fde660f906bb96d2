"""The arithmetic of a compile-time memory estimate: the line, the budget, the cards.

Pure: the compiled sizes come from :meth:`batchfit.backend.Backend.compiled_step_memory`; here
they become a line ``fixed + per_sample * b`` (least squares, with how linear the sizes were),
the largest batch for a budget, and the largest batch per common accelerator size under a
stated usable share.

Example:

>>> from batchfit.core.estimate import fit_line, largest_batch
>>> line = fit_line([(32, 1_000 + 32 * 50), (64, 1_000 + 64 * 50), (128, 1_000 + 128 * 50)])
>>> round(line.fixed_bytes), round(line.per_sample_bytes), line.r_squared
(1000, 50, 1.0)
>>> largest_batch(line, 6_000)
100
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from ..errors import InvalidInputError, NothingFitsError
from ..results.estimate import CardFit, CompiledStepMemory, LinearFit
from .sizes import format_bytes
from .validate import is_int

#: Common accelerator memory sizes (GB as marketed: 16 GB V100/T4, 24 GB A10/L4/RTX 4090,
#: 40 GB A100, 48 GB A6000/L40S, 80 GB A100/H100, 141 GB H200), taken as GiB.
COMMON_CARDS_GB: tuple[int, ...] = (16, 24, 40, 48, 80, 141)
#: Bytes assumed taken on a card before the training step: the CUDA context, cuDNN/cuBLAS
#: handles and workspaces and the framework's own reserve (~0.3-0.6 GiB context measured
#: commonly; 1 GiB stated).
CARD_RESERVE_BYTES: int = 1 << 30
#: Share of what remains that the step may use: the allocator's fragmentation and rounding.
USABLE_SHARE: float = 0.95

#: How many times over an XLA step's temporaries must find room in TensorFlow's allocator.
#: Measured on the CPU, in fresh processes under the cap (bench/bench_jit.py,
#: docs/benchmarks.md): the step's peak (bytes in use) stayed near XLA's total, yet the largest
#: size that fitted was where the total with the temporaries counted twice reaches the budget: demo_model at 96 MiB 132
#: (total alone predicts 279, twice 135), the example CNN at 256 MiB 87 (175; 86). The
#: program's temporaries are one allocation, which must find one free chunk while the next
#: batch's tensors sit in the region; no peak shows it.
TEMPORARIES_ROOM = 2

#: The margin an XLA step's predicted answer keeps under the budget (the start of a guided
#: search, and the size the first worker compiles last): the rule the prediction was matched
#: with (docs/benchmarks.md, "max on XLA-compiled steps"). Not the probes' ``at_limit``
#: margin: an XLA step's peak at its limit reads about half the budget (its temporaries need
#: one contiguous chunk), so that margin never binds it.
XLA_MARGIN = 0.02


def check_batch_sizes(sizes: Any) -> list[int]:
    """Batch sizes to compile, as a sorted list of distinct positive integers.

    Accepts a sequence of integers or a comma-separated string (``"32,64,128"``).

    Raises:
        InvalidInputError: empty, or an entry is not a positive integer.

    Example:

    >>> check_batch_sizes("64, 32,128")
    [32, 64, 128]
    """
    items: Iterable[Any]
    if isinstance(sizes, str):
        items = [s.strip() for s in sizes.split(",") if s.strip()]
    elif is_int(sizes):
        items = [sizes]
    else:
        try:
            items = list(sizes)
        except TypeError:
            raise InvalidInputError(
                f"batch sizes must be positive integers, e.g. 32,64,128; got {sizes!r}") from None
    out: set[int] = set()
    for item in items:
        value = _positive_int(item)
        if value is None:
            raise InvalidInputError(
                f"batch sizes must be positive integers, e.g. 32,64,128; got {item!r}")
        out.add(value)
    if not out:
        raise InvalidInputError("give at least one batch size to compile, e.g. 32,64,128")
    return sorted(out)


def _positive_int(item: Any) -> int | None:
    if isinstance(item, str):
        item = item.strip()
        if not item.isdigit():
            return None
        item = int(item)
    if not is_int(item) or int(item) < 1:
        return None
    return int(item)


def fit_line(points: Sequence[tuple[float, float]]) -> LinearFit:
    """Least-squares line ``bytes = fixed + per_sample * b`` through ``(b, bytes)`` points.

    With one point the line goes through the origin's slope-free form: ``fixed`` is 0 and the
    slope is ``bytes / b`` (an upper bound on the slope, reported with ``points=1``).

    Raises:
        InvalidInputError: no points, or two points at the same batch size only.
    """
    if not points:
        raise InvalidInputError("no compiled sizes to fit a line to")
    xs = [float(b) for b, _ in points]
    ys = [float(v) for _, v in points]
    n = len(points)
    if n == 1:
        return LinearFit(fixed_bytes=0.0, per_sample_bytes=ys[0] / xs[0], points=1)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise InvalidInputError("the compiled sizes must differ to fit a line")
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    fixed = my - slope * mx
    fitted = [fixed + slope * x for x in xs]
    ss_res = sum((y - f) ** 2 for y, f in zip(ys, fitted))
    ss_tot = sum((y - my) ** 2 for y in ys)
    r2 = 1.0 if ss_tot == 0 or ss_res <= 1e-12 * ss_tot else 1.0 - ss_res / ss_tot
    worst = max(abs(f - y) / y for y, f in zip(ys, fitted) if y > 0) if any(ys) else 0.0
    return LinearFit(fixed_bytes=fixed, per_sample_bytes=slope, r_squared=r2,
                     max_residual_fraction=worst, points=n)


def line_points(sizes: Sequence[CompiledStepMemory]) -> list[tuple[int, int]]:
    """``(batch, bytes)`` points for the line: each total, its allocator layout at its least.

    The allocator's layout (:attr:`~batchfit.results.estimate.CompiledStepMemory.
    allocator_overhead`) is mostly the build's, the same at every size; on top of it a batch
    or a step buffer that happens to land in a hole under twice its size takes the whole hole,
    at some sizes and not others (up to the batch's size again). That step is not linear in
    the batch: the line carries the smallest overhead of the compiled sizes, and each compiled
    size keeps its own in its total.

    Example:

    >>> a = CompiledStepMemory(batch_size=16, temporaries=1_600, allocator_overhead=100)
    >>> b = CompiledStepMemory(batch_size=32, temporaries=3_200, allocator_overhead=900)
    >>> line_points([a, b])
    [(16, 1700), (32, 3300)]
    """
    base = min((m.allocator_overhead for m in sizes), default=0)
    return [(m.batch_size, m.total_bytes - (m.allocator_overhead - base)) for m in sizes]


#: A line whose largest residual exceeds this gets a note: the sizes were not on one line.
BEND_TOLERANCE = 0.02


def upper_line(points: Sequence[tuple[float, float]],
               tolerance: float = BEND_TOLERANCE) -> LinearFit:
    """:func:`fit_line` through the sizes above a bend at the small end.

    XLA can choose other fusions or algorithms for small batches (``seed_sequence``: 8.4 KB
    of temporaries per sample at 16, 12.44 KB at 32 to 256, compiled); a least-squares line
    through all sizes then carries the small size's slope into every extrapolation (+6% at 4x
    the largest). While the line misses a size by more than ``tolerance`` and more than two
    sizes remain, the smallest is dropped (``points`` says how many were kept).

    Example:

    >>> line = upper_line([(16, 1_000 + 16 * 60), (32, 1_000 + 32 * 100), (64, 1_000 + 64 * 100)])
    >>> round(line.per_sample_bytes), line.points
    (100, 2)
    """
    pts = sorted(points)
    line = fit_line(pts)
    while len(pts) > 2 and line.max_residual_fraction > tolerance:
        pts = pts[1:]
        line = fit_line(pts)
    return line


def largest_batch(line: LinearFit, budget_bytes: float, granularity: int = 1) -> int:
    """Largest multiple of ``granularity`` the line predicts to fit ``budget_bytes`` (0: none)."""
    if line.per_sample_bytes <= 0 or budget_bytes < line.fixed_bytes + line.per_sample_bytes:
        return 0
    b = int((budget_bytes - line.fixed_bytes) // line.per_sample_bytes)
    return max(0, (b // granularity) * granularity)


def budget_batch(line: LinearFit, budget_bytes: int) -> int:
    """:func:`largest_batch`, refusing a budget where not even one sample fits.

    Raises:
        NothingFitsError: the budget is below the fixed cost plus one sample (the message says
            the fixed cost).
    """
    b = largest_batch(line, budget_bytes)
    if b < 1:
        raise NothingFitsError(
            f"nothing fits in {format_bytes(budget_bytes)}: the compiled step's fixed cost "
            f"(weights, optimizer state, batch-independent workspace) is "
            f"{format_bytes(max(0.0, line.fixed_bytes))} and one sample adds "
            f"{format_bytes(max(0.0, line.per_sample_bytes))}",
            fixed_bytes=line.fixed_bytes, budget_bytes=int(budget_bytes))
    return b


def guided_start(line: LinearFit, budget_bytes: float, *, margin: float = 0.02,
                 granularity: int = 1) -> int:
    """The first size a ``max`` search of an XLA step probes: the predicted boundary.

    The largest multiple of ``granularity`` whose predicted peak stays below
    ``budget_bytes * (1 - margin)`` (a probe whose peak comes within ``margin`` of the budget
    does not count as fitting), at least ``granularity``.

    Example:

    >>> guided_start(LinearFit(fixed_bytes=1_000, per_sample_bytes=100), 11_000, margin=0.0)
    100
    """
    return max(granularity, largest_batch(line, budget_bytes * (1.0 - margin), granularity))


def guided_next(line: LinearFit, budget_bytes: float, batch_size: int, fits: bool,
                peak_bytes: float | None, *, margin: float = 0.02, granularity: int = 1) -> int:
    """The size to probe after one probe of a search started at :func:`guided_start`.

    The predicted slope is trusted and the probe's measured peak corrects the intercept: after
    a fit, the size whose corrected prediction reaches the usable budget, and at least one
    granule above (to bracket); after a failure with a measured peak, the size whose corrected
    prediction fits; after an out-of-memory error (no peak), one granule below.

    Example:

    >>> line = LinearFit(fixed_bytes=1_000, per_sample_bytes=100)
    >>> guided_next(line, 11_000, 100, True, 10_500, margin=0.0)   # 500 bytes to spare
    105
    >>> guided_next(line, 11_000, 100, False, 11_300, margin=0.0)  # 300 bytes over
    97
    """
    g = max(1, int(granularity))
    usable = budget_bytes * (1.0 - margin)
    slope = line.per_sample_bytes
    if fits:
        if peak_bytes is None or slope <= 0:
            return batch_size + g
        extra = int((usable - peak_bytes) // slope)
        return batch_size + max(g, (extra // g) * g)
    if peak_bytes is None or slope <= 0:
        return max(g, batch_size - g)
    over = -(-(peak_bytes - usable) // slope)
    return max(g, ((batch_size - int(over)) // g) * g)


def usable_bytes(memory_bytes: int, *, reserve_bytes: int = CARD_RESERVE_BYTES,
                 share: float = USABLE_SHARE) -> int:
    """What a training step may use of a card: ``share * (memory - reserve)``, at least 0."""
    return max(0, int(share * (memory_bytes - reserve_bytes)))


def card_table(line: LinearFit, cards_gb: Sequence[int] = COMMON_CARDS_GB, *,
               reserve_bytes: int = CARD_RESERVE_BYTES,
               share: float = USABLE_SHARE) -> list[CardFit]:
    """The largest batch predicted to fit each card (``N`` GB taken as ``N`` GiB)."""
    rows = []
    for gb in cards_gb:
        memory = int(gb) << 30
        usable = usable_bytes(memory, reserve_bytes=reserve_bytes, share=share)
        rows.append(CardFit(name=f"{gb} GB", memory_bytes=memory, usable_bytes=usable,
                            max_batch_size=largest_batch(line, usable)))
    return rows


def card_assumption(reserve_bytes: int = CARD_RESERVE_BYTES, share: float = USABLE_SHARE) -> str:
    """The stated assumption behind :func:`card_table`, for reports."""
    return (f"a card's usable memory is taken as {share:.0%} of what is left after "
            f"{format_bytes(reserve_bytes)} for the CUDA context, libraries and the framework's "
            f"reserve")


__all__ = [
    "BEND_TOLERANCE",
    "CARD_RESERVE_BYTES",
    "COMMON_CARDS_GB",
    "TEMPORARIES_ROOM",
    "USABLE_SHARE",
    "XLA_MARGIN",
    "budget_batch",
    "card_assumption",
    "card_table",
    "check_batch_sizes",
    "fit_line",
    "guided_next",
    "guided_start",
    "largest_batch",
    "line_points",
    "upper_line",
    "usable_bytes",
]
