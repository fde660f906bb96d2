"""Render an :class:`batchfit.results.estimate.EstimateResult`: per size, the line, the cards.

Imports results only (never TensorFlow), so ``batchfit report RUN.json`` re-renders a saved
estimate anywhere; matplotlib is imported only for a plot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ..core.sizes import format_bytes
from ..results.estimate import EstimateResult
from .plots import _one_panel
from .terminal import _escape

MiB = float(1 << 20)


def _mib(n: float) -> str:
    return f"{n / MiB:,.1f}"


def render_estimate(result: EstimateResult, console: Console | None = None) -> None:
    """Print the per-size breakdown, the fitted line, the budget's batch, cards and notes.

    Example:

    >>> from batchfit.results.estimate import CompiledStepMemory, EstimateResult, LinearFit
    >>> s = CompiledStepMemory(batch_size=32, weights=1 << 20, temporaries=40 << 20)
    >>> r = EstimateResult(model_name="cnn", sizes=[s], fit=LinearFit(1 << 20, 1.25 * (1 << 20)))
    >>> render_estimate(r, Console(width=120, color_system=None))  # doctest: +ELLIPSIS
    model ...
    """
    console = console or Console()
    head = Table(show_header=False, box=None, pad_edge=False)
    head.add_column(style="bold")
    head.add_column()
    head.add_row("model", _escape(result.model_name or "-"))
    jit = "XLA (jit_compile)" if result.step_jit else \
        "[yellow]XLA's estimate; this model's step runs op by op here[/yellow]"
    head.add_row("compiled for", f"{result.device}, {jit}, {len(result.sizes)} size(s) in "
                                 f"{result.seconds:.1f} s, no step run")
    line = result.fit
    if line is not None:
        how = (f"R^2 {line.r_squared:.5f}, largest residual {line.max_residual_fraction:.2%}"
               if line.points > 1 else "one size: slope only")
        head.add_row("fitted line", f"{format_bytes(max(0.0, line.fixed_bytes))} + "
                                    f"{format_bytes(max(0.0, line.per_sample_bytes))} x batch "
                                    f"({how})")
    if result.memory_budget_bytes is not None:
        best = result.max_batch_size
        head.add_row("budget", f"{format_bytes(result.memory_budget_bytes)}: largest batch "
                               f"[bold green]{best if best is not None else '-'}[/bold green]")
    console.print(head)
    console.print(_sizes_table(result))
    console.print(_cards_table(result))
    for note in result.notes:
        console.print(f"[dim]- {_escape(note)}[/dim]", highlight=False)


def _sizes_table(result: EstimateResult) -> Table:
    t = Table(title="predicted peak of one training step, MiB (temp: activations, gradients, "
                    "workspace; alloc: the allocator's rounding and layout)",
              title_justify="left")
    for col in ("batch", "total", "weights", "optim", "other", "inputs", "temp", "out",
                "alloc", "s"):
        t.add_column(col, justify="right", no_wrap=True)
    for m in result.sizes:
        t.add_row(str(m.batch_size), f"[bold]{_mib(m.total_bytes)}[/bold]", _mib(m.weights),
                  _mib(m.optimizer_state), _mib(m.other_state), _mib(m.inputs),
                  _mib(m.temporaries), _mib(m.outputs), _mib(m.rounding + m.allocator_overhead),
                  f"{m.compile_seconds:.1f}")
    return t


def _cards_table(result: EstimateResult) -> Table:
    t = Table(title=f"largest batch per card (usable: {result.usable_share:.0%} after "
                    f"{format_bytes(result.card_reserve_bytes)} reserve)", title_justify="left")
    t.add_column("card")
    t.add_column("usable", justify="right")
    t.add_column("largest batch", justify="right")
    for c in result.cards:
        t.add_row(c.name, format_bytes(c.usable_bytes),
                  str(c.max_batch_size) if c.max_batch_size else "none")
    return t


def plot_estimate(result: EstimateResult, path: str | Path) -> Path:
    """Predicted memory against batch size: the compiled sizes, the line, the budget."""

    def draw(ax: Any) -> None:
        xs = [m.batch_size for m in result.sizes]
        ax.scatter(xs, [m.total_bytes / MiB for m in result.sizes], color="tab:blue", zorder=3,
                   label="compiled (XLA buffer assignment)")
        top = max(xs) * 1.2
        if result.max_batch_size:
            top = max(top, result.max_batch_size * 1.1)
        if result.fit is not None:
            ax.plot([0, top], [result.fit.predict(0) / MiB, result.fit.predict(top) / MiB],
                    color="tab:blue", lw=1, label="fitted line")
        if result.memory_budget_bytes:
            ax.axhline(result.memory_budget_bytes / MiB, color="black", ls="--", lw=1,
                       label=f"budget {format_bytes(result.memory_budget_bytes)}")
        if result.max_batch_size:
            ax.axvline(result.max_batch_size, color="tab:green", ls=":", lw=1,
                       label=f"largest batch {result.max_batch_size}")
        ax.set_xlabel("batch size")
        ax.set_ylabel("predicted peak (MiB)")
        ax.set_title(f"estimate: {result.model_name}")
        ax.legend(fontsize=7, loc="upper left")

    return _one_panel(draw, path)
