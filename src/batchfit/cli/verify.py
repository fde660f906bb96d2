"""``batchfit verify``: train with the model's own ``fit`` at a batch size, in fresh processes.

Exit status: 0 every run trained through; 1 any run ran out of memory (or failed otherwise);
2 bad input. Also the ``--verify`` option of ``max`` and ``tune`` (:func:`verify_answer`).
"""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console

from ..errors import InvalidInputError
from ..verbs.verify_fit import VERIFY_BATCHES, VERIFY_EPOCHS
from ._common import (
    DEMO_MEMORY,
    DEMO_MODEL,
    EXIT_FAIL,
    EXIT_OK,
    add_debug_argument,
    add_model_argument,
    parse_input_shapes,
    write_outputs,
)

HELP = "train with your model's own fit at a batch size, in fresh processes: fits k/k?"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify", help=HELP,
        description="Run the model's own model.fit (with a validation pass at the same batch "
                    "size) in fresh processes under the emulated device (what batchfit run "
                    "gives your script) and report fits k/k, the peak memory and the margin. "
                    "Exit 0 every run fits, 1 any runs out of memory, 2 bad input.")
    add_model_argument(p)
    p.add_argument("--batch", type=int, required=True, metavar="N", help="the batch size")
    p.add_argument("--memory", help=f"the device's memory, e.g. 512MiB (default with the "
                                    f"built-in example: {DEMO_MEMORY})")
    p.add_argument("--data", help="path/file.py:function returning (x, y) or a tf.data.Dataset "
                                  "(default: synthetic data, as the probes use)")
    p.add_argument("--input-shape", action="append", metavar="[NAME=]DIMS",
                   help="length of None dimensions, e.g. tokens=128 (repeatable)")
    p.add_argument("--epochs", type=int, default=VERIFY_EPOCHS,
                   help=f"epochs per run (default {VERIFY_EPOCHS}: a step's peak takes ~15 steps "
                        f"to settle)")
    p.add_argument("--steps", type=int, default=VERIFY_BATCHES,
                   help=f"batches per epoch (default {VERIFY_BATCHES}, as a probe's epoch)")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes (default 3)")
    p.add_argument("--device", default="CPU:0", help="the device to emulate (default CPU:0)")
    p.add_argument("--json", metavar="PATH", help="write the result as JSON")
    add_debug_argument(p)


def add_verify_option(p: argparse.ArgumentParser) -> None:
    """``--verify [K]`` for ``max`` and ``tune``."""
    p.add_argument("--verify", nargs="?", type=int, const=3, default=None, metavar="K",
                   help="then train at the answer with the model's own fit in K fresh "
                        "processes (default 3) and say whether it fits K/K (exit 1 if not)")


def _run_verify(console: Console, model: Any, batch: int, memory: Any, *, data: Any,
                input_shapes: Any, epochs: int, steps: int, repeats: int, device: str) -> Any:
    from ..report.verify import render_verify
    from ..verbs.verify_fit import verify_batch_size

    def on_run(run: Any) -> None:
        console.print(f"[dim]run: {run.outcome} in {run.seconds:.1f} s[/dim]", highlight=False)

    result = verify_batch_size(model, batch, memory, data=data, input_shapes=input_shapes,
                               epochs=epochs, steps=steps, repeats=repeats, device=device,
                               on_run=on_run)
    render_verify(result, console)
    return result


def verify_answer(args: argparse.Namespace, console: Console, model: Any, batch: int,
                  budget: int, device: str, replicas: int = 1) -> int:
    """After ``max``/``tune``: verify ``batch`` when ``--verify`` was given; the exit status."""
    if args.verify is None:
        return EXIT_OK
    if args.verify < 1:
        raise InvalidInputError(f"--verify K needs K >= 1, got {args.verify}")
    if replicas > 1:
        console.print("[yellow]--verify runs on one device: skipped under --distribute "
                      "(verify the per-replica size with batchfit verify)[/yellow]")
        return EXIT_OK
    console.print()
    result = _run_verify(console, model, batch, budget, data=args.data,
                         input_shapes=parse_input_shapes(args.input_shape), epochs=VERIFY_EPOCHS,
                         steps=VERIFY_BATCHES,
                         repeats=args.verify, device=device)
    return EXIT_OK if result.all_fit else EXIT_FAIL


def run(args: argparse.Namespace, console: Console) -> int:
    model, memory = args.model, args.memory
    if model is None:
        model, memory = DEMO_MODEL, memory or DEMO_MEMORY
        console.print(f"[dim]no MODEL given: the built-in example {DEMO_MODEL} on an emulated "
                      f"{memory} device[/dim]", highlight=False)
    if not memory:
        raise InvalidInputError("batchfit verify needs --memory SIZE (the device's memory, "
                                "e.g. 512MiB)")
    result = _run_verify(console, model, args.batch, memory, data=args.data,
                         input_shapes=parse_input_shapes(args.input_shape), epochs=args.epochs,
                         steps=args.steps, repeats=args.repeats, device=args.device)
    write_outputs(result, console, json_path=args.json)
    return EXIT_OK if result.all_fit else EXIT_FAIL
