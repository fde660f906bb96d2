"""Terminal rendering of a :class:`batchfit.results.CheckResult`, grouped by layer.

Each layer gets a header (name, class, where its ``call`` is, the input it was checked with), a
one-line strip of the seven checks (``ok``, ``ERROR``, ``warn``, ``info``, ``skip``) and its
findings, each with its fix and, when it is not the ``call`` itself, the exact line. Text is
passed to ``rich`` as :class:`rich.text.Text`, so messages with brackets (``x.shape[0]``) print
as they are.
"""

from __future__ import annotations

from rich.console import Console
from rich.text import Text

from ..results.check import CHECKS, CheckResult, LayerReport
from .backend import backend_line

__all__ = ["render_check"]

_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan", "ok": "green",
          "skipped": "dim"}
_LABEL = {"error": "ERROR", "warning": "warn", "info": "info", "ok": "ok", "skipped": "skip"}


def _status_key(status: str) -> str:
    return "skipped" if status.startswith("skipped") else status


def render_check(result: CheckResult, console: Console | None = None) -> None:
    """Print a check result: one block per layer, then a one-line summary.

    Example:

    >>> from batchfit.results import CheckResult, Finding, LayerReport
    >>> r = CheckResult(findings=[Finding("centre", "sample_mixing", "warning",
    ...     "output sample 0 depends on the other samples", "layers.py:12", "compute per sample")],
    ...     layers=[LayerReport("centre", "layers.Centre", "layers.py:10", [16],
    ...                         {"sample_mixing": "warning"})], model_name="m")
    >>> render_check(r, Console(width=100, color_system=None))  # doctest: +ELLIPSIS
    model m: 1 layer checked ...
    """
    console = console or Console()
    n = len(result.layers)
    skipped = f", {len(result.skipped)} not checked" if result.skipped else ""
    console.print(Text.assemble(("model ", "bold"), (result.model_name or "-", "bold"),
                                f": {n} layer{'s' if n != 1 else ''} checked{skipped} in "
                                f"{result.seconds:.1f} s"))
    for report in result.layers:
        _render_layer(result, report, console)
    if result.skipped:
        console.print()
    for skip in result.skipped:
        console.print(Text.assemble(("○ ", "dim"), (skip.layer, "bold"), f"  {skip.class_name}",
                                    ("  not checked: ", "dim"), skip.reason))
    for note in result.notes:
        console.print(Text.assemble(("note: ", "dim"), note))
    line = backend_line(result.environment, memory=False)
    if line:
        console.print(Text.assemble((line, "dim")))
    counts = result.counts()
    verdict = ("FAIL" if result.has_errors else "PASS")
    console.print(Text.assemble(
        (verdict, "bold red" if result.has_errors else "bold green"),
        f"  {counts['error']} error(s), {counts['warning']} warning(s), "
        f"{counts['info']} info"))


def _render_layer(result: CheckResult, report: LayerReport, console: Console) -> None:
    console.print()
    header = Text.assemble(("● ", "bold"), (report.layer, "bold"), f"  {report.class_name}")
    if report.location:
        header.append(f"  {report.location}", style="dim")
    shape = tuple(report.input_shape) if report.input_shape and not isinstance(
        report.input_shape[0], list) else report.input_shape
    header.append(f"  input {shape} per example, {report.seconds:.1f} s", style="dim")
    console.print(header)
    by_status: dict[str, list[str]] = {}
    for check in CHECKS:
        by_status.setdefault(_status_key(report.statuses.get(check, "ok")), []).append(check)
    strip = Text("  ")
    if list(by_status) == ["ok"]:
        strip.append(f"all {len(CHECKS)} checks ok", style=_STYLE["ok"])
    else:
        for i, key in enumerate(k for k in ("error", "warning", "info", "skipped", "ok")
                                if k in by_status):
            if i:
                strip.append("; ")
            strip.append(f"{_LABEL[key]}: ", style=_STYLE[key])
            strip.append(", ".join(by_status[key]))
    console.print(strip)
    for f in result.for_layer(report.layer):
        line = Text("  ")
        line.append(f"{_LABEL.get(f.severity, f.severity):<5}", style=_STYLE.get(f.severity, ""))
        line.append(f" {f.check}: ", style="bold")
        line.append(f.message)
        console.print(line)
        if f.location and f.location != report.location:
            console.print(Text.assemble("        at ", (f.location, "dim")))
        if f.fix:
            console.print(Text.assemble("        fix: ", (f.fix, "green")))
    skipped = [(c, s) for c, s in report.statuses.items() if s.startswith("skipped")]
    for check, status in skipped:
        console.print(Text(f"  skip  {check}: {status.partition(': ')[2]}", style="dim"))
    compiled = report.details.get("partial_batch", "").partition("; fit traced")[2]
    if compiled:  # JAX: what stands for TensorFlow's retracing count
        console.print(Text(f"  fit traced{compiled}", style="dim"))
    if report.details.get("retracing") or report.details.get("batch_limit"):
        bits = [report.details[k] for k in ("retracing",) if k in report.details]
        limit = report.details.get("batch_limit")
        if limit:
            bits.append(f"batch limit: {limit}")
        console.print(Text("  " + "; ".join(bits), style="dim"))
