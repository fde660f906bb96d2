"""``batchfit check``: do the custom layers honour the batch contract?

Exit status: 0 no error finding, 1 any error finding, 2 bad input (file not found, not a model
or layer, a layer that fails on an ordinary batch for reasons of its own).
"""

from __future__ import annotations

import argparse

from rich.console import Console

from ._common import (
    DEMO_MODEL,
    EXIT_FAIL,
    EXIT_OK,
    add_debug_argument,
    parse_input_shapes,
    write_outputs,
)

HELP = "check that custom layers honour the batch contract"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check", help=HELP,
        description="Check each custom layer of a model (or one layer): dynamic batch, partial "
                    "last batch, static shape reads in source, sample mixing, retracing, "
                    "export, batch limit. Exit 0 no errors, 1 errors found, 2 bad input.")
    p.add_argument("model", nargs="?", default=None,
                   help="path/file.py:factory or package.module:factory returning a keras.Model "
                        "or keras.layers.Layer, or model.keras "
                        f"(default: the built-in example {DEMO_MODEL})")
    p.add_argument("--input-shape", action="append", metavar="[NAME=]DIMS",
                   help="for a layer: one example's shape, e.g. 16 or 12x16; for a model: "
                        "length of None dimensions, e.g. tokens=128 (repeatable)")
    p.add_argument("--layer", action="append", metavar="NAME",
                   help="check only this custom layer (repeatable)")
    p.add_argument("--max-batch", type=int, default=1024,
                   help="the largest batch the batch-limit search tries (default 1024)")
    p.add_argument("--json", metavar="PATH", help="write the result as JSON (findings list)")
    add_debug_argument(p)


def run(args: argparse.Namespace, console: Console) -> int:
    from ..report.check import render_check
    from ..verbs.check import check

    model = args.model
    if model is None:
        model = DEMO_MODEL
        console.print(f"[dim]no MODEL given: the built-in example {DEMO_MODEL} (the seed "
                      "document's layers)[/dim]", highlight=False)
    result = check(model, parse_input_shapes(args.input_shape), layers=args.layer,
                   max_batch=args.max_batch)
    render_check(result, console)
    write_outputs(result, console, json_path=args.json)
    return EXIT_FAIL if result.has_errors else EXIT_OK
