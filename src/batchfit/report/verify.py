"""Terminal rendering of a :class:`~batchfit.results.verify.VerifyResult` (``batchfit verify``).

Example:

>>> from rich.console import Console
>>> from batchfit.results.verify import VerifyResult, VerifyRun
>>> r = VerifyResult(model="m.keras", batch_size=64, memory_budget_bytes=256 << 20,
...                  device="CPU:0", epochs=1, runs=[VerifyRun("fit", 200 << 20, 8.0)] * 2)
>>> verdict_line(r)
'fits 2/2, peak 200.0 MiB, margin 56.0 MiB (22% of the budget)'
>>> render_verify(r, Console(width=120, color_system=None))  # doctest: +ELLIPSIS
verify m.keras at batch 64 on CPU:0 with 256.0 MiB (emulated): model.fit, 1 epoch(s) of 4 ...
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from ..core.sizes import format_bytes

__all__ = ["render_verify", "verdict_line"]


def verdict_line(result: Any) -> str:
    """One line: fits k/k, the largest peak and the margin left to the budget."""
    n = len(result.runs)
    parts = [f"fits {result.fitted}/{n}"]
    if result.out_of_memory:
        parts.append(f"out of memory in {result.out_of_memory}")
    errors = n - result.fitted - result.out_of_memory
    if errors:
        parts.append(f"failed otherwise in {errors}")
    peak = result.peak_bytes
    if peak is not None and result.all_fit:
        share = result.margin_bytes / result.memory_budget_bytes
        parts.append(f"peak {format_bytes(peak)}, margin {format_bytes(result.margin_bytes)} "
                     f"({share:.0%} of the budget)")
    return ", ".join(parts)


def render_verify(result: Any, console: Console) -> None:
    """Print the runs, the verdict and the notes."""
    console.print(
        f"verify {result.model} at batch {result.batch_size} on {result.device} with "
        f"{format_bytes(result.memory_budget_bytes)} (emulated): model.fit, {result.epochs} "
        f"epoch(s) of {result.steps} batches + validation, {len(result.runs)} fresh "
        f"process(es)", highlight=False)
    table = Table(show_edge=False, pad_edge=False)
    for col in ("run", "outcome", "peak", "seconds", "error"):
        table.add_column(col, justify="right" if col in ("run", "peak", "seconds") else "left")
    for i, run in enumerate(result.runs, 1):
        style = {"fit": "green", "oom": "red"}.get(run.outcome, "yellow")
        peak = "-" if run.peak_bytes is None else format_bytes(run.peak_bytes)
        table.add_row(str(i), f"[{style}]{run.outcome}[/{style}]", peak, f"{run.seconds:.1f}",
                      run.message[:80])
    console.print(table)
    style = "green" if result.all_fit else "bold red"
    console.print(f"[{style}]{verdict_line(result)}[/{style}]", highlight=False)
    for note in result.notes:
        console.print(f"[dim]note: {note}[/dim]", highlight=False)
