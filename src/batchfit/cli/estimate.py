"""``batchfit estimate``: the memory of a training step from its XLA compilation, nothing run."""

from __future__ import annotations

import argparse

from rich.console import Console

from ._common import EXIT_OK, add_debug_argument, parse_input_shapes, write_outputs

HELP = "predict the step's memory from its XLA compilation (seconds, no step run)"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "estimate", help=HELP,
        description="Compile the model's own training step (its optimizer, loss, layers) with "
                    "XLA at a few batch sizes and read XLA's buffer assignment: the memory per "
                    "size by kind, the line fixed + per-sample, the largest batch for "
                    "--memory and for common cards. Nothing is trained.")
    p.add_argument("model", help="path/file.py:factory, package.module:factory or model.keras "
                                 "(a compiled keras.Model)")
    p.add_argument("--batch", default="32,64,128",
                   help="batch sizes to compile, comma-separated (default 32,64,128)")
    p.add_argument("--memory", default=None,
                   help="a budget, e.g. 16GiB: the largest batch predicted to fit it")
    p.add_argument("--input-shape", action="append", default=None, metavar="[NAME=]DIMS",
                   help="size of dynamic non-batch dimensions, e.g. tokens=128 (repeatable)")
    p.add_argument("--json", metavar="PATH", help="write the full result as JSON")
    p.add_argument("--plot", metavar="PATH", default=None,
                   help="draw predicted memory against batch size to PATH (.png/.svg/.pdf)")
    add_debug_argument(p)


def run(args: argparse.Namespace, console: Console) -> int:
    from ..core.estimate import check_batch_sizes
    from ..core.sizes import parse_size
    from ..report import check_plot_path, render

    sizes = check_batch_sizes(args.batch)
    memory = parse_size(args.memory) if args.memory is not None else None
    shapes = parse_input_shapes(args.input_shape)
    if args.plot:
        check_plot_path(args.plot)
    from ..verbs.estimate import estimate_memory

    def progress(m: object) -> None:
        console.print(f"[dim]compiled batch {getattr(m, 'batch_size', '?')} in "
                      f"{getattr(m, 'compile_seconds', 0.0):.1f} s[/dim]", highlight=False)

    result = estimate_memory(args.model, sizes, memory, input_shapes=shapes, progress=progress)
    render(result, console)
    write_outputs(result, console, json_path=args.json, plot_path=args.plot)
    return EXIT_OK
