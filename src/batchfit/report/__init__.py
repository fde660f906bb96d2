"""Rendering of results: terminal tables, progress lines, plots. Imports results, never TensorFlow.

:func:`render` and :func:`plot` dispatch on a result's ``kind`` through the tables below
(``"module:function"``, imported when used, so matplotlib loads only for a plot). A feature
adds its renderer and plotter here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from .terminal import ProbeLog, render_max

#: result kind -> "module:function(result, console)"
RENDERERS: dict[str, str] = {
    "max_batch": "batchfit.report.terminal:render_max",
    "check": "batchfit.report.check:render_check",
    "throughput": "batchfit.report.tune:render_throughput",
    "tune": "batchfit.report.tune:render_tune",
    "noise_scale": "batchfit.report.noise:render_noise",
    "verify": "batchfit.report.verify:render_verify",
    "estimate": "batchfit.report.estimate:render_estimate",
}

#: result kind -> "module:function(result, path)"
PLOTTERS: dict[str, str] = {
    "max_batch": "batchfit.report.plots:plot_max",
    "throughput": "batchfit.report.plots:plot_throughput",
    "tune": "batchfit.report.plots:plot_tune",
    "noise_scale": "batchfit.report.noise:plot_noise",
    "estimate": "batchfit.report.estimate:plot_estimate",
}

__all__ = ["PLOTTERS", "PLOT_SUFFIXES", "RENDERERS", "ProbeLog", "check_plot_path", "plot",
           "render", "render_max"]


def _resolve(table: dict[str, str], result: Any, what: str) -> Callable[..., Any]:
    kind = getattr(type(result), "kind", None)
    if kind not in table:
        from ..errors import InvalidInputError
        raise InvalidInputError(f"no {what} for a {kind or type(result).__name__!r} result "
                                f"(known: {', '.join(sorted(table)) or 'none'})")
    module, func = table[kind].split(":")
    return getattr(importlib.import_module(module), func)


def render(result: Any, console: Console | None = None) -> None:
    """Print any batchfit result in the terminal.

    Example:

    >>> from batchfit.results import MaxBatchResult
    >>> r = MaxBatchResult(max_batch_size=8, safe_batch_size=7, headroom=0.1,
    ...     memory_budget_bytes=2**20, budget_source="user", device="CPU:0",
    ...     isolation="process", search="guided", granularity=1, upper_bound=64,
    ...     bracketed=True, memory_model=None)
    >>> render(r, Console(width=100, color_system=None))  # doctest: +ELLIPSIS
    model ...
    """
    _resolve(RENDERERS, result, "terminal renderer")(result, console or Console())


PLOT_SUFFIXES = (".png", ".svg", ".pdf")


def check_plot_path(path: str | Path) -> Path:
    """``path`` as a Path if matplotlib can write it (by suffix), else a clear error.

    Commands call it before measuring, so a bad ``--plot`` fails at once, not after the run.
    """
    out = Path(path)
    if out.suffix.lower() not in PLOT_SUFFIXES:
        from ..errors import InvalidInputError
        raise InvalidInputError(f"--plot {path}: use a .png, .svg or .pdf file name")
    return out


def plot(result: Any, path: str | Path) -> Path:
    """Draw a result's figure to ``path`` (format from the suffix); returns the path."""
    out = check_plot_path(path)
    _resolve(PLOTTERS, result, "plot")(result, out)
    return out
