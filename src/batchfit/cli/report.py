"""``batchfit report``: re-render a saved ``--json`` run, without TensorFlow."""

from __future__ import annotations

import argparse

from rich.console import Console

from ._common import EXIT_OK, add_debug_argument, write_outputs

HELP = "re-render a saved --json run (no TensorFlow needed)"


def add_parser(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("report", help=HELP, description=HELP)
    r.add_argument("run", help="a JSON file written by --json")
    r.add_argument("--plot", metavar="PATH", default=None,
                   help="also draw the run's plot to PATH (.png/.svg/.pdf), where it has one")
    add_debug_argument(r)


def run(args: argparse.Namespace, console: Console) -> int:
    from ..report import render
    from ..results import load_result

    result = load_result(args.run)
    render(result, console)
    write_outputs(result, console, plot_path=args.plot)
    return EXIT_OK
