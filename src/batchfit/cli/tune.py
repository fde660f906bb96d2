"""``batchfit tune``: largest batch that fits, throughput curve, one recommended batch size."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

from rich.console import Console

from ..errors import InvalidInputError
from ._common import (
    add_debug_argument,
    add_model_argument,
    parse_input_shapes,
    write_outputs,
)
from .max import add_search_arguments, resolve_model, search_option
from .verify import add_verify_option, verify_answer

HELP = "the batch size to train with: memory, throughput, one recommendation"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune", help=HELP,
        description="Find the largest batch that fits, measure training throughput up to it, "
                    "and recommend one batch size with the reasons.")
    add_model_argument(p)
    add_search_arguments(p, steps=False)  # tune() takes no steps=: --steps was ignored
    p.add_argument("--target", type=int, default=None, metavar="N",
                   help="an effective batch size you want: how to reach it with gradient "
                        "accumulation if it does not fit, and what it costs")
    p.add_argument("--noise", action="store_true",
                   help="also measure the gradient noise scale on --data (real data) and "
                        "recommend the goodput-optimal batch")
    p.add_argument("--noise-scale", metavar="B|RUN.json", default=None,
                   help="weigh a known gradient noise scale: a number, or the --json of "
                        "'batchfit noise'")
    p.add_argument("--tolerance", type=float, default=0.05,
                   help="the knee: smallest batch within this fraction of the best throughput "
                        "(default 0.05)")
    p.add_argument("--batch-sizes", default=None, metavar="N,N,...",
                   help="time these sizes instead of the powers of two up to the largest fit")
    p.add_argument("--window-seconds", type=float, default=0.3,
                   help="wall time of each timed window (default 0.3)")
    p.add_argument("--windows", type=int, default=5,
                   help="timed windows per size at least (default 5)")
    p.add_argument("--max-windows", type=int, default=None,
                   help="timed windows per size at most (default 3 x --windows): a size gets "
                        "more while its median's relative standard error is above "
                        "--target-error")
    p.add_argument("--target-error", type=float, default=0.02,
                   help="relative standard error of each median to aim at (default 0.02)")
    p.add_argument("--json", metavar="PATH", help="write everything measured as JSON")
    p.add_argument("--plot", metavar="PATH", help="draw memory and throughput to PATH (.png)")
    p.add_argument("--quiet", action="store_true", help="no per-probe lines")
    add_verify_option(p)
    add_debug_argument(p)


def _sizes(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        sizes = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        sizes = []
    if not sizes or any(b < 1 for b in sizes):
        raise InvalidInputError(f"--batch-sizes {text!r}: expected positive integers separated "
                                f"by commas, e.g. 16,32,64")
    return sizes


def _noise_arg(args: argparse.Namespace) -> object:
    """``--noise`` / ``--noise-scale`` as tune's ``noise_scale=`` argument."""
    if args.noise and args.noise_scale is not None:
        raise InvalidInputError("give --noise (measure it) or --noise-scale (a known value), "
                                "not both")
    if args.noise:
        if not args.data:
            raise InvalidInputError("--noise needs --data path/file.py:function with your real "
                                    "data: the noise scale of synthesized inputs means nothing")
        return "estimate"
    if args.noise_scale is None:
        return None
    try:
        value = float(args.noise_scale)
    except ValueError:
        from ..results import NoiseScaleResult, load_result

        loaded = load_result(args.noise_scale)
        if not isinstance(loaded, NoiseScaleResult):
            raise InvalidInputError(f"--noise-scale {args.noise_scale}: expected a number or "
                                    f"the --json of 'batchfit noise', got a "
                                    f"{type(loaded).kind!r} result") from None
        return loaded
    if not value > 0:
        raise InvalidInputError(f"--noise-scale must be a positive number, got {args.noise_scale}")
    return value


@contextlib.contextmanager
def _status(console: Console, enabled: bool) -> Iterator[object]:
    """A spinner on a terminal; nothing in a log file (lines stay clean)."""
    if enabled and console.is_terminal:
        with console.status("measuring...") as status:
            yield status
    else:
        yield None


def run(args: argparse.Namespace, console: Console) -> int:
    from ..report import ProbeLog, check_plot_path
    from ..report.tune import PointLog, render_tune
    from ..verbs.tune import tune

    if args.target is not None and args.target < 1:
        raise InvalidInputError(f"--target must be >= 1, got {args.target}")
    search = search_option(args)
    sizes = _sizes(args.batch_sizes)
    if args.plot:
        check_plot_path(args.plot)
    noise = _noise_arg(args)
    model, memory = resolve_model(args, console)
    quiet = args.quiet
    with _status(console, not quiet) as status:
        labels = {"memory": "finding the largest batch that fits...",
                  "noise": "measuring the gradient noise scale...",
                  "throughput": "timing training steps..."}

        def on_phase(name: str) -> None:
            if not quiet:
                console.print(f"[bold]{name}[/bold]", highlight=False)
            if status is not None:
                status.update(labels.get(name, name))  # type: ignore[attr-defined]

        result = tune(
            model, memory=memory, data=args.data, search=search,
            granularity=args.granularity, input_shapes=parse_input_shapes(args.input_shape),
            search_tolerance=args.search_tolerance,
            upper=args.max_batch, headroom=args.headroom, target=args.target, noise_scale=noise,
            tolerance=args.tolerance, batch_sizes=sizes, window_seconds=args.window_seconds,
            windows=args.windows, max_windows=args.max_windows,
            target_error=args.target_error, isolate=args.isolate, device=args.device,
            on_probe=None if quiet else ProbeLog(console),
            on_point=None if quiet else PointLog(console), on_phase=on_phase,
            distribute=args.distribute)
    console.print()
    render_tune(result, console)
    write_outputs(result, console, json_path=args.json, plot_path=args.plot)
    return verify_answer(args, console, model, result.batch_size,
                         result.max_batch.memory_budget_bytes, result.max_batch.device,
                         result.replicas)
