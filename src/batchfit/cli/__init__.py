"""The ``batchfit`` command: parse arguments, call the API, render, choose the exit status.

Exit status: 0 success; 1 the question has no answer (nothing fits, the model does not train,
a check found errors) or an unexpected error; 2 bad input (file not found, not a model,
unparsable size, ...). No traceback unless ``--debug``.

Each subcommand is a module of this package with ``add_parser(sub)`` and
``run(args, console) -> int``, listed in :data:`COMMANDS`. Command modules import TensorFlow
only inside ``run``, so ``--help`` and ``report`` stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from rich.console import Console

from ..errors import BatchfitError, InvalidInputError
from ._common import DEMO_MEMORY, DEMO_MODEL, EXIT_BAD_INPUT, EXIT_FAIL, EXIT_OK

#: Subcommands, in the order ``--help`` lists them (module names in this package).
COMMANDS: tuple[str, ...] = ("tune", "max", "noise", "check", "estimate", "report", "run", "verify")

#: Subcommands that measure, and so need a Keras backend installed (``report`` does not).
BACKEND_COMMANDS: frozenset[str] = frozenset({"tune", "max", "noise", "check", "estimate", "run",
                                              "verify"})

__all__ = ["BACKEND_COMMANDS", "COMMANDS", "DEMO_MEMORY", "DEMO_MODEL", "build_parser", "main"]


def _command(name: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.{name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchfit",
        description="Measure the batch size to train a Keras 3 model with (TensorFlow or JAX).")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("--backend", default=None, metavar="NAME",
                        help="the Keras backend to measure with: tensorflow or jax (default: "
                             "KERAS_BACKEND, then keras.json, then tensorflow)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        _command(name).add_parser(sub)
    return parser


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
        from .. import __version__
        console.print(f"batchfit {__version__}")
        return EXIT_OK
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        if args.backend is not None:
            _choose_backend(args.backend)
        if args.command in BACKEND_COMMANDS:
            from ..backend import get_backend, require_backend

            require_backend()  # a missing TensorFlow is bad input with its install command
            if getattr(args, "device", None):
                get_backend().check_device(args.device)  # e.g. GPU:0 where none is
        return _command(args.command).run(args, console)
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
    except Exception as exc:
        if getattr(args, "debug", False):
            raise
        _print_error(err, "internal error", f"{type(exc).__name__}: {exc} "
                                            f"(rerun with --debug for the traceback)")
        return EXIT_FAIL


def _choose_backend(name: str) -> None:
    """``--backend NAME``: checked, then set as ``KERAS_BACKEND`` before anything imports
    Keras (which reads it once, at import); worker processes inherit it."""
    from ..backend import backend_name, use_backend

    use_backend(backend_name(name))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
