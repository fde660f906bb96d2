"""Render a :class:`batchfit.results.NoiseScaleResult`: the noise scale, its interval, a plot.

Imports results and NumPy only (never TensorFlow), so ``batchfit report RUN.json`` re-renders a
saved run anywhere; matplotlib is imported only for a plot.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from ..core.noise import noise_scale_of_means
from ..results import NoiseScaleResult
from .backend import backend_line
from .plots import _pyplot
from .terminal import _escape


def _num(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isinf(v)):
        return "unbounded"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def render_noise(result: NoiseScaleResult, console: Console | None = None) -> None:
    """Print the noise scale, its interval, what it means for the batch size, and the notes.

    Example:

    >>> from batchfit.results import NoiseScaleResult
    >>> r = NoiseScaleResult(b_simple=420.0, low=300.0, high=610.0, confidence=0.95,
    ...     gradient_sq_norm=0.01, trace_sigma=4.2, small_batch=32, big_batch=256)
    >>> render_noise(r, Console(width=100, color_system=None))  # doctest: +ELLIPSIS
    model ...
    """
    console = console or Console()
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("model", _escape(f"{result.model_name or '-'} ({result.optimizer or 'optimizer ?'})"))
    t.add_row("measured", f"{len(result.pairs)} pairs of batches {result.small_batch} and "
                          f"{result.big_batch}, from {result.examples} examples, "
                          f"in {result.seconds:.1f} s")
    if result.b_simple is None:
        t.add_row("noise scale B_simple", "[bold yellow]too large to resolve[/bold yellow]: the "
                                          "gradient's squared norm estimate is not positive")
    else:
        t.add_row("noise scale B_simple",
                  f"[bold green]{_num(result.b_simple)}[/bold green]  "
                  f"({result.confidence:.0%} interval {_num(result.low)} .. {_num(result.high)})")
    t.add_row("|G|^2, tr(Sigma)",
              f"{result.gradient_sq_norm:.4g}, {result.trace_sigma:.4g} (per example)")
    console.print(t)
    if result.b_simple is not None:
        b = result.b_simple
        console.print(
            f"The critical batch size is about {_num(b)}: at that batch, training takes about "
            "2x the minimum number of steps and 2x the minimum number of examples; well above "
            "it, extra examples per step are mostly wasted. The noise scale grows as training "
            "progresses, so a value measured at the start is a lower bound.", highlight=False)
    for note in result.notes:
        console.print(f"[dim]note: {_escape(note)}[/dim]", highlight=False)
    line = backend_line(result.environment, memory=False)
    if line:
        console.print(f"[dim]{_escape(line)}[/dim]", highlight=False)


def running_estimates(result: NoiseScaleResult) -> tuple[np.ndarray, np.ndarray]:
    """``(pairs_used, B_simple)`` after each pair: the ratio of the running averages."""
    g2 = np.cumsum([p.gradient_sq_norm for p in result.pairs])
    tr = np.cumsum([p.trace_sigma for p in result.pairs])
    n = np.arange(1, len(result.pairs) + 1)
    values = np.array([noise_scale_of_means(a / k, c / k) for a, c, k in zip(g2, tr, n)])
    return n, values


def plot_noise(result: NoiseScaleResult, path: str | Path) -> None:
    """Draw the running estimate of ``B_simple`` over the pairs, with the final interval."""
    plt = _pyplot()
    n, values = running_estimates(result)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    try:
        finite = np.isfinite(values)
        ax.plot(n[finite], values[finite], marker=".", lw=1, label="running ratio of averages")
        if result.low is not None:
            high = result.high if result.high is not None else ax.get_ylim()[1]
            ax.axhspan(result.low, high, color="tab:green", alpha=0.15,
                       label=f"{result.confidence:.0%} interval")
        if result.b_simple is not None:
            ax.axhline(result.b_simple, color="tab:green", lw=1,
                       label=f"B_simple = {_num(result.b_simple)}")
        ax.set_xlabel("pairs measured")
        ax.set_ylabel("noise scale (examples)")
        ax.set_title(f"gradient noise scale, batches {result.small_batch} / {result.big_batch}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
