"""Terminal rendering with ``rich``: one line per probe while searching, then a summary.

``rich`` decides from the stream itself whether it may use colour and cursor movement, so the
same code prints plain, clean lines into CI logs and files.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ..core.sizes import format_bytes
from ..results import MaxBatchResult, Probe
from .backend import backend_line

_OUTCOME_STYLE = {"fits": "green", "oom": "red", "over_budget": "red", "at_limit": "yellow",
                  "refused": "yellow",
                  "crashed": "magenta", "timeout": "magenta"}


def _bytes(n: float | None) -> str:
    return "-" if n is None else format_bytes(n)


class ProbeLog:
    """Prints one line per probe as it completes (pass it as ``on_probe=``).

    Example:

    >>> from batchfit.results import Probe
    >>> log = ProbeLog(Console(width=100, color_system=None))
    >>> log(Probe(batch_size=64, fits=True, outcome="fits", peak_bytes=3 << 20, seconds=1.25))
    probe  1  batch       64  fits           3.00 MiB    1.2 s
    """

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()
        self.count = 0

    def __call__(self, probe: Probe) -> None:
        self.count += 1
        style = _OUTCOME_STYLE.get(probe.outcome, "")
        kind = {"confirm": "confirm", "safe": "safe"}.get(probe.phase, "probe")
        line = (f"{kind} {self.count:>2}  batch {probe.batch_size:>8}  "
                f"[{style}]{probe.outcome:<11}[/{style}] {_bytes(probe.peak_bytes):>11}  "
                f"{probe.seconds:>5.1f} s")
        if not probe.fits and probe.detail:
            line += f"  [dim]{_escape(probe.detail[:90])}[/dim]"
        # One line per probe, also in a log (rich wraps at 80 columns when not a terminal).
        self.console.print(line, highlight=False, soft_wrap=True)


def _escape(text: str) -> str:
    return text.replace("[", r"\[")


def _exactness(result: MaxBatchResult) -> str:
    """"exact", "within 1.2% (250 failed)", or "not bracketed: a lower bound"."""
    if not result.bracketed:
        return "not bracketed: a lower bound"
    best = result.max_batch_size
    failing = [p.batch_size for p in result.probes if not p.fits and p.batch_size > best]
    hi = min(failing, default=None)
    if hi is None or best <= 0 or hi <= best + result.granularity:
        return "exact"
    return f"within {(hi - best) / best:.1%}: {hi} failed"


def _confirmation(result: MaxBatchResult) -> str:
    """", confirmed in 3 fresh processes" or ", not confirmed ..." ("" without a band)."""
    band = result.band
    if band is None or band.confirmations <= 0:
        return ""
    if band.confirmed:
        return f", fitted in {band.confirmations} of {band.confirmations} fresh processes"
    return ", not confirmed in fresh processes (see the notes)"


def _band_line(result: MaxBatchResult) -> str | None:
    """"fits every time up to 160; sometimes 162, 165; never 170"."""
    band = result.band
    if band is None:
        return None
    parts = [f"fitted every time up to {band.reliable}"]
    if band.sometimes:
        shown = ", ".join(map(str, band.sometimes[:6])) + (" ..." if len(band.sometimes) > 6
                                                           else "")
        parts.append(f"fitted only sometimes: {shown}")
    if band.never is not None:
        parts.append(f"never fitted from {band.never}")
    return "; ".join(parts)


def _safe_line(result: MaxBatchResult, per_replica: str = "") -> str:
    """The safe size and the margin it leaves, and why."""
    band = result.band
    free = f"predicted to leave {result.headroom:.0%} of the budget free"
    if band is None or band.margin_bytes is None:
        why = f": {band.margin_reason}" if band is not None and band.margin_reason else ""
        return f"{result.safe_batch_size}{per_replica} ({free}{why})"
    budget = result.memory_budget_bytes
    pct = f", {band.margin_bytes / budget:.1%} of the budget" if budget else ""
    checked = ""
    if band.safe_checks:
        verdict = "fitted" if band.safe_confirmed else "not confirmed in"
        checked = (f"; {verdict} {band.safe_checks} of {band.safe_checks} fresh processes "
                   f"under {_escape(band.safe_settings)}")
    return (f"{result.safe_batch_size}{per_replica}: a margin of at least "
            f"{format_bytes(band.margin_bytes)}{pct} below the reliable edge "
            f"({_escape(band.margin_reason)}){checked}; {free}")


def render_max(result: MaxBatchResult, console: Console | None = None, *,
               show_probes: bool = True) -> None:
    """Print a :class:`MaxBatchResult`: the answer, the memory model and the probes."""
    console = console or Console()
    budget = ("device total unknown" if result.memory_budget_bytes is None
              else f"{format_bytes(result.memory_budget_bytes)} ({result.budget_source})")
    summary = Table(show_header=False, box=None, pad_edge=False)
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("model", _escape(result.model_name or "-"))
    summary.add_row("device", _escape(f"{result.device}, {result.isolation}"))
    summary.add_row("memory budget", budget)
    exact = _exactness(result) + _confirmation(result)
    g = f", granularity {result.granularity}" if result.granularity > 1 else ""
    r = result.replicas
    if r > 1:
        summary.add_row("distribution", f"{result.distribute or 'strategy'}, {r} replicas "
                                        "(memory per replica; global = per replica x replicas)")
        summary.add_row("largest batch that fits",
                        f"[bold green]{result.global_max_batch_size}[/bold green] global = "
                        f"{result.max_batch_size} per replica x {r} ({exact}{g})")
        summary.add_row("safe batch size",
                        f"{result.global_safe_batch_size} global = "
                        + _safe_line(result, f" per replica x {r}"))
    else:
        summary.add_row("largest batch that fits",
                        f"[bold green]{result.max_batch_size}[/bold green] ({exact}{g})")
        summary.add_row("safe batch size", _safe_line(result))
    band_line = _band_line(result)
    if band_line is not None:
        summary.add_row("band", band_line)
    m = result.memory_model
    if m is not None:
        r2 = f", R² {m.r_squared:.4f}" if m.r_squared is not None else ""
        summary.add_row("memory model", f"{_bytes(m.fixed_bytes)} + {_bytes(m.per_sample_bytes)}"
                                        f" x batch ({m.points} probes{r2})")
    summary.add_row("search", f"{result.search}: {len(result.probes)} probes, "
                              f"{result.oom_count} out-of-memory, {result.seconds:.1f} s")
    line = backend_line(result.environment)
    if line is not None:
        summary.add_row("backend", _escape(line))
    console.print(summary)
    if show_probes and result.probes:
        table = Table(title="probes", title_justify="left")
        for col, just in (("#", "right"), ("phase", "left"), ("batch", "right"),
                          ("outcome", "left"),
                          ("peak", "right"), ("step", "right"), ("seconds", "right")):
            table.add_column(col, justify=just)  # type: ignore[arg-type]
        for i, p in enumerate(result.probes, 1):
            style = _OUTCOME_STYLE.get(p.outcome, "")
            table.add_row(str(i), p.phase, str(p.batch_size), f"[{style}]{p.outcome}[/{style}]",
                          _bytes(p.peak_bytes),
                          "-" if p.step_seconds is None else f"{p.step_seconds * 1000:.1f} ms",
                          f"{p.seconds:.1f}")
        console.print(table)
    for note in result.notes:
        console.print(f"[dim]note:[/dim] {_escape(note)}", highlight=False)
