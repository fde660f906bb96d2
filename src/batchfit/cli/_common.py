"""What the subcommands share: the built-in example, argument helpers, exit codes."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError

DEMO_MODEL = "batchfit.examples.models:demo_model"
DEMO_MEMORY = "96MiB"

EXIT_OK, EXIT_FAIL, EXIT_BAD_INPUT = 0, 1, 2


def parse_input_shapes(items: Sequence[str] | None) -> Any:
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
        if not shape or any(d < 1 for d in shape) or (sep and not name):
            raise InvalidInputError(f"--input-shape {item!r}: expected NAME=DIMS or DIMS with "
                                    f"positive integers, e.g. tokens=128 or 16x32")
        if not sep:
            if len(items) > 1:
                raise InvalidInputError("several --input-shape values need names: NAME=DIMS")
            return shape
        shapes[name] = shape
    return shapes


def write_outputs(result: Any, console: Any, *, json_path: str | None = None,
                  plot_path: str | None = None) -> None:
    """Write ``--json`` and ``--plot`` for a result, saying where each went.

    A missing parent directory is created; a path that cannot be written is bad input.
    """
    if json_path:
        with _writing("--json", json_path):
            result.to_json(json_path)
        console.print(f"[dim]wrote {json_path}[/dim]", highlight=False)
    if plot_path:
        from ..report import plot

        with _writing("--plot", plot_path):
            plot(result, plot_path)
        console.print(f"[dim]wrote {plot_path}[/dim]", highlight=False)


@contextlib.contextmanager
def _writing(option: str, path: str) -> Iterator[None]:
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        yield
    except OSError as exc:
        why = f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else exc
        raise InvalidInputError(f"{option} {path}: cannot write it ({why})") from None


def add_model_argument(p: argparse.ArgumentParser) -> None:
    """The optional positional MODEL every model-taking command accepts."""
    p.add_argument("model", nargs="?", default=None,
                   help="path/file.py:factory, package.module:factory or model.keras "
                        f"(default: the built-in example {DEMO_MODEL} under {DEMO_MEMORY})")


def warn(message: str) -> None:
    """Print a warning on stderr, one line (the answer on stdout stays clean)."""
    from rich.console import Console
    from rich.text import Text

    Console(stderr=True, soft_wrap=True).print(Text.assemble(("warning: ", "bold yellow"),
                                                             message))


def add_debug_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks")
