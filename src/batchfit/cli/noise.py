"""``batchfit noise``: the gradient noise scale (about the critical batch size) on real data."""

from __future__ import annotations

import argparse

from rich.console import Console

from ..core.noise import NEEDS_REAL_DATA
from ..errors import InvalidInputError
from ._common import EXIT_OK, add_debug_argument, write_outputs

HELP = "the gradient noise scale: about the critical batch size (needs real data)"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "noise", help=HELP,
        description="Estimate the gradient noise scale B_simple = tr(Sigma)/|G|^2 of a model on "
                    "your data (McCandlish et al. 2018): gradients at a small and a big batch, "
                    "no weight update. Above about B_simple, larger batches stop shortening "
                    "training.")
    p.add_argument("model", help="path/file.py:factory, package.module:factory or model.keras "
                                 "(a compiled keras.Model)")
    p.add_argument("--data", default=None,
                   help="required: path/file.py:function returning (x, y) or a tf.data.Dataset")
    p.add_argument("--small", type=int, default=32, help="small batch (default 32)")
    p.add_argument("--big", type=int, default=256,
                   help="big batch, a multiple of --small (default 256)")
    p.add_argument("--steps", type=int, default=32, help="pairs to measure (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the example draws (default 0)")
    p.add_argument("--json", metavar="PATH", help="write the full result as JSON")
    p.add_argument("--plot", metavar="PATH", default=None,
                   help="draw the running estimate to PATH (.png/.svg/.pdf)")
    add_debug_argument(p)


def run(args: argparse.Namespace, console: Console) -> int:
    if not args.data:
        raise InvalidInputError(NEEDS_REAL_DATA)
    from ..report import check_plot_path, render

    if args.plot:
        check_plot_path(args.plot)
    from ..verbs.noise import estimate_noise_scale

    result = estimate_noise_scale(args.model, args.data, small=args.small, big=args.big,
                                  steps=args.steps, seed=args.seed)
    render(result, console)
    write_outputs(result, console, json_path=args.json, plot_path=args.plot)
    return EXIT_OK
