"""Terminal rendering of throughput curves and ``tune`` results (``rich``)."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table

from ..core.sizes import format_bytes
from ..results import ThroughputPoint, ThroughputResult, TuneResult
from .terminal import _escape, render_max

_POINT_STYLE = {"ok": "green", "oom": "red", "failed": "magenta", "skipped": "dim"}


def _rate(v: float, sep: str = ",") -> str:
    """Samples/s: whole numbers (``sep``: thousands separator), 3 digits below 100 (0.4, not 0)."""
    return (f"{v:,.0f}" if sep else f"{v:.0f}") if abs(v) >= 100 else f"{v:.3g}"


class PointLog:
    """Prints one line per throughput measurement as it completes (pass it as ``on_point=``).

    Example:

    >>> from batchfit.results import ThroughputPoint
    >>> log = PointLog(Console(width=100, color_system=None))
    >>> log(ThroughputPoint(batch_size=64, outcome="ok", samples_per_second=3200.0, cv=0.02,
    ...                     step_seconds=0.02, steps_per_window=10, window_seconds=[0.2] * 5))
    time   batch       64  ok          3,200 samples/s ±  2%    20.0 ms/step 5x10
    """

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()

    def __call__(self, p: ThroughputPoint) -> None:
        style = _POINT_STYLE.get(p.outcome, "")
        line = f"time   batch {p.batch_size:>8}  [{style}]{p.outcome:<7}[/{style}]"
        if p.samples_per_second is not None:
            line += (f"{_rate(p.samples_per_second):>10} samples/s ±{(p.cv or 0):>4.0%} "
                     f"{(p.step_seconds or 0) * 1000:>7.1f} ms/step "
                     f"{len(p.window_seconds)}x{p.steps_per_window}")
        elif p.detail:
            line += f"  [dim]{_escape(p.detail[:90])}[/dim]"
        self.console.print(line, highlight=False, soft_wrap=True)  # one line, also in a log


def _throughput_table(result: ThroughputResult, *, knee: int | None = None,
                      chosen: int | None = None) -> Table:
    table = Table(title="throughput: median of timed windows, warm-up and tracing excluded",
                  title_justify="left", box=box.SIMPLE_HEAD)
    for col, just in (("batch", "right"), ("samples/s", "right"), ("± s.e.", "right"),
                      ("min-max", "right"),
                      ("step", "right"), ("steps", "right")):
        table.add_column(col, justify=just, no_wrap=True)  # type: ignore[arg-type]
    table.add_column("", justify="left")  # wraps first when the table is too wide
    gpu = any(p.gpu_utilization is not None for p in result.points)
    if gpu:
        table.add_column("GPU util", justify="right")
        table.add_column("GPU mem", justify="right")
    for p in sorted(result.points, key=lambda q: q.batch_size):
        marks = []
        if p.batch_size == knee:
            marks.append("knee")
        if p.batch_size == chosen:
            marks.append("[bold green]<- recommended[/bold green]")
        if p.samples_per_second is None:
            style = _POINT_STYLE.get(p.outcome, "")
            row = [str(p.batch_size), f"[{style}]{p.outcome}[/{style}]", "", "", "", "",
                   _escape(p.detail[:40])]
        else:
            err = "-" if p.median_error is None else f"{p.median_error:.1%}"
            row = [str(p.batch_size), _rate(p.samples_per_second), err,
                   f"{_rate(p.low or 0, '')}-{_rate(p.high or 0, '')}",
                   f"{(p.step_seconds or 0) * 1000:.1f} ms",
                   f"{len(p.window_seconds)}x{p.steps_per_window}", ", ".join(marks)]
        if gpu:
            row += ["-" if p.gpu_utilization is None else f"{p.gpu_utilization:.0f}%",
                    "-" if p.gpu_memory_bytes is None else format_bytes(p.gpu_memory_bytes)]
        table.add_row(*row)
    return table


def _error_line(result: ThroughputResult) -> str | None:
    """The knee range, the medians' errors and the machine's own drift, in one line."""
    errs = [p.median_error for p in result.measured() if p.median_error is not None]
    parts = []
    if result.knee_range and result.knee_range[0] != result.knee_range[1]:
        parts.append(f"knee range {result.knee_range[0]}-{result.knee_range[1]} (each within "
                     f"{result.tolerance:.0%} of the best as far as the timing can tell)")
    if errs:
        parts.append(f"medians' errors up to {max(errs):.1%}")
    if result.machine_drift is not None:
        parts.append(f"machine drift over the run {result.machine_drift:+.1%} (a fixed NumPy "
                     "workload, before vs after)")
    return "; ".join(parts) or None


def render_throughput(result: ThroughputResult, console: Console | None = None) -> None:
    """Print a :class:`ThroughputResult`: the curve and its knee."""
    console = console or Console()
    console.print(_throughput_table(result, knee=result.knee))
    if result.knee is not None:
        console.print(f"knee: [bold]{result.knee}[/bold] (smallest batch within "
                      f"{result.tolerance:.0%} of the best throughput)", highlight=False)
    if (line := _error_line(result)) is not None:
        console.print(f"[dim]{_escape(line)}[/dim]", highlight=False)
    console.print(f"[dim]GPU metrics: {_escape(result.gpu_metrics)}[/dim]", highlight=False)
    for note in result.notes:
        console.print(f"[dim]note:[/dim] {_escape(note)}", highlight=False)


def render_tune(result: TuneResult, console: Console | None = None) -> None:
    """Print a :class:`TuneResult`: memory search, throughput curve, the recommendation."""
    console = console or Console()
    render_max(result.max_batch, console, show_probes=False)
    console.print()
    console.print(_throughput_table(result.throughput, knee=result.throughput.knee,
                                    chosen=result.recommendation.batch_size))
    if (line := _error_line(result.throughput)) is not None:
        console.print(f"[dim]{_escape(line)}[/dim]", highlight=False)
    console.print(f"[dim]GPU metrics: {_escape(result.throughput.gpu_metrics)}[/dim]",
                  highlight=False)
    rec = result.recommendation
    console.print()
    per = (f" global = {result.per_replica_batch_size} per replica x {result.replicas}"
           if result.replicas > 1 else "")
    console.print(f"[bold]recommended batch size: [green]{rec.batch_size}[/green][/bold]{per} "
                  f"(decided by {rec.decided_by})", highlight=False)
    for i, reason in enumerate(rec.reasons):
        console.print(f"  {'-' if i else '*'} {_escape(reason)}", highlight=False)
    if result.noise is not None and result.noise.b_simple is not None:
        n = result.noise
        interval = (f", {n.confidence:.0%} interval {n.low or 0:,.0f}-"
                    f"{'inf' if n.high is None else f'{n.high:,.0f}'}")
        console.print(f"gradient noise scale B_simple about {n.b_simple:,.0f}{interval} "
                      f"({len(n.pairs)} pairs of {n.small_batch}/{n.big_batch})", highlight=False)
    if result.target is not None:
        console.print(f"target {result.target.target}: {_escape(result.target.summary)}",
                      highlight=False)
    for note in [*result.throughput.notes, *result.notes]:
        console.print(f"[dim]note:[/dim] {_escape(note)}", highlight=False)
    console.print(f"[dim]tune took {result.seconds:.0f} s (memory search "
                  f"{result.max_batch.seconds:.0f} s, throughput {result.throughput.seconds:.0f} s)"
                  f"[/dim]", highlight=False)
