"""``batchfit run``: run a command under the device the probes emulate.

Exit status: the command's own; 2 bad input (no command, a bad size or device, a command that
cannot be started).
"""

from __future__ import annotations

import argparse

from rich.console import Console

from ..errors import InvalidInputError

HELP = "run your own command (e.g. python train.py) under the emulated device"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help=HELP,
        usage="batchfit run --memory SIZE [--device CPU:0] -- COMMAND [ARGS...]",
        description="Run COMMAND (your training) under exactly the device batchfit's probes "
                    "ran on: the allocator capped at SIZE and the probes' thread and memory "
                    "settings, applied when the command's Python imports TensorFlow. Exit "
                    "status: the command's; 2 bad input.")
    p.add_argument("--memory", metavar="SIZE", help="the device's memory, e.g. 512MiB")
    p.add_argument("--device", default="CPU:0", help="the device to emulate (default CPU:0)")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="COMMAND",
                   help="the command, after --, e.g. -- python train.py --epochs 3")


def run(args: argparse.Namespace, console: Console) -> int:
    from ..emulation import run_emulated

    if not args.memory:
        raise InvalidInputError("batchfit run needs --memory SIZE, e.g. batchfit run --memory "
                                "512MiB -- python train.py")
    return run_emulated(args.argv, args.memory, args.device)
