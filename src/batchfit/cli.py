"""The ``batchfit`` command: parse arguments, call the API, render, choose the exit status.

Exit status: 0 success; 1 the question has no answer (nothing fits, the model does not train)
or an unexpected error; 2 bad input (file not found, not a model, unparsable size, ...).
No traceback unless ``--debug``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

from rich.console import Console

from .errors import BatchfitError, InvalidInputError

DEMO_MODEL = "batchfit.examples.models:demo_model"
DEMO_MEMORY = "128MiB"

EXIT_OK, EXIT_FAIL, EXIT_BAD_INPUT = 0, 1, 2


def _parse_input_shapes(items: Sequence[str] | None) -> Any:
    """``["tokens=128", "feats=16x32"]`` -> dict; ``["128"]`` -> tuple for a single input."""
    if not items:
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for item in items:
        name, sep, dims = item.rpartition("=")
        try:
            shape = tuple(int(d) for d in dims.lower().replace(",", "x").split("x") if d)
        except ValueError:
            shape = ()
        if not shape or any(d < 1 for d in shape):
            raise InvalidInputError(f"--input-shape {item!r}: expected NAME=DIMS or DIMS with "
                                    f"positive integers, e.g. tokens=128 or 16x32")
        if not sep:
            if len(items) > 1:
                raise InvalidInputError("several --input-shape values need names: NAME=DIMS")
            return shape
        shapes[name] = shape
    return shapes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchfit",
        description="Measure the batch size to train a Keras 3 / TensorFlow model with.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("max", help="the largest batch size that fits the memory",
                       description="Find the largest batch size that trains within a memory "
                                   "budget, with real training steps.")
    p.add_argument("model", nargs="?", default=None,
                   help="path/file.py:factory, package.module:factory or model.keras "
                        f"(default: the built-in example {DEMO_MODEL} under {DEMO_MEMORY})")
    p.add_argument("--memory", help="budget, e.g. 16GiB or 512MiB (default: the device's memory)")
    p.add_argument("--strategy", default="guided", choices=["guided", "binsearch", "power"])
    p.add_argument("--granularity", type=int, default=1, help="search multiples of N (default 1)")
    p.add_argument("--max-batch", type=int, default=None, help="never try a larger batch")
    p.add_argument("--headroom", type=float, default=0.1,
                   help="fraction of the budget the safe size leaves free (default 0.1)")
    p.add_argument("--steps", type=int, default=3, help="training steps per probe (default 3)")
    p.add_argument("--data", help="path/file.py:function returning (x, y) or a tf.data.Dataset")
    p.add_argument("--input-shape", action="append", metavar="[NAME=]DIMS",
                   help="length of None dimensions, e.g. tokens=128 (repeatable)")
    p.add_argument("--isolate", default="auto", choices=["auto", "process", "none"])
    p.add_argument("--device", default=None, help="CPU:0 or GPU:0 (default: GPU if present)")
    p.add_argument("--json", metavar="PATH", help="write the full result as JSON")
    p.add_argument("--quiet", action="store_true", help="no per-probe lines")
    p.add_argument("--debug", action="store_true", help="show tracebacks")

    r = sub.add_parser("report", help="re-render a saved --json run (no TensorFlow needed)")
    r.add_argument("run", help="a JSON file written by --json")
    r.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _cmd_max(args: argparse.Namespace, console: Console) -> int:
    from .report import ProbeLog, render_max
    from .tf.maxbatch import find_max_batch_size

    model, memory = args.model, args.memory
    if model is None:
        model = DEMO_MODEL
        memory = memory or DEMO_MEMORY
        console.print(f"[dim]no MODEL given: the built-in example {DEMO_MODEL} on an emulated "
                      f"{memory} device[/dim]", highlight=False)
    result = find_max_batch_size(
        model, memory=memory, strategy=args.strategy, granularity=args.granularity,
        data=args.data, input_shapes=_parse_input_shapes(args.input_shape),
        upper=args.max_batch, headroom=args.headroom, steps=args.steps, isolate=args.isolate,
        device=args.device, on_probe=None if args.quiet else ProbeLog(console))
    render_max(result, console, show_probes=args.quiet)
    if args.json:
        result.to_json(args.json)
        console.print(f"[dim]wrote {args.json}[/dim]", highlight=False)
    return EXIT_OK


def _cmd_report(args: argparse.Namespace, console: Console) -> int:
    from .report import render
    from .results import load_result

    render(load_result(args.run), console)
    return EXIT_OK


def _print_error(console: Console, label: str, message: object) -> None:
    from rich.text import Text

    console.print(Text.assemble((f"{label}: ", "bold red"), str(message)))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    # TensorFlow's C++ start-up chatter would bury the answer; the user's own setting wins.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = build_parser()
    args = parser.parse_args(argv)
    console = Console()
    err = Console(stderr=True, soft_wrap=True)  # an error message is one greppable line
    if args.version:
        from . import __version__
        console.print(f"batchfit {__version__}")
        return EXIT_OK
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    handler = {"max": _cmd_max, "report": _cmd_report}[args.command]
    try:
        return handler(args, console)
    except InvalidInputError as exc:
        if getattr(args, "debug", False):
            raise
        _print_error(err, "error", exc)
        return EXIT_BAD_INPUT
    except BatchfitError as exc:
        if getattr(args, "debug", False):
            raise
        _print_error(err, "error", exc)
        return EXIT_FAIL
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI never dumps a traceback unasked
        if getattr(args, "debug", False):
            raise
        _print_error(err, "internal error", f"{type(exc).__name__}: {exc} "
                                            f"(rerun with --debug for the traceback)")
        return EXIT_FAIL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
